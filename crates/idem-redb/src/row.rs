//! How a record is laid out in the redb file.

use std::sync::Arc;

use idem::{
    Fingerprint, Record, RecordState, ScopedKey, StoreError, Stored, Token, from_unix_millis,
    unix_millis,
};
use redb::TableDefinition;
use serde::{Deserialize, Serialize};

/// Record rows by [`ScopedKey::digest`].
pub(crate) const RECORDS: TableDefinition<'static, &[u8], &[u8]> =
    TableDefinition::new("idem_records_v1");
/// Expiry index: big-endian expiry millis followed by the digest, so a range scan from the
/// start finds the oldest expiries first.
pub(crate) const EXPIRY: TableDefinition<'static, &[u8], ()> =
    TableDefinition::new("idem_expiry_v1");
/// Store-wide counters.
pub(crate) const META: TableDefinition<'static, &str, u64> = TableDefinition::new("idem_meta_v1");
/// The last fencing token handed out, store-wide, so tokens grow per key across releases,
/// expiry and sweeps.
pub(crate) const LAST_TOKEN: &str = "last_token";

const ROW_FORMAT: u8 = 1;

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
}

pub(crate) fn encode(key: &ScopedKey, record: &Record) -> Result<Vec<u8>, StoreError> {
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
    };
    postcard::to_extend(&row, vec![ROW_FORMAT])
        .map_err(|e| StoreError::backend("encode a record", e))
}

pub(crate) fn decode(bytes: &[u8]) -> Result<Record, StoreError> {
    let row: Row = match bytes.split_first() {
        Some((&ROW_FORMAT, rest)) => postcard::from_bytes(rest).map_err(StoreError::corrupt)?,
        _ => {
            return Err(StoreError::corrupt(
                "unknown record format in the redb file",
            ));
        }
    };
    let expires_at = from_unix_millis(row.expires_ms);
    Ok(Record {
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
    })
}

/// The expiry-index entry of a record.
pub(crate) fn expiry_entry(digest: &[u8; 32], record: &Record) -> [u8; 40] {
    let mut entry = [0u8; 40];
    entry[..8].copy_from_slice(&unix_millis(record.expires_at()).to_be_bytes());
    entry[8..].copy_from_slice(digest);
    entry
}
