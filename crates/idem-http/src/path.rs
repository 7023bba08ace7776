//! What path a request is for, as the framework behind the layer will see it.
//!
//! Routes and fingerprints must see the path the upstream routes on, or `POST /%70ay`
//! slips past a `key_required` route for `/pay` and still reaches the `/pay` handler.
//! [`normalize_path`] percent-decodes the path once, as frameworks do, and refuses the
//! paths on which servers and frameworks disagree, so that no disagreement can be used
//! to make idem see one path while the upstream runs another.

use std::borrow::Cow;
use std::fmt;

/// Why a request path is refused on a protected method.
///
/// ```
/// use idem_http::path::{PathErrorKind, normalize_path};
///
/// let err = normalize_path("/a/%2E%2E/pay").unwrap_err();
/// assert_eq!(err.kind(), PathErrorKind::DotSegment);
/// assert_eq!(
///     err.to_string(),
///     "the request path is ambiguous: it has a `.` or `..` segment (literal or percent-encoded)"
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the request path is ambiguous: {reason}")]
pub struct PathError {
    reason: &'static str,
    kind: PathErrorKind,
}

impl PathError {
    fn new(kind: PathErrorKind) -> Self {
        Self {
            reason: kind.reason(),
            kind,
        }
    }

    /// What makes the path ambiguous, as a phrase (`it has an empty segment (`//`)`).
    pub fn reason(&self) -> &'static str {
        self.reason
    }

    /// Which rule of [`normalize_path`] refused the path.
    pub fn kind(&self) -> PathErrorKind {
        self.kind
    }
}

/// The rules of [`normalize_path`]; its documentation says why each exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PathErrorKind {
    /// The path does not start with `/` (and is not `*`).
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    BadPercentEncoding,
    /// `%2F`: an encoded `/`.
    EncodedSlash,
    /// `%25`: an encoded `%`.
    EncodedPercent,
    /// A `\`, literal or `%5C`.
    Backslash,
    /// A `;`, literal or `%3B`.
    Semicolon,
    /// NUL or another control character, literal or encoded.
    ControlCharacter,
    /// The decoded bytes are not UTF-8.
    NotUtf8,
    /// A `.` or `..` segment, literal or encoded.
    DotSegment,
    /// An empty segment (`//`) before the end of the path.
    EmptySegment,
}

impl PathErrorKind {
    /// The phrase [`PathError::reason`] gives for this rule.
    pub fn reason(self) -> &'static str {
        match self {
            Self::NotAbsolute => "it does not start with `/`",
            Self::BadPercentEncoding => "it has a `%` that is not followed by two hex digits",
            Self::EncodedSlash => "it has a percent-encoded `/` (%2F)",
            Self::EncodedPercent => "it has a percent-encoded `%` (%25)",
            Self::Backslash => "it has a `\\` (literal or %5C)",
            Self::Semicolon => "it has a `;` (literal or %3B)",
            Self::ControlCharacter => {
                "it has a NUL or control character (literal or percent-encoded)"
            }
            Self::NotUtf8 => "it percent-decodes to bytes that are not UTF-8",
            Self::DotSegment => "it has a `.` or `..` segment (literal or percent-encoded)",
            Self::EmptySegment => "it has an empty segment (`//`)",
        }
    }
}

impl fmt::Display for PathErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

