//! What makes a retry "the same request": the request fingerprint, canonical JSON and
//! JSON pointers.
//!
//! A request's fingerprint hashes, each as a labelled part (see
//! [`idem_core::FingerprintBuilder`]): the method, the path, the query, every configured header
//! (each value, or a marker that it is absent) and the body. With `json_canonical`, a JSON
//! body enters as [`canonical_json`] instead of its raw bytes, so key order, whitespace and
//! the fields named by `json_ignore` make no difference.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::str::FromStr;

use http::header::CONTENT_TYPE;
use http::request::Parts;
use idem_core::{Fingerprint, Key, Scope, ScopedKey};
use serde_json::Value;

use crate::policy::Config;

/// The fingerprint of a request under a policy.
/// `path` is the request's normalised path ([`normalize_path`](crate::path::normalize_path)),
/// and the method enters upper-cased: requests the inner service cannot tell apart have
/// one fingerprint.
pub(crate) fn request_fingerprint(
    config: &Config,
    parts: &Parts,
    path: &str,
    body: &[u8],
) -> Fingerprint {
    let mut builder = Fingerprint::builder();
    let method = parts.method.as_str();
    if method.bytes().any(|b| b.is_ascii_lowercase()) {
        builder.push("method", method.to_ascii_uppercase().as_bytes());
    } else {
        builder.push("method", method.as_bytes());
    }
    builder.push("path", path.as_bytes());
    builder.push("query", parts.uri.query().unwrap_or_default().as_bytes());
    for name in &config.fingerprint_headers {
        let mut present = false;
        for value in parts.headers.get_all(name) {
            present = true;
            builder.push(&format!("header {name}"), value.as_bytes());
        }
        if !present {
            builder.push("absent header", name.as_str().as_bytes());
        }
    }
    let canonical = (config.policy.json_canonical && is_json(parts))
        .then(|| canonical_text(body, &config.json_ignore))
        .flatten();
    match canonical {
        Some(json) => builder.push("json body", json.as_bytes()),
        None => builder.push("body", body),
    }
    builder.finish()
}

/// The name of the record of a request keyed by its fingerprint
/// ([`KeyFrom::Fingerprint`](crate::KeyFrom::Fingerprint)): the key `fp-<hex>` within
/// `fingerprint:<scope>`, a scope of its own beside the caller's.
///
/// Apart, because a client may send any key, `fp-…` included: within the caller's own
/// scope such a key could bind the name to another request first and turn a derived
/// claim into a `422`. The scopes the layer makes (`anonymous`, `cred…`) never start with
/// `fingerprint:`. Since the key is a function of the fingerprint, a derived claim never
/// meets another fingerprint.
pub(crate) fn derived_key(scope: &Scope, fingerprint: &Fingerprint) -> ScopedKey {
    let text = format!("fp-{fingerprint}");
    // 67 characters of ASCII letters, digits and `-`: within every limit a key has.
    let key = Key::new(&text).unwrap_or_else(|_| unreachable!("{text} is a valid key"));
    ScopedKey::new(Scope::new(format!("fingerprint:{scope}")), key)
}

/// Whether the request says its body is JSON: `application/json` or any `+json` type.
fn is_json(parts: &Parts) -> bool {
    let Some(value) = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.to_ascii_lowercase().ends_with("+json")
}

/// `body` parsed as JSON, with the `ignore`d members removed and written back compactly with
/// object keys sorted (by their UTF-8 bytes); `None` if `body` is not JSON.
///
/// Two documents that differ only in key order, whitespace or ignored members give the same
/// text. Numbers are compared as `serde_json` reads them: integers exactly, other numbers as
/// `f64` (so `1.50` and `1.5` are the same, `1.0` and `1` are not, and integers beyond 64
/// bits may be rounded). For a duplicated key the last value counts.
///
/// ```
/// use idem_http::fingerprint::{JsonPointer, canonical_json};
///
/// let ignore = [JsonPointer::parse("/meta/sent_at").unwrap()];
/// let a = canonical_json(br#"{"b": 2, "a": [1, {"y": 0, "x": 1}], "meta": {"sent_at": 5}}"#, &ignore);
/// let b = canonical_json(br#"{"a":[1,{"x":1,"y":0}],"b":2,"meta":{"sent_at":6}}"#, &ignore);
/// assert_eq!(a, b);
/// assert_eq!(a.unwrap(), r#"{"a":[1,{"x":1,"y":0}],"b":2,"meta":{}}"#);
/// assert_eq!(canonical_json(b"not json", &[]), None);
/// ```
pub fn canonical_json(body: &[u8], ignore: &[JsonPointer]) -> Option<String> {
    canonical_text(body, ignore).map(Cow::into_owned)
}

