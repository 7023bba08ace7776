//! Idempotency keys, tenant scopes, and the pair that names a record.

use std::fmt;

/// The longest key [`Key::parse`] accepts: the draft and Stripe both cap keys at 255 characters.
pub const DEFAULT_MAX_KEY_LEN: usize = 255;

/// A validated idempotency key: 1 to `max_len` characters of printable ASCII (0x20..=0x7E).
///
/// A header value may carry the key as an RFC 8941 sf-string (`"abc"`, with `\"` and `\\`
/// escapes; the IETF draft's form) or as a bare value (`abc`, Stripe's form). Both forms
/// name the same key, so `"abc"` and `abc` are one key. Surrounding whitespace is not part
/// of a bare key.
///
/// ```
/// use idem_core::Key;
///
/// let quoted = Key::parse(br#""order-1\"a""#).unwrap();
/// let bare = Key::parse(br#"order-1"a"#).unwrap();
/// assert_eq!(quoted, bare);
/// assert_eq!(quoted.as_str(), r#"order-1"a"#);
///
/// assert!(Key::parse(b"").is_err());
/// assert!(Key::parse("caf\u{e9}".as_bytes()).is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(Box<str>);

/// Why a header value is not a usable idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The value is empty (or only whitespace, or the empty sf-string `""`).
    #[error("idempotency key is empty")]
    Empty,
    /// The key is longer than allowed.
    #[error("idempotency key is {len} characters long; at most {max} are allowed")]
    TooLong {
        /// Length of the key, in characters.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// A byte outside printable ASCII.
    #[error(
        "idempotency key has a byte that is not printable ASCII (0x{byte:02x}) at position {position}"
    )]
    NotPrintableAscii {
        /// Zero-based byte position in the key.
        position: usize,
        /// The offending byte.
        byte: u8,
    },
    /// The value starts with `"` but is not a valid RFC 8941 sf-string.
    #[error("idempotency key is not a valid structured-field string: {reason}")]
    BadSfString {
        /// What the structured-field parser objected to.
        reason: String,
    },
}

impl Key {
    /// Parses a header value with the default length limit ([`DEFAULT_MAX_KEY_LEN`]).
    pub fn parse(value: &[u8]) -> Result<Self, KeyError> {
        Self::parse_with_max_len(value, DEFAULT_MAX_KEY_LEN)
    }

    /// Parses a header value, allowing keys of up to `max_len` characters.
    ///
    /// ```
    /// use idem_core::{Key, KeyError};
    ///
    /// let err = Key::parse_with_max_len(b"abcdef", 4).unwrap_err();
    /// assert_eq!(err, KeyError::TooLong { len: 6, max: 4 });
    /// ```
    pub fn parse_with_max_len(value: &[u8], max_len: usize) -> Result<Self, KeyError> {
        let value = value.trim_ascii();
        if value.first() == Some(&b'"') {
            let item: sfv::Item =
                sfv::Parser::new(value)
                    .parse()
                    .map_err(|e| KeyError::BadSfString {
                        reason: e.to_string(),
                    })?;
            match item.bare_item.as_string() {
                Some(s) => Self::new_with_max_len(s.as_str(), max_len),
                None => Err(KeyError::BadSfString {
                    reason: "the item is not a string".to_owned(),
                }),
            }
        } else {
            Self::check(value, max_len)?;
            // `check` admitted only ASCII, where each byte is its own char.
            Ok(Self(value.iter().map(|&b| char::from(b)).collect()))
        }
    }

    /// Makes a key from its literal text, without sf-string unquoting.
    ///
    /// ```
    /// use idem_core::Key;
    ///
    /// assert_eq!(Key::new("a b").unwrap().as_str(), "a b");
    /// assert!(Key::new("tab\there").is_err());
    /// ```
    pub fn new(text: &str) -> Result<Self, KeyError> {
        Self::new_with_max_len(text, DEFAULT_MAX_KEY_LEN)
    }

    /// Like [`Key::new`], with a custom length limit.
    pub fn new_with_max_len(text: &str, max_len: usize) -> Result<Self, KeyError> {
        Self::check(text.as_bytes(), max_len)?;
        Ok(Self(text.into()))
    }

    /// A key as a store kept it: checked like [`Key::new`] but of any length, since the
    /// policy that admitted it may allow more than the default (`max_key_len`).
    ///
    /// ```
    /// use idem_core::Key;
    ///
    /// assert!(Key::from_stored(&"k".repeat(300)).is_ok());
    /// assert!(Key::from_stored("tab\there").is_err());
    /// ```
    pub fn from_stored(text: &str) -> Result<Self, KeyError> {
        Self::new_with_max_len(text, usize::MAX)
    }