/// The percent-decoded path that routing and fingerprints use.
///
/// `raw` is the path of the request target (`http::Uri::path`, no query). Every `%XX` is
/// decoded once, as the framework behind the gateway decodes it: WSGI servers hand Django
/// and Flask a decoded path, and Spring, Rails and Go's `ServeMux` decode before they
/// match, so `/%70ay` is routed to `/pay` and must be matched and fingerprinted as `/pay`.
/// (A framework that matches the raw path, as Express does, routes `/%70ay` to no `/pay`
/// handler; treating it as `/pay` then protects more, never less.) The result is
/// borrowed when `raw` has no `%` at all.
///
/// A path that servers or frameworks route differently is refused, because idem cannot
/// know which reading the upstream takes. In the order they are checked:
///
/// | refused | kind | why |
/// |---|---|---|
/// | not starting with `/` | [`NotAbsolute`](PathErrorKind::NotAbsolute) | an origin-form path starts with `/`; anything else is resolved by guesswork. `*` alone (the asterisk-form of `OPTIONS`) is returned as is |
/// | `%` not followed by two hex digits | [`BadPercentEncoding`](PathErrorKind::BadPercentEncoding) | some servers answer `400`, others pass the `%` through literally |
/// | `%2F` | [`EncodedSlash`](PathErrorKind::EncodedSlash) | a separator to servers that decode before splitting into segments, part of a segment to those that split first; Tomcat refuses it by default |
/// | `%25` | [`EncodedPercent`](PathErrorKind::EncodedPercent) | double encoding: a proxy or framework that decodes twice turns `%252F` into `/`. Refusing it also makes the result free of `%`, so normalising it again changes nothing |
/// | `\`, literal or `%5C` | [`Backslash`](PathErrorKind::Backslash) | some servers and proxies read it as `/`, as browsers do |
/// | `;`, literal or `%3B` | [`Semicolon`](PathErrorKind::Semicolon) | Tomcat and Spring strip path parameters (`/pay;x` is routed to `/pay`), most others keep `;` in the segment |
/// | NUL or any control character (`char::is_control`: C0, DEL, C1), literal or encoded | [`ControlCharacter`](PathErrorKind::ControlCharacter) | NUL ends the string in C-based code; servers refuse, strip or keep control characters differently |
/// | decoded bytes that are not UTF-8 (`%FF`, overlong forms such as `%C0%AE`) | [`NotUtf8`](PathErrorKind::NotUtf8) | some frameworks refuse them, some substitute U+FFFD, WSGI reads Latin-1; an overlong `.` becomes a dot segment in lenient decoders |
/// | a `.` or `..` segment, literal or encoded (`%2E`, any case, mixed with `.`) | [`DotSegment`](PathErrorKind::DotSegment) | servers and proxies remove dot segments (RFC 3986), some before decoding and some after, so `/a/%2E%2E/pay` may be `/pay` upstream |
/// | an empty segment (`//`) anywhere but the end | [`EmptySegment`](PathErrorKind::EmptySegment) | nginx (`merge_slashes`) and others collapse `//` into `/`, others keep the empty segment |
///
/// These are the paths Spring Security's `StrictHttpFirewall` refuses for the same reason,
/// so a Spring upstream already answers `400` to all of them.
///
/// Kept as they are: a trailing `/` (`/pay/` is a different route to Django and to Spring
/// 6, the same as `/pay` to Express; route matchers that want both must say so), letter
/// case (idem matches case-sensitively), `+` (a space only in form-encoded queries), and
/// decoded `?`, `#` and non-ASCII UTF-8 (frameworks split the query off before decoding,
/// so these are ordinary segment characters).
///
/// Whatever is accepted normalises to itself: the result has no `%`, so a second pass
/// returns it unchanged.
///
/// ```
/// use std::borrow::Cow;
/// use idem_http::path::{PathErrorKind, normalize_path};
///
/// assert_eq!(normalize_path("/%70ay").unwrap(), "/pay");
/// assert_eq!(normalize_path("/caf%C3%A9/").unwrap(), "/café/");
/// assert!(matches!(normalize_path("/pay").unwrap(), Cow::Borrowed("/pay")));
///
/// let refused = |raw| normalize_path(raw).unwrap_err().kind();
/// assert_eq!(refused("/a%2Fb"), PathErrorKind::EncodedSlash);
/// assert_eq!(refused("/pay;jsessionid=1"), PathErrorKind::Semicolon);
/// assert_eq!(refused("/a/./pay"), PathErrorKind::DotSegment);
/// assert_eq!(refused("//pay"), PathErrorKind::EmptySegment);
/// ```
pub fn normalize_path(raw: &str) -> Result<Cow<'_, str>, PathError> {
    if raw == "*" {
        return Ok(Cow::Borrowed(raw));
    }
    if !raw.starts_with('/') {
        return Err(PathError::new(PathErrorKind::NotAbsolute));
    }
    let path = if raw.contains('%') {
        Cow::Owned(percent_decode(raw)?)
    } else {
        Cow::Borrowed(raw)
    };
    check_characters(&path)?;
    check_segments(&path)?;
    Ok(path)
}

/// `raw` with every `%XX` decoded, refusing escapes that must not be decoded.
fn percent_decode(raw: &str) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        if byte != b'%' {
            decoded.push(byte);
            i += 1;
            continue;
        }
        let escaped = match (
            bytes.get(i + 1).copied().and_then(hex_value),
            bytes.get(i + 2).copied().and_then(hex_value),
        ) {
            (Some(high), Some(low)) => (high << 4) | low,
            _ => return Err(PathError::new(PathErrorKind::BadPercentEncoding)),
        };
        match escaped {
            b'/' => return Err(PathError::new(PathErrorKind::EncodedSlash)),
            b'%' => return Err(PathError::new(PathErrorKind::EncodedPercent)),
            _ => decoded.push(escaped),
        }
        i += 3;
    }
    String::from_utf8(decoded).map_err(|_| PathError::new(PathErrorKind::NotUtf8))
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// The character rules, on the decoded path: literal and encoded forms alike.
fn check_characters(path: &str) -> Result<(), PathError> {
    for c in path.chars() {
        let kind = match c {
            '\\' => PathErrorKind::Backslash,
            ';' => PathErrorKind::Semicolon,
            c if c.is_control() => PathErrorKind::ControlCharacter,
            _ => continue,
        };
        return Err(PathError::new(kind));
    }
    Ok(())
}