/// [`canonical_json`], borrowing `body` when it already is in canonical form.
fn canonical_text<'a>(body: &'a [u8], ignore: &[JsonPointer]) -> Option<Cow<'a, str>> {
    // Most clients send the same compact document for every retry, often with its keys
    // already sorted: recognising that is a scan, where parsing builds a tree of maps and
    // strings only to write the same bytes back.
    if ignore.is_empty()
        && let Some(text) = already_canonical(body)
    {
        return Some(Cow::Borrowed(text));
    }
    canonical_json_via_value(body, ignore).map(Cow::Owned)
}

/// [`canonical_json`] the long way, always through a `serde_json::Value`: what the scan of
/// [`already_canonical`] must agree with (the fuzz target and tests compare the two).
#[doc(hidden)]
pub fn canonical_json_via_value(body: &[u8], ignore: &[JsonPointer]) -> Option<String> {
    let mut value: Value = serde_json::from_slice(body).ok()?;
    for pointer in ignore {
        pointer.remove_from(&mut value);
    }
    let mut out = String::with_capacity(body.len());
    write_canonical(&value, &mut out);
    Some(out)
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut members: Vec<_> = map.iter().collect();
            members.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (name, member)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(name, out);
                out.push(':');
                write_canonical(member, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::String(s) => write_string(s, out),
        // Null, booleans and numbers: serde_json's compact form.
        scalar => {
            // Writing into a String cannot fail.
            let _ = write!(out, "{scalar}");
        }
    }
}

fn write_string(s: &str, out: &mut String) {
    // serde_json escapes exactly as JSON requires; writing into a String cannot fail.
    let _ = write!(out, "{}", Value::from(s));
}

/// Nesting the scan follows at most; deeper documents take the long way (where serde_json's
/// own limit of 128 applies).
const MAX_SCAN_DEPTH: usize = 64;

/// `body` as text if [`canonical_json_via_value`] would give it back unchanged, recognised
/// without parsing it into a tree; `None` means "not known to be": take the long way.
///
/// Only a subset of canonical documents is recognised, the one where that is certain:
/// no whitespace outside strings; object keys strictly increasing by their bytes (so no
/// duplicates); strings without escapes (serde_json writes a string without `"`, `\` or
/// control characters as it is, and those cannot appear unescaped in JSON); integers of
/// at most 18 digits without leading zeros and other than `-0` (serde_json reads them as
/// 64-bit integers and writes them back digit for digit); `true`, `false`, `null`. Any
/// fraction or exponent, being read as `f64` and written back in its shortest form, takes
/// the long way.
fn already_canonical(body: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(body).ok()?;
    let mut scan = Scan { bytes: body, at: 0 };
    (scan.value(0) && scan.at == body.len()).then_some(text)
}

struct Scan<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Scan<'a> {
    fn eat(&mut self, byte: u8) -> bool {
        let next = self.bytes.get(self.at) == Some(&byte);
        self.at += usize::from(next);
        next
    }

    fn value(&mut self, depth: usize) -> bool {
        match self.bytes.get(self.at) {
            Some(b'{') => depth < MAX_SCAN_DEPTH && self.object(depth + 1),
            Some(b'[') => depth < MAX_SCAN_DEPTH && self.array(depth + 1),
            Some(b'"') => self.string().is_some(),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => self.integer(),
            _ => false,
        }
    }

    fn object(&mut self, depth: usize) -> bool {
        self.at += 1;
        if self.eat(b'}') {
            return true;
        }
        let mut previous: Option<&[u8]> = None;
        loop {
            let Some(name) = self.string() else {
                return false;
            };
            if previous.is_some_and(|previous| previous >= name) {
                return false;
            }
            previous = Some(name);
            if !self.eat(b':') || !self.value(depth) {
                return false;
            }
            if self.eat(b'}') {
                return true;
            }
            if !self.eat(b',') {
                return false;
            }
        }
    }

    fn array(&mut self, depth: usize) -> bool {
        self.at += 1;
        if self.eat(b']') {
            return true;
        }
        loop {
            if !self.value(depth) {
                return false;
            }
            if self.eat(b']') {
                return true;
            }
            if !self.eat(b',') {
                return false;
            }
        }
    }

    /// The bytes between the quotes of a string without escapes or control characters.
    fn string(&mut self) -> Option<&'a [u8]> {
        if !self.eat(b'"') {
            return None;
        }
        let start = self.at;
        loop {
            match *self.bytes.get(self.at)? {
                b'"' => {
                    self.at += 1;
                    return Some(&self.bytes[start..self.at - 1]);
                }
                b'\\' => return None,
                byte if byte < 0x20 => return None,
                _ => self.at += 1,
            }
        }
    }

    fn literal(&mut self, word: &[u8]) -> bool {
        let matches = self.bytes[self.at..].starts_with(word);
        self.at += if matches { word.len() } else { 0 };
        matches
    }

    fn integer(&mut self) -> bool {
        let negative = self.eat(b'-');
        let start = self.at;
        while matches!(self.bytes.get(self.at), Some(b'0'..=b'9')) {
            self.at += 1;
        }
        let digits = &self.bytes[start..self.at];
        let plain = match digits {
            [] => false,
            [b'0'] => !negative,
            [b'0', ..] => false,
            _ => digits.len() <= 18,
        };
        plain && !matches!(self.bytes.get(self.at), Some(b'.' | b'e' | b'E'))
    }
}