    fn check(bytes: &[u8], max_len: usize) -> Result<(), KeyError> {
        if bytes.is_empty() {
            return Err(KeyError::Empty);
        }
        if let Some(position) = bytes.iter().position(|b| !(0x20..=0x7e).contains(b)) {
            return Err(KeyError::NotPrintableAscii {
                position,
                byte: bytes[position],
            });
        }
        if bytes.len() > max_len {
            return Err(KeyError::TooLong {
                len: bytes.len(),
                max: max_len,
            });
        }
        Ok(())
    }

    /// The key's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({:?})", &*self.0)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tenant namespace. Keys in different scopes never meet: the same key sent by two
/// tenants names two records.
///
/// ```
/// use idem_core::Scope;
///
/// let a = Scope::from_secret(b"Bearer sk_live_a");
/// let b = Scope::from_secret(b"Bearer sk_live_b");
/// assert_ne!(a, b);
/// // The credential itself is never kept, only its hash.
/// assert!(!a.as_str().contains("sk_live"));
/// assert_eq!(Scope::anonymous().as_str(), "anonymous");
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope(Box<str>);

const ANONYMOUS: &str = "anonymous";

impl Scope {
    /// A scope with a name you choose (a tenant id, a consumer group, a queue name).
    pub fn new(name: impl Into<String>) -> Self {
        Self(name.into().into_boxed_str())
    }

    /// The scope of callers that present no identity.
    pub fn anonymous() -> Self {
        Self::new(ANONYMOUS)
    }

    /// Whether this is [`anonymous`](Self::anonymous), without building one to compare.
    ///
    /// ```
    /// use idem_core::Scope;
    ///
    /// assert!(Scope::anonymous().is_anonymous());
    /// assert!(!Scope::new("tenant-a").is_anonymous());
    /// ```
    pub fn is_anonymous(&self) -> bool {
        &*self.0 == ANONYMOUS
    }

    /// How logs name the scope: the first 8 bytes of its BLAKE3 hash in hex, so a log shows
    /// which requests share a caller without the scope (a credential's digest) itself.
    ///
    /// ```
    /// use idem_core::Scope;
    ///
    /// let scope = Scope::new("tenant-a");
    /// assert_eq!(scope.log_id().len(), 16);
    /// assert_eq!(scope.log_id(), Scope::new("tenant-a").log_id());
    /// assert_ne!(scope.log_id(), Scope::new("tenant-b").log_id());
    /// ```
    pub fn log_id(&self) -> String {
        short_hex(blake3::hash(self.0.as_bytes()).as_bytes())
    }

    /// A scope derived from a credential (an `Authorization` value, an API key): its BLAKE3
    /// hash, so that the stored scope does not reveal the credential.
    pub fn from_secret(secret: &[u8]) -> Self {
        Self::from_keyed_secret(&Self::key_from_secret(b""), secret)
    }

    /// The 32-byte hashing key for [`from_keyed_secret`](Self::from_keyed_secret), derived
    /// from a configured secret of any length (empty: an unkeyed, but still domain
    /// separated, hash).
    pub fn key_from_secret(secret: &[u8]) -> [u8; 32] {
        blake3::derive_key("idem 2026 scope hashing key", secret)
    }

    /// A scope derived from a credential, hashed with a key only the operator has (see
    /// [`key_from_secret`](Self::key_from_secret)): a dump of the store then does not allow
    /// testing guessed credentials offline.
    ///
    /// ```
    /// use idem_core::Scope;
    ///
    /// let key = Scope::key_from_secret(b"from IDEM_SCOPE_SECRET");
    /// let other = Scope::key_from_secret(b"another deployment");
    /// let credential = b"Bearer sk_live_a";
    /// assert_ne!(Scope::from_keyed_secret(&key, credential), Scope::from_keyed_secret(&other, credential));
    /// assert!(!Scope::from_keyed_secret(&key, credential).as_str().contains("sk_live"));
    /// ```
    pub fn from_keyed_secret(key: &[u8; 32], credential: &[u8]) -> Self {
        let hash = blake3::keyed_hash(key, credential);
        let mut name = String::with_capacity(4 + 32);
        name.push_str("cred");
        for byte in &hash.as_bytes()[..16] {
            name.push_str(&format!("{byte:02x}"));
        }
        Self(name.into_boxed_str())
    }

