//! Request fingerprints: what makes a retry "the same request".

use std::fmt;

/// A BLAKE3 hash of the parts that make two requests the same request.
///
/// A key is bound to the fingerprint of the first request that used it; a later request
/// with the same key and another fingerprint is a mismatch, never a replay.
///
/// ```
/// use idem_core::Fingerprint;
///
/// let a = Fingerprint::builder().part("method", b"POST").part("body", b"{}").finish();
/// let b = Fingerprint::builder().part("method", b"POST").part("body", b"{}").finish();
/// let c = Fingerprint::builder().part("method", b"PATCH").part("body", b"{}").finish();
/// assert_eq!(a, b);
/// assert_ne!(a, c);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Starts a fingerprint; feed it labelled parts in a fixed order.
    pub fn builder() -> FingerprintBuilder {
        FingerprintBuilder {
            hasher: blake3::Hasher::new_derive_key("idem 2026 request fingerprint"),
        }
    }

    /// Rebuilds a fingerprint from bytes a store kept.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The hash bytes, for stores.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in &self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// Collects the parts of a [`Fingerprint`].
///
/// Every part is framed by its label and length, so moving bytes from one part to the next
/// (`path=/a` + `body=b` versus `path=/ab` + `body=`) changes the fingerprint.
#[derive(Debug, Clone)]
pub struct FingerprintBuilder {
    hasher: blake3::Hasher,
}

impl FingerprintBuilder {
    /// Adds one labelled part.
    pub fn part(mut self, label: &str, value: &[u8]) -> Self {
        self.push(label, value);
        self
    }

    /// Adds one labelled part in place, for loops.
    ///
    /// ```
    /// use idem_core::Fingerprint;
    ///
    /// let mut builder = Fingerprint::builder();
    /// for (name, value) in [("content-type", "application/json")] {
    ///     builder.push(name, value.as_bytes());
    /// }
    /// let _fingerprint = builder.finish();
    /// ```
    pub fn push(&mut self, label: &str, value: &[u8]) {
        self.hasher.update(&(label.len() as u64).to_le_bytes());
        self.hasher.update(label.as_bytes());
        self.hasher.update(&(value.len() as u64).to_le_bytes());
        self.hasher.update(value);
    }

    /// The fingerprint of everything added.
    pub fn finish(self) -> Fingerprint {
        Fingerprint(*self.hasher.finalize().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moving_bytes_between_parts_changes_the_fingerprint() {
        let a = Fingerprint::builder()
            .part("path", b"/a")
            .part("body", b"b")
            .finish();
        let b = Fingerprint::builder()
            .part("path", b"/ab")
            .part("body", b"")
            .finish();
        assert_ne!(a, b);
    }

    #[test]
    fn round_trips_through_bytes() {
        let a = Fingerprint::builder().part("x", b"y").finish();
        assert_eq!(Fingerprint::from_bytes(*a.as_bytes()), a);
        assert_eq!(a.to_string().len(), 64);
    }
}