/// A JSON pointer (RFC 6901) naming a member to leave out of a fingerprint, such as
/// `/meta/sent_at` or `/items/0/trace_id`.
///
/// `~1` stands for `/` and `~0` for `~` within a reference token. The empty pointer (the
/// whole document) is refused: ignoring everything is never what was meant.
///
/// ```
/// use idem_http::fingerprint::JsonPointer;
///
/// let pointer: JsonPointer = "/a~1b/m~0n".parse().unwrap();
/// assert_eq!(pointer.tokens(), ["a/b", "m~n"]);
/// assert!(JsonPointer::parse("").is_err());
/// assert!(JsonPointer::parse("a").is_err());
/// assert!(JsonPointer::parse("/bad~2").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPointer {
    text: String,
    tokens: Vec<String>,
}

/// Why a string is not a usable [`JsonPointer`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JsonPointerError {
    /// The empty pointer names the whole document.
    #[error("is empty: it would name the whole document")]
    Empty,
    /// A non-empty pointer must start with `/`.
    #[error("does not start with `/`")]
    NoLeadingSlash,
    /// `~` must be followed by `0` or `1`.
    #[error("has a `~` not followed by `0` or `1`")]
    BadEscape,
}

impl JsonPointer {
    /// Parses a pointer in its string form.
    pub fn parse(text: &str) -> Result<Self, JsonPointerError> {
        let rest = match text.strip_prefix('/') {
            Some(rest) => rest,
            None if text.is_empty() => return Err(JsonPointerError::Empty),
            None => return Err(JsonPointerError::NoLeadingSlash),
        };
        let tokens = rest
            .split('/')
            .map(unescape)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            text: text.to_owned(),
            tokens,
        })
    }

    /// The pointer as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The unescaped reference tokens.
    pub fn tokens(&self) -> &[String] {
        &self.tokens
    }

    /// Removes the member this pointer names from `value`; says whether there was one. An
    /// array element is replaced by `null` rather than removed, so that the elements after
    /// it keep their positions.
    ///
    /// ```
    /// use idem_http::fingerprint::JsonPointer;
    /// use serde_json::json;
    ///
    /// let mut doc = json!({"items": [{"id": 1, "ts": 9}, 7], "ts": 3});
    /// assert!(JsonPointer::parse("/items/0/ts").unwrap().remove_from(&mut doc));
    /// assert!(JsonPointer::parse("/items/1").unwrap().remove_from(&mut doc));
    /// assert!(!JsonPointer::parse("/nothing/here").unwrap().remove_from(&mut doc));
    /// assert_eq!(doc, json!({"items": [{"id": 1}, null], "ts": 3}));
    /// ```
    pub fn remove_from(&self, value: &mut Value) -> bool {
        let Some((last, path)) = self.tokens.split_last() else {
            return false;
        };
        let mut target = value;
        for token in path {
            let next = match target {
                Value::Object(map) => map.get_mut(token.as_str()),
                Value::Array(items) => array_index(token).and_then(|i| items.get_mut(i)),
                _ => None,
            };
            match next {
                Some(next) => target = next,
                None => return false,
            }
        }
        match target {
            Value::Object(map) => map.remove(last.as_str()).is_some(),
            Value::Array(items) => match array_index(last).and_then(|i| items.get_mut(i)) {
                Some(item) => {
                    *item = Value::Null;
                    true
                }
                None => false,
            },
            _ => false,
        }
    }
}

