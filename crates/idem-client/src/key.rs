//! [`OperationKey`]: the one key a logical operation keeps across every attempt.

use std::fmt;

use http::HeaderValue;
use idem_core::{Key, KeyError};

/// The idempotency key of one logical operation, kept across every attempt of it.
///
/// A key is generated ([`generate`](Self::generate), a UUIDv7: unique, and sorted by
/// creation time, which keeps store indexes tidy), given by the caller
/// ([`new`](Self::new), for a key the caller already persists, such as an order id), or
/// derived from a parent ([`derive`](Self::derive)) for each step of a fan-out, so that a
/// retried saga reuses every child key instead of minting new ones.
///
/// Keys follow the same rules idem's server side applies (see [`idem_core::Key`]): 1 to
/// 255 characters of printable ASCII.
///
/// ```
/// use idem_client::OperationKey;
///
/// let order = OperationKey::new("order-7")?;
/// let reserve = order.derive("reserve-stock");
/// assert_eq!(reserve, OperationKey::new("order-7")?.derive("reserve-stock"));
/// assert_ne!(reserve, order.derive("charge-card"));
///
/// let fresh = OperationKey::generate();
/// assert_ne!(fresh, OperationKey::generate());
/// assert!(OperationKey::new("").is_err());
/// # Ok::<(), idem_core::KeyError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct OperationKey(Key);

/// Separates derived keys from every other use of BLAKE3 in idem.
const DERIVE_CONTEXT: &str = "idem-client 2026 child operation key";

impl OperationKey {
    /// A new key: a UUIDv7 (time-ordered, 74 random bits).
    pub fn generate() -> Self {
        Self::from_uuid(uuid::Uuid::now_v7())
    }

    /// The caller's own key, checked as the server will check it.
    pub fn new(text: &str) -> Result<Self, KeyError> {
        Key::new(text).map(Self)
    }

    /// The key of the step `step` of this operation: the same parent and step always give
    /// the same key, in any process, so a retried fan-out reaches every step with the key
    /// that step had the first time. The result is a UUIDv8 made of a BLAKE3 hash of the
    /// parent key and the step name.
    ///
    /// ```
    /// use idem_client::OperationKey;
    ///
    /// let parent = OperationKey::new("order-7")?;
    /// assert_eq!(parent.derive("reserve-stock").as_str(), "b5292168-45c9-8bf0-ae00-60f4f1ea8e5d");
    /// // Steps of steps work too, and never meet a sibling's key.
    /// assert_ne!(parent.derive("a").derive("b"), parent.derive("b").derive("a"));
    /// # Ok::<(), idem_core::KeyError>(())
    /// ```
    pub fn derive(&self, step: &str) -> Self {
        let mut hasher = blake3::Hasher::new_derive_key(DERIVE_CONTEXT);
        // The length prefix keeps ("ab", "c") and ("a", "bc") apart.
        hasher.update(&(self.as_str().len() as u64).to_le_bytes());
        hasher.update(self.as_str().as_bytes());
        hasher.update(step.as_bytes());
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
        Self::from_uuid(uuid::Uuid::new_v8(bytes))
    }

    /// The key's text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The header value that carries this key so that the server reads back exactly this
    /// text: the bare key, or, when the bare form would be read differently (a leading `"`
    /// starts an sf-string; surrounding spaces are trimmed), the RFC 8941 sf-string.
    pub fn header_value(&self) -> HeaderValue {
        let text = self.as_str();
        let bare_is_exact = !text.starts_with('"') && text.trim_ascii() == text;
        let value = if bare_is_exact {
            HeaderValue::from_str(text)
        } else {
            let escaped = text.replace('\\', "\\\\").replace('"', "\\\"");
            HeaderValue::from_str(&format!("\"{escaped}\""))
        };
        // A key is printable ASCII, which is always a valid header value.
        value.expect("a key is printable ASCII")
    }

    /// The key a header value carries, read as the server reads it (either form).
    pub(crate) fn from_header(value: &HeaderValue) -> Result<Self, KeyError> {
        Key::parse(value.as_bytes()).map(Self)
    }

    fn from_uuid(uuid: uuid::Uuid) -> Self {
        let text = uuid.hyphenated().to_string();
        Self(Key::new(&text).expect("a UUID is a valid key"))
    }
}

impl fmt::Debug for OperationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OperationKey({:?})", self.as_str())
    }
}

impl fmt::Display for OperationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Key> for OperationKey {
    fn from(key: Key) -> Self {
        Self(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_uuid_v7_and_unique() {
        let keys: Vec<_> = (0..1000).map(|_| OperationKey::generate()).collect();
        for key in &keys {
            let uuid = uuid::Uuid::parse_str(key.as_str()).unwrap();
            assert_eq!(uuid.get_version_num(), 7, "{key}");
        }
        let mut unique = keys.clone();
        unique.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        unique.dedup();
        assert_eq!(unique.len(), keys.len());
    }

    #[test]
    fn derive_is_stable_and_separates_parents_and_steps() {
        let parent = OperationKey::new("order-7").unwrap();
        // Pinned: a change here would give every retried saga new child keys.
        assert_eq!(
            parent.derive("reserve-stock").as_str(),
            "b5292168-45c9-8bf0-ae00-60f4f1ea8e5d"
        );
        assert_eq!(parent.derive("x"), parent.clone().derive("x"));
        assert_ne!(parent.derive("x"), parent.derive("y"));
        let other = OperationKey::new("order-8").unwrap();
        assert_ne!(parent.derive("x"), other.derive("x"));
        let (ab, a) = (
            OperationKey::new("ab").unwrap(),
            OperationKey::new("a").unwrap(),
        );
        assert_ne!(ab.derive("c"), a.derive("bc"));
        let uuid = uuid::Uuid::parse_str(parent.derive("x").as_str()).unwrap();
        assert_eq!(uuid.get_version_num(), 8);
    }

    #[test]
    fn the_header_value_reads_back_as_the_same_key() {
        for text in [
            "plain",
            "\"quoted\"",
            " padded ",
            "a\"b\\c",
            "\"",
            "order 7",
        ] {
            let key = OperationKey::new(text).unwrap();
            let read = OperationKey::from_header(&key.header_value()).unwrap();
            assert_eq!(read, key, "{text:?} sent as {:?}", key.header_value());
        }
        let plain = OperationKey::new("plain").unwrap();
        assert_eq!(plain.header_value(), "plain", "bare when that is exact");
    }

    #[test]
    fn bad_caller_keys_are_refused_with_the_reason() {
        assert_eq!(OperationKey::new(""), Err(KeyError::Empty));
        assert!(matches!(
            OperationKey::new(&"k".repeat(256)),
            Err(KeyError::TooLong { len: 256, max: 255 })
        ));
        assert!(matches!(
            OperationKey::new("caf\u{e9}"),
            Err(KeyError::NotPrintableAscii { .. })
        ));
    }
}