/// The segment rules, on the decoded path (which starts with `/` and has no encoded `/`,
/// so its `/`s are exactly the upstream's separators).
fn check_segments(path: &str) -> Result<(), PathError> {
    let mut segments = path.split('/').skip(1).peekable();
    while let Some(segment) = segments.next() {
        match segment {
            "." | ".." => return Err(PathError::new(PathErrorKind::DotSegment)),
            // The last segment may be empty: `/` itself, or a trailing slash.
            "" if segments.peek().is_some() => {
                return Err(PathError::new(PathErrorKind::EmptySegment));
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn refused(raw: &str) -> PathErrorKind {
        match normalize_path(raw) {
            Ok(path) => panic!("{raw:?} was accepted as {path:?}"),
            Err(err) => err.kind(),
        }
    }

    fn accepted(raw: &str) -> Cow<'_, str> {
        normalize_path(raw).unwrap_or_else(|err| panic!("{raw:?} was refused: {err}"))
    }

    #[test]
    fn percent_decodes_once_in_either_case() {
        assert_eq!(accepted("/%70ay"), "/pay");
        assert_eq!(accepted("/%50%41%59"), "/PAY");
        assert_eq!(accepted("/p%61y/%3f%23"), "/pay/?#");
        assert_eq!(accepted("/a%20b+c"), "/a b+c");
        assert_eq!(accepted("/%7E%7e"), "/~~");
    }

    #[test]
    fn borrowed_without_percent_owned_with() {
        assert!(matches!(accepted("/pay/1"), Cow::Borrowed("/pay/1")));
        assert!(matches!(accepted("/"), Cow::Borrowed("/")));
        assert!(matches!(accepted("/p%61y"), Cow::Owned(_)));
    }

    #[test]
    fn utf8_literal_and_encoded_are_the_same_path() {
        assert_eq!(accepted("/caf%C3%A9"), "/café");
        assert_eq!(accepted("/café"), "/café");
        assert_eq!(accepted("/%E2%82%AC"), "/€");
    }

    #[test]
    fn root_trailing_slash_and_asterisk_are_kept() {
        assert_eq!(accepted("/"), "/");
        assert_eq!(accepted("/pay/"), "/pay/");
        assert_eq!(accepted("*"), "*");
    }

    #[test]
    fn dots_inside_segments_are_ordinary() {
        assert_eq!(accepted("/a.json"), "/a.json");
        assert_eq!(accepted("/.well-known/x"), "/.well-known/x");
        assert_eq!(accepted("/.../..a/a.."), "/.../..a/a..");
        assert_eq!(accepted("/v1%2Ejson"), "/v1.json");
    }

    #[test]
    fn refuses_paths_not_starting_with_slash() {
        for raw in ["", "pay", "http://h/pay", "**", "%2Fpay", " /pay", "\\pay"] {
            assert_eq!(refused(raw), PathErrorKind::NotAbsolute, "{raw:?}");
        }
    }

    #[test]
    fn refuses_bad_percent_encoding() {
        for raw in [
            "/%",
            "/a%",
            "/a%7",
            "/%G0",
            "/%0g",
            "/%%41",
            "/%-1",
            "/%\u{e9}9",
        ] {
            assert_eq!(refused(raw), PathErrorKind::BadPercentEncoding, "{raw:?}");
        }
    }

    #[test]
    fn refuses_encoded_slash() {
        for raw in ["/a%2Fb", "/a%2fb", "/%2F", "/pay%2F..%2Fadmin"] {
            assert_eq!(refused(raw), PathErrorKind::EncodedSlash, "{raw:?}");
        }
    }

    #[test]
    fn refuses_encoded_percent() {
        for raw in ["/%25", "/a%252Fb", "/%2570ay"] {
            assert_eq!(refused(raw), PathErrorKind::EncodedPercent, "{raw:?}");
        }
    }

    #[test]
    fn refuses_backslash_literal_or_encoded() {
        for raw in ["/a\\b", "/a%5Cb", "/a%5cb", "/..\\pay"] {
            assert_eq!(refused(raw), PathErrorKind::Backslash, "{raw:?}");
        }
    }

    #[test]
    fn refuses_semicolon_literal_or_encoded() {
        for raw in [
            "/pay;x", "/pay;", "/a;b/c", "/pay%3Bx", "/pay%3bx", "/..;/pay",
        ] {
            assert_eq!(refused(raw), PathErrorKind::Semicolon, "{raw:?}");
        }
    }

    #[test]
    fn refuses_nul_and_control_characters() {
        for raw in [
            "/pay%00", "/pay\0", "/a%0Ab", "/a%0db", "/a\tb", "/a%7F", "/a%C2%85", "/a\u{9f}",
        ] {
            assert_eq!(refused(raw), PathErrorKind::ControlCharacter, "{raw:?}");
        }
    }

    #[test]
    fn refuses_decoded_bytes_that_are_not_utf8() {
        for raw in [
            "/%FF",
            "/a%C3",
            "/%C0%AE%C0%AE/pay",
            "/%E2%82",
            "/%ED%A0%80",
        ] {
            assert_eq!(refused(raw), PathErrorKind::NotUtf8, "{raw:?}");
        }
    }

    #[test]
    fn refuses_dot_segments_literal_or_encoded() {
        for raw in [
            "/.",
            "/..",
            "/./pay",
            "/a/../pay",
            "/a/.",
            "/a/../",
            "/%2E",
            "/%2e%2E/pay",
            "/.%2e/pay",
            "/%2E./pay",
            "/a/%2e/",
        ] {
            assert_eq!(refused(raw), PathErrorKind::DotSegment, "{raw:?}");
        }
    }

    #[test]
    fn refuses_empty_segments() {
        for raw in ["//", "//pay", "/a//b", "/pay//", "///"] {
            assert_eq!(refused(raw), PathErrorKind::EmptySegment, "{raw:?}");
        }
    }

    #[test]
    fn error_says_why() {
        let err = normalize_path("/a%2Fb").unwrap_err();
        assert_eq!(err.reason(), "it has a percent-encoded `/` (%2F)");
        assert_eq!(
            err.to_string(),
            "the request path is ambiguous: it has a percent-encoded `/` (%2F)"
        );
        assert_eq!(err.kind().to_string(), err.reason());
    }

    /// Pieces that hit every rule, so random paths reach the interesting branches often.
    fn piece() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "/", "//", "a", "Z", "~", ".", "..", "%2E", "%2e", "%", "%7", "%70", "%2F", "%2f",
            "%25", "%5C", "\\", ";", "%3B", "%00", "\0", "%C3%A9", "é", "%FF", "%C0%AE", "?",
            "%3F", "+", "*", "%20", "\u{85}",
        ])
    }

    fn path_like() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::collection::vec(piece(), 0..12).prop_map(|pieces| pieces.concat()),
            prop::collection::vec(piece(), 0..12)
                .prop_map(|pieces| format!("/{}", pieces.concat())),
            any::<String>(),
            "/[a-zA-Z0-9%./;\\\\]{0,24}",
        ]
    }

    /// `path` with every byte of every segment percent-encoded, in mixed case.
    fn encode_all(path: &str, upper: &[bool]) -> String {
        let mut out = String::new();
        for (i, &byte) in path.as_bytes().iter().enumerate() {
            if byte == b'/' {
                out.push('/');
            } else if upper.get(i).copied().unwrap_or(true) {
                out.push_str(&format!("%{byte:02X}"));
            } else {
                out.push_str(&format!("%{byte:02x}"));
            }
        }
        out
    }

    proptest! {
        #[test]
        fn accepted_paths_normalise_to_themselves(raw in path_like()) {
            if let Ok(once) = normalize_path(&raw) {
                prop_assert!(once.starts_with('/') || once == "*");
                prop_assert!(!once.contains('%'));
                let twice = normalize_path(&once);
                prop_assert_eq!(twice.as_deref(), Ok(&*once));
                prop_assert!(matches!(twice, Ok(Cow::Borrowed(_))));
            }
        }

        #[test]
        fn encoding_an_accepted_path_decodes_back_to_it(
            raw in path_like(),
            upper in prop::collection::vec(any::<bool>(), 0..64),
        ) {
            // Whether a byte arrives literally or percent-encoded (in either case) makes no
            // difference to the path idem sees.
            if let Ok(once) = normalize_path(&raw)
                && once != "*"
            {
                let encoded = encode_all(&once, &upper);
                let decoded = normalize_path(&encoded);
                prop_assert_eq!(decoded.as_deref(), Ok(&*once));
            }
        }
    }
}
