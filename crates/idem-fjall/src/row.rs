//! How a record and its index entries are laid out in the keyspaces.

use std::sync::Arc;
use std::time::SystemTime;

use idem_core::{
    Fingerprint, Record, RecordState, ScopedKey, StoreError, Stored, Token, from_unix_millis,
    unix_millis,
};
use serde::{Deserialize, Serialize};

/// Record rows by [`ScopedKey::digest`].
pub(crate) const RECORDS: &str = "idem_records_v1";
/// Expiry index: big-endian millis until which the record is kept, then the digest, so a
/// range scan from the start finds the oldest first. Values are empty.
pub(crate) const EXPIRY: &str = "idem_expiry_v1";
/// Claim index of in-flight records: big-endian millis of the claim, then the digest.
pub(crate) const CLAIMS: &str = "idem_claims_v1";
/// Store-wide counters.
pub(crate) const META: &str = "idem_meta_v1";
/// The last fencing token handed out, store-wide, so tokens grow per key across releases,
/// expiry and sweeps.
pub(crate) const LAST_TOKEN: &[u8] = b"last_token";

const ROW_FORMAT: u8 = 1;

pub(crate) type Digest = [u8; 32];
pub(crate) type Entry = [u8; 40];

#[derive(Serialize, Deserialize)]
struct Row {
    // Scope and key are kept beside the digest so records can be listed and inspected.
    scope: String,
    key: String,
    fingerprint: [u8; 32],
    token: u64,
    expires_ms: u64,
    // None while in flight.
    outcome: Option<Stored>,
    /// Until when the record is kept: one lease length past the lease end while in flight
    /// (so the holder's late complete finds it), the retention end once completed.
    kept_ms: u64,
    /// When the current token claimed the key.
    claimed_ms: u64,
}

/// A record as the store holds it, and until when it is kept.
#[derive(Debug, Clone)]
pub(crate) struct Kept {
    pub(crate) record: Record,
    pub(crate) kept_ms: u64,
    pub(crate) claimed_ms: u64,
    pub(crate) key: Option<ScopedKey>,
}

impl Kept {
    /// The record, if it is still kept at `now` (live, or in flight past its lease but
    /// within one more lease length).
    pub(crate) fn at(&self, now: SystemTime) -> Option<&Record> {
        (unix_millis(now) < self.kept_ms).then_some(&self.record)
    }

    /// Its claim-index entry, if it is in flight.
    pub(crate) fn claim_entry(&self, digest: &Digest) -> Option<Entry> {
        matches!(self.record.state, RecordState::InFlight { .. })
            .then(|| entry(self.claimed_ms, digest))
    }

    /// Its expiry-index entry.
    pub(crate) fn expiry_entry(&self, digest: &Digest) -> Entry {
        entry(self.kept_ms, digest)
    }
}

pub(crate) fn encode(key: &ScopedKey, kept: &Kept) -> Result<Vec<u8>, StoreError> {
    let (expires_ms, outcome) = match &kept.record.state {
        RecordState::InFlight { lease_expires_at } => (unix_millis(*lease_expires_at), None),
        RecordState::Completed { stored, expires_at } => {
            (unix_millis(*expires_at), Some(Stored::clone(stored)))
        }
    };
    let row = Row {
        scope: key.scope().as_str().to_owned(),
        key: key.key().as_str().to_owned(),
        fingerprint: *kept.record.fingerprint.as_bytes(),
        token: kept.record.token.get(),
        expires_ms,
        outcome,
        kept_ms: kept.kept_ms,
        claimed_ms: kept.claimed_ms,
    };
    postcard::to_extend(&row, vec![ROW_FORMAT])
        .map_err(|e| StoreError::backend("encode a record", e))
}

pub(crate) fn decode(bytes: &[u8]) -> Result<Kept, StoreError> {
    let row: Row = match bytes.split_first() {
        Some((&ROW_FORMAT, rest)) => postcard::from_bytes(rest).map_err(StoreError::corrupt)?,
        _ => {
            return Err(StoreError::corrupt(
                "unknown record format in the fjall store",
            ));
        }
    };
    let expires_at = from_unix_millis(row.expires_ms);
    let record = Record {
        fingerprint: Fingerprint::from_bytes(row.fingerprint),
        token: Token::new(row.token),
        state: match row.outcome {
            None => RecordState::InFlight {
                lease_expires_at: expires_at,
            },
            Some(stored) => RecordState::Completed {
                stored: Arc::new(stored),
                expires_at,
            },
        },
    };
    let key = idem_core::Key::from_stored(&row.key)
        .ok()
        .map(|key| ScopedKey::new(idem_core::Scope::new(row.scope), key));
    Ok(Kept {
        record,
        kept_ms: row.kept_ms,
        claimed_ms: row.claimed_ms,
        key,
    })
}

/// An index entry: the time, big-endian so entries sort by it, then the digest.
pub(crate) fn entry(millis: u64, digest: &Digest) -> Entry {
    let mut entry = [0u8; 40];
    entry[..8].copy_from_slice(&millis.to_be_bytes());
    entry[8..].copy_from_slice(digest);
    entry
}

/// The time and digest of an index entry, if it is one.
pub(crate) fn split_entry(bytes: &[u8]) -> Option<(u64, Digest)> {
    let time: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    let digest: Digest = bytes.get(8..)?.try_into().ok()?;
    Some((u64::from_be_bytes(time), digest))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use idem_core::{Key, Scope};

    use super::*;

    #[test]
    fn a_row_reads_back_with_its_key_and_times() {
        let key = ScopedKey::new(Scope::new("s"), Key::new("k").unwrap());
        let record = Record {
            fingerprint: Fingerprint::from_bytes([7; 32]),
            token: Token::new(9),
            state: RecordState::InFlight {
                lease_expires_at: from_unix_millis(10_000),
            },
        };
        let kept = Kept {
            record: record.clone(),
            kept_ms: 20_000,
            claimed_ms: 5_000,
            key: None,
        };
        let back = decode(&encode(&key, &kept).unwrap()).unwrap();
        assert_eq!(back.record, record);
        assert_eq!((back.kept_ms, back.claimed_ms), (20_000, 5_000));
        assert_eq!(back.key, Some(key));
        assert!(back.at(from_unix_millis(19_999)).is_some());
        assert!(
            back.at(from_unix_millis(10_000) + Duration::from_secs(10))
                .is_none()
        );
        let digest = [3; 32];
        assert_eq!(
            split_entry(&back.expiry_entry(&digest)),
            Some((20_000, digest))
        );
        assert_eq!(
            back.claim_entry(&digest).and_then(|e| split_entry(&e)),
            Some((5_000, digest))
        );
    }

    #[test]
    fn entries_sort_by_time() {
        assert!(entry(1, &[9; 32]) < entry(2, &[0; 32]));
        assert!(entry(256, &[0; 32]) > entry(255, &[9; 32]));
    }
}
