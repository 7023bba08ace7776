//! How a record is laid out in the redb file.

use std::sync::Arc;
use std::time::SystemTime;

use idem_core::{
    Fingerprint, Record, RecordState, ScopedKey, StoreError, Stored, Token, from_unix_millis,
    unix_millis,
};
use redb::TableDefinition;
use serde::{Deserialize, Serialize};

/// Record rows by [`ScopedKey::digest`].
pub(crate) const RECORDS: TableDefinition<'static, &[u8], &[u8]> =
    TableDefinition::new("idem_records_v1");
/// Expiry index: big-endian millis until which the record is kept (see [`Row::kept_ms`]),
/// followed by the digest, so a range scan from the start finds the oldest first.
pub(crate) const EXPIRY: TableDefinition<'static, &[u8], ()> =
    TableDefinition::new("idem_expiry_v1");
/// Claim index of in-flight records: big-endian millis of the claim, followed by the
/// digest, so the oldest claims come first (for [`Store::in_flight`](idem_core::Store::in_flight)).
/// Rows of the first two formats have no claim time and no entry here.
pub(crate) const CLAIMS: TableDefinition<'static, &[u8], ()> =
    TableDefinition::new("idem_claims_v1");
/// Store-wide counters.
pub(crate) const META: TableDefinition<'static, &str, u64> = TableDefinition::new("idem_meta_v1");
/// The last fencing token handed out, store-wide, so tokens grow per key across releases,
/// expiry and sweeps.
pub(crate) const LAST_TOKEN: &str = "last_token";

/// Rows written before in-flight records were kept past their lease.
const ROW_FORMAT_V1: u8 = 1;
/// Rows written before claim times were kept.
const ROW_FORMAT_V2: u8 = 2;
const ROW_FORMAT: u8 = 3;

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
    /// When the current token claimed the key; 0 when unknown (a row of an older format).
    claimed_ms: u64,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct RowV2 {
    scope: String,
    key: String,
    fingerprint: [u8; 32],
    token: u64,
    expires_ms: u64,
    outcome: Option<Stored>,
    kept_ms: u64,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct RowV1 {
    scope: String,
    key: String,
    fingerprint: [u8; 32],
    token: u64,
    expires_ms: u64,
    outcome: Option<Stored>,
}

/// A record as the file holds it, and until when it is kept.
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

    /// Its claim-index entry, if it is in flight with a known claim time.
    pub(crate) fn claim_entry(&self, digest: &[u8; 32]) -> Option<[u8; 40]> {
        let in_flight = matches!(self.record.state, RecordState::InFlight { .. });
        (in_flight && self.claimed_ms > 0).then(|| expiry_entry(digest, self.claimed_ms))
    }
}

pub(crate) fn encode(
    key: &ScopedKey,
    record: &Record,
    kept_until: SystemTime,
    claimed_ms: u64,
) -> Result<Vec<u8>, StoreError> {
    let (expires_ms, outcome) = match &record.state {
        RecordState::InFlight { lease_expires_at } => (unix_millis(*lease_expires_at), None),
        RecordState::Completed { stored, expires_at } => {
            (unix_millis(*expires_at), Some(Stored::clone(stored)))
        }
    };
    let row = Row {
        scope: key.scope().as_str().to_owned(),
        key: key.key().as_str().to_owned(),
        fingerprint: *record.fingerprint.as_bytes(),
        token: record.token.get(),
        expires_ms,
        outcome,
        kept_ms: unix_millis(kept_until).max(expires_ms),
        claimed_ms,
    };
    postcard::to_extend(&row, vec![ROW_FORMAT])
        .map_err(|e| StoreError::backend("encode a record", e))
}