    /// The scope's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scope({:?})", &*self.0)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The name of a record: a key within its scope.
///
/// ```
/// use idem_core::{Key, Scope, ScopedKey};
///
/// let key = Key::new("order-1").unwrap();
/// let a = ScopedKey::new(Scope::new("tenant-a"), key.clone());
/// let b = ScopedKey::new(Scope::new("tenant-b"), key);
/// assert_ne!(a.digest(), b.digest());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScopedKey {
    scope: Scope,
    key: Key,
}

impl ScopedKey {
    /// Names the record for `key` within `scope`.
    pub fn new(scope: Scope, key: Key) -> Self {
        Self { scope, key }
    }

    /// The tenant namespace.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The key within the scope.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// A fixed-size, collision-resistant id for the pair, for stores that want a compact
    /// primary key. Scope and key are length-prefixed before hashing, so no choice of
    /// characters in either can make two different pairs share a digest.
    pub fn digest(&self) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new_derive_key("idem 2026 scoped key");
        hasher.update(&(self.scope.0.len() as u64).to_le_bytes());
        hasher.update(self.scope.0.as_bytes());
        hasher.update(self.key.0.as_bytes());
        *hasher.finalize().as_bytes()
    }

    /// How logs name the pair: the first 8 bytes of [`digest`](Self::digest) in hex, enough
    /// to tell requests apart and follow one, without writing a client's key (which may be
    /// guessable or carry data) or its scope into a log.
    ///
    /// ```
    /// use idem_core::{Key, Scope, ScopedKey};
    ///
    /// let key = ScopedKey::new(Scope::new("tenant-a"), Key::new("order-42").unwrap());
    /// let shown = key.log_id();
    /// assert_eq!(shown.len(), 16);
    /// assert!(!shown.contains("order-42"));
    /// ```
    pub fn log_id(&self) -> String {
        short_hex(&self.digest())
    }
}

/// The first 8 bytes of a digest in hex: enough to tell requests apart in logs.
fn short_hex(digest: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(16);
    for byte in &digest[..8] {
        hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
        hex.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    hex
}

impl fmt::Debug for ScopedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}/{:?}", &*self.scope.0, &*self.key.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_hex_is_the_first_eight_bytes_in_lower_case() {
        let digest: Vec<u8> = (0_u8..32)
            .map(|i| i.wrapping_mul(37).wrapping_add(5))
            .collect();
        let expected: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(short_hex(&digest), expected);
        assert_eq!(short_hex(&[0; 32]), "0000000000000000");
        assert_eq!(short_hex(&[0xff; 8]), "ffffffffffffffff");
    }

    #[test]
    fn sf_string_and_bare_token_are_one_key() {
        assert_eq!(Key::parse(b"\"abc\"").unwrap(), Key::parse(b"abc").unwrap());
        assert_eq!(
            Key::parse(br#""a\\b\"c""#).unwrap().as_str(),
            r#"a\b"c"#,
            "sf-string escapes are decoded"
        );
        assert_eq!(Key::parse(b"  abc \t").unwrap().as_str(), "abc");
    }

    #[test]
    fn malformed_values_name_what_is_wrong() {
        assert_eq!(Key::parse(b""), Err(KeyError::Empty));
        assert_eq!(Key::parse(b"   "), Err(KeyError::Empty));
        assert_eq!(Key::parse(b"\"\""), Err(KeyError::Empty));
        assert_eq!(
            Key::parse(b"ab\x01c"),
            Err(KeyError::NotPrintableAscii {
                position: 2,
                byte: 1
            })
        );
        assert!(matches!(
            Key::parse(b"\"unterminated"),
            Err(KeyError::BadSfString { .. })
        ));
        assert!(matches!(
            Key::parse(b"\"bad\\escape\""),
            Err(KeyError::BadSfString { .. })
        ));
        assert!(matches!(
            Key::parse(b"\"a\" trailing"),
            Err(KeyError::BadSfString { .. })
        ));
    }

    #[test]
    fn length_limit_counts_the_decoded_key() {
        let longest = "k".repeat(255);
        assert!(Key::parse(longest.as_bytes()).is_ok());
        assert!(Key::parse(format!("\"{longest}\"").as_bytes()).is_ok());
        assert_eq!(
            Key::parse(format!("{longest}k").as_bytes()),
            Err(KeyError::TooLong { len: 256, max: 255 })
        );
    }

    #[test]
    fn non_ascii_is_rejected_not_panicking() {
        assert!(matches!(
            Key::parse("ключ".as_bytes()),
            Err(KeyError::NotPrintableAscii { position: 0, .. })
        ));
        assert!(Key::parse(b"\"\xff\"").is_err());
    }
}