impl FromStr for JsonPointer {
    type Err = JsonPointerError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

fn unescape(token: &str) -> Result<String, JsonPointerError> {
    let mut out = String::with_capacity(token.len());
    let mut chars = token.chars();
    while let Some(c) = chars.next() {
        if c == '~' {
            match chars.next() {
                Some('0') => out.push('~'),
                Some('1') => out.push('/'),
                _ => return Err(JsonPointerError::BadEscape),
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// RFC 6901 array indices: `0`, or digits without a leading zero.
fn array_index(token: &str) -> Option<usize> {
    let digits_only = !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit());
    if !digits_only || (token.len() > 1 && token.starts_with('0')) {
        return None;
    }
    token.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parts(method: &str, uri: &str, content_type: Option<&str>) -> Parts {
        let mut builder = http::Request::builder().method(method).uri(uri);
        if let Some(ct) = content_type {
            builder = builder.header(CONTENT_TYPE, ct);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn fingerprint_of(config: &Config, parts: &Parts, body: &[u8]) -> Fingerprint {
        request_fingerprint(config, parts, parts.uri.path(), body)
    }

    #[test]
    fn method_case_does_not_matter() {
        let c = config();
        assert_eq!(
            fingerprint_of(&c, &parts("post", "/a", None), b"x"),
            fingerprint_of(&c, &parts("POST", "/a", None), b"x")
        );
    }

    fn config() -> Config {
        crate::IdempotencyPolicy {
            json_ignore: vec!["/ts".into()],
            ..Default::default()
        }
        .compile()
        .unwrap()
    }

    #[test]
    fn json_key_order_and_ignored_fields_do_not_matter() {
        let c = config();
        let p = parts("POST", "/pay?x=1", Some("application/json; charset=utf-8"));
        let a = fingerprint_of(&c, &p, br#"{"a":1,"b":2,"ts":1}"#);
        let b = fingerprint_of(&c, &p, br#"{ "b":2, "ts":2, "a":1 }"#);
        assert_eq!(a, b);
        let other = fingerprint_of(&c, &p, br#"{"a":1,"b":3}"#);
        assert_ne!(a, other);
    }

    #[test]
    fn plus_json_types_are_json_and_others_are_bytes() {
        let c = config();
        let vnd = parts("POST", "/", Some("application/vnd.api+JSON"));
        assert_eq!(
            fingerprint_of(&c, &vnd, br#"{"a":1,"b":2}"#),
            fingerprint_of(&c, &vnd, br#"{"b":2,"a":1}"#)
        );
        let text = parts("POST", "/", Some("text/plain"));
        assert_ne!(
            fingerprint_of(&c, &text, br#"{"a":1,"b":2}"#),
            fingerprint_of(&c, &text, br#"{"b":2,"a":1}"#)
        );
    }

    #[test]
    fn method_path_query_and_headers_count() {
        let c = config();
        let base = fingerprint_of(&c, &parts("POST", "/a?q=1", None), b"x");
        for other in [
            parts("PATCH", "/a?q=1", None),
            parts("POST", "/b?q=1", None),
            parts("POST", "/a?q=2", None),
            parts("POST", "/a?q=1", Some("text/plain")),
        ] {
            assert_ne!(base, fingerprint_of(&c, &other, b"x"));
        }
        // Scheme and authority are not part of the request's identity.
        let absolute = parts("POST", "http://example.com/a?q=1", None);
        assert_eq!(base, fingerprint_of(&c, &absolute, b"x"));
    }

    #[test]
    fn a_derived_key_is_the_fingerprint_apart_from_the_callers_keys() {
        let c = config();
        let fp = fingerprint_of(&c, &parts("POST", "/a", None), b"x");
        let caller = Scope::new("cred00");
        let derived = derived_key(&caller, &fp);
        assert_eq!(derived.key().as_str(), format!("fp-{fp}"));
        assert_eq!(derived.scope().as_str(), "fingerprint:cred00");
        assert_eq!(derived, derived_key(&caller, &fp));
        assert_ne!(derived, derived_key(&Scope::anonymous(), &fp));
        let other = fingerprint_of(&c, &parts("POST", "/b", None), b"x");
        assert_ne!(derived, derived_key(&caller, &other));
    }

    #[test]
    fn malformed_json_falls_back_to_raw_bytes() {
        let c = config();
        let p = parts("POST", "/", Some("application/json"));
        let a = fingerprint_of(&c, &p, b"{not json");
        let b = fingerprint_of(&c, &p, b"{not json");
        let d = fingerprint_of(&c, &p, b"{not  json");
        assert_eq!(a, b);
        assert_ne!(a, d);
    }

    #[test]
    fn canonical_form_escapes_strings() {
        let text = canonical_json(br#"{"q\"":"a\nb","\u00e9":[true,null,1.5,-2]}"#, &[]);
        assert_eq!(
            text.unwrap(),
            "{\"q\\\"\":\"a\\nb\",\"\u{e9}\":[true,null,1.5,-2]}"
        );
    }

    /// The scan's verdict, checked against the long way: whatever it accepts comes out
    /// of the long way unchanged.
    fn same_both_ways(body: &[u8]) -> bool {
        let slow = canonical_json_via_value(body, &[]);
        if let Some(text) = already_canonical(body) {
            assert_eq!(
                slow.as_deref(),
                Some(text),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        assert_eq!(canonical_json(body, &[]), slow);
        already_canonical(body).is_some()
    }

    #[test]
    fn the_scan_accepts_only_what_the_long_way_gives_back() {
        for accepted in [
            &br#"{"amount":1250,"currency":"EUR","customer":"cus_42","note":"idem bench"}"#[..],
            br#"{}"#,
            br#"[]"#,
            br#"[1,-2,0,true,false,null,"",{"":[]}]"#,
            "{\"a\":{\"b\":{\"c\":[{\"d\":1}]}},\"b\":\"\u{e9}\u{7f}\"}".as_bytes(),
            br#"123456789012345678"#,
            br#"-123456789012345678"#,
            "\"caf\u{e9} \u{1f600}\"".as_bytes(),
        ] {
            assert!(
                same_both_ways(accepted),
                "{:?}",
                String::from_utf8_lossy(accepted)
            );
        }
        for refused in [
            &br#"{"b":1,"a":2}"#[..],
            br#"{"a":1,"a":2}"#,
            br#"{"a": 1}"#,
            br#" {}"#,
            b"{}\n",
            br#"[1.5]"#,
            br#"[1e3]"#,
            br#"[1E3]"#,
            br#"[-0]"#,
            br#"[01]"#,
            br#"[-]"#,
            br#"[1234567890123456789]"#,
            br#"["a\nb"]"#,
            br#"["\u0041"]"#,
            b"[\"tab\there\"]",
            br#"[tru]"#,
            br#"[true"#,
            br#"{"a":1"#,
            br#"{"a"}"#,
            br#"{"a":1,}"#,
            br#"[1,]"#,
            br#"[1]]"#,
            b"\"\xff\"",
            b"",
        ] {
            assert!(
                !same_both_ways(refused),
                "{:?}",
                String::from_utf8_lossy(refused)
            );
        }
        let nested = |depth| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert!(same_both_ways(nested(MAX_SCAN_DEPTH).as_bytes()));
        assert!(!same_both_ways(nested(MAX_SCAN_DEPTH + 1).as_bytes()));
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e6_f64..1e6).prop_map(Value::from),
            "[a-c\\\\\"\u{0}-\u{1f}\u{e9} ]{0,4}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map("[a-c\\\\\u{e9}]{0,3}", inner, 0..4)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn the_scan_agrees_with_the_long_way_on_documents(value in json_value(), pretty: bool) {
            let text = if pretty {
                serde_json::to_string_pretty(&value).unwrap()
            } else {
                serde_json::to_string(&value).unwrap()
            };
            same_both_ways(text.as_bytes());
            let canonical = canonical_json_via_value(text.as_bytes(), &[]).unwrap();
            same_both_ways(canonical.as_bytes());
        }

        #[test]
        fn the_scan_agrees_with_the_long_way_on_any_bytes(body in r#"[\[\]{}",:0-9a\-.eE\\ntrufls ]{0,24}"#) {
            same_both_ways(body.as_bytes());
        }
    }

    #[test]
    fn pointers_follow_rfc_6901() {
        let mut doc = json!({"a/b": {"m~n": 1, "k": 2}, "list": [0, 1, 2]});
        assert!(
            JsonPointer::parse("/a~1b/m~0n")
                .unwrap()
                .remove_from(&mut doc)
        );
        assert!(
            !JsonPointer::parse("/list/01")
                .unwrap()
                .remove_from(&mut doc)
        );
        assert!(!JsonPointer::parse("/list/-").unwrap().remove_from(&mut doc));
        assert!(!JsonPointer::parse("/list/9").unwrap().remove_from(&mut doc));
        assert!(JsonPointer::parse("/list/2").unwrap().remove_from(&mut doc));
        assert_eq!(doc, json!({"a/b": {"k": 2}, "list": [0, 1, null]}));
        let mut empty_key = json!({"": 1});
        assert!(JsonPointer::parse("/").unwrap().remove_from(&mut empty_key));
        assert_eq!(empty_key, json!({}));
    }
}