pub(crate) fn decode(bytes: &[u8]) -> Result<Kept, StoreError> {
    let row: Row = match bytes.split_first() {
        Some((&ROW_FORMAT, rest)) => postcard::from_bytes(rest).map_err(StoreError::corrupt)?,
        Some((&ROW_FORMAT_V2, rest)) => {
            let old: RowV2 = postcard::from_bytes(rest).map_err(StoreError::corrupt)?;
            Row {
                scope: old.scope,
                key: old.key,
                fingerprint: old.fingerprint,
                token: old.token,
                expires_ms: old.expires_ms,
                outcome: old.outcome,
                kept_ms: old.kept_ms,
                claimed_ms: 0,
            }
        }
        Some((&ROW_FORMAT_V1, rest)) => {
            let old: RowV1 = postcard::from_bytes(rest).map_err(StoreError::corrupt)?;
            Row {
                scope: old.scope,
                key: old.key,
                fingerprint: old.fingerprint,
                token: old.token,
                expires_ms: old.expires_ms,
                outcome: old.outcome,
                // Its expiry-index entry is at the expiry: keep it until then, as before.
                kept_ms: old.expires_ms,
                claimed_ms: 0,
            }
        }
        _ => {
            return Err(StoreError::corrupt(
                "unknown record format in the redb file",
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

/// The expiry-index entry of a record kept until `kept_ms` (and the claim-index entry of a
/// record claimed at that millisecond: both are the time, then the digest).
pub(crate) fn expiry_entry(digest: &[u8; 32], kept_ms: u64) -> [u8; 40] {
    let mut entry = [0u8; 40];
    entry[..8].copy_from_slice(&kept_ms.to_be_bytes());
    entry[8..].copy_from_slice(digest);
    entry
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use idem_core::{Key, Scope};

    use super::*;

    fn in_flight(expires_ms: u64) -> Record {
        Record {
            fingerprint: Fingerprint::from_bytes([7; 32]),
            token: Token::new(9),
            state: RecordState::InFlight {
                lease_expires_at: from_unix_millis(expires_ms),
            },
        }
    }

    #[test]
    fn an_in_flight_row_is_kept_past_its_lease() {
        let key = ScopedKey::new(Scope::new("s"), Key::new("k").unwrap());
        let record = in_flight(10_000);
        let kept_until = from_unix_millis(10_000) + Duration::from_secs(10);
        let kept = decode(&encode(&key, &record, kept_until, 5_000).unwrap()).unwrap();
        assert_eq!(kept.claimed_ms, 5_000);
        assert_eq!(kept.key, Some(key));
        assert_eq!(kept.record, record);
        assert_eq!(kept.kept_ms, 20_000);
        assert!(kept.at(from_unix_millis(19_999)).is_some());
        assert!(kept.at(from_unix_millis(20_000)).is_none());
    }

    #[test]
    fn rows_of_the_second_format_have_no_claim_time_and_no_claim_entry() {
        let old = RowV2 {
            scope: "s".into(),
            key: "k".into(),
            fingerprint: [7; 32],
            token: 9,
            expires_ms: 10_000,
            outcome: None,
            kept_ms: 20_000,
        };
        let bytes = postcard::to_extend(&old, vec![ROW_FORMAT_V2]).unwrap();
        let kept = decode(&bytes).unwrap();
        assert_eq!(kept.record, in_flight(10_000));
        assert_eq!((kept.kept_ms, kept.claimed_ms), (20_000, 0));
        assert_eq!(kept.claim_entry(&[1; 32]), None, "not listed as stuck");
        let claimed = Kept {
            claimed_ms: 5_000,
            ..kept
        };
        assert!(claimed.claim_entry(&[1; 32]).is_some());
    }

    #[test]
    fn rows_of_the_first_format_are_read_and_kept_until_their_expiry() {
        let old = RowV1 {
            scope: "s".into(),
            key: "k".into(),
            fingerprint: [7; 32],
            token: 9,
            expires_ms: 10_000,
            outcome: None,
        };
        let bytes = postcard::to_extend(&old, vec![ROW_FORMAT_V1]).unwrap();
        let kept = decode(&bytes).unwrap();
        assert_eq!(kept.record, in_flight(10_000));
        assert_eq!(kept.kept_ms, 10_000, "matches its expiry-index entry");
    }
}
