//! What a store keeps per key, and what `begin` answers.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::store::StoreError;
use crate::{Fingerprint, ScopedKey};

/// A fencing token. Each claim of a key gets a larger token than any earlier claim of that
/// key, so a holder whose lease was taken over can be told apart from the new holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(u64);

impl Token {
    /// Wraps a number a store minted.
    pub fn new(value: u64) -> Self {
        Self(value)
    }

    /// The number, for stores.
    pub fn get(self) -> u64 {
        self.0
    }
}

/// The right to execute a key's operation until `expires_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Proves the holder to `complete`, `release` and `renew`.
    pub token: Token,
    /// After this instant the lease is lost and another `begin` may take the key over.
    pub expires_at: SystemTime,
}

/// The outcome kept for replay: an HTTP response, or a message handler's result.
///
/// ```
/// use idem_core::Stored;
///
/// let stored = Stored::new(201)
///     .with_header("content-type", "application/json")
///     .with_body(r#"{"id":"ch_1"}"#);
/// let bytes = stored.encode();
/// assert_eq!(Stored::decode(&bytes).unwrap(), stored);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    /// HTTP status, or a handler's own result code.
    pub status: u16,
    /// Response headers worth replaying (or handler metadata), in order.
    pub headers: Vec<(String, Bytes)>,
    /// The body; `None` when the operation completed but its output was too large to keep.
    pub body: Option<Bytes>,
}

/// Leading byte of [`Stored::encode`]'s output, so the format can change without misreading.
const STORED_FORMAT: u8 = 1;

impl Stored {
    /// An outcome with this status, no headers and an empty body.
    pub fn new(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Some(Bytes::new()),
        }
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body.
    pub fn with_body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// Marks the body as not kept: the operation completed, but a replay cannot return it.
    pub fn without_body(mut self) -> Self {
        self.body = None;
        self
    }

    /// A compact, versioned byte form, for stores that keep the outcome as one value.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing strings, bytes and integers into a Vec cannot fail; were it ever to,
        // the empty output decodes as corrupt rather than as a wrong outcome.
        let out: Vec<u8> = postcard::to_extend(self, vec![STORED_FORMAT]).unwrap_or_default();
        out
    }

    /// Reads what [`Stored::encode`] wrote.
    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        match bytes.split_first() {
            Some((&STORED_FORMAT, rest)) => postcard::from_bytes(rest).map_err(StoreError::corrupt),
            Some((format, _)) => Err(StoreError::corrupt(format!(
                "unknown stored-outcome format {format}"
            ))),
            None => Err(StoreError::corrupt("empty stored outcome")),
        }
    }
}

/// A key's record, as [`Store::get`](crate::Store::get) reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The fingerprint of the request that claimed the key.
    pub fingerprint: Fingerprint,
    /// The token of the latest claim.
    pub token: Token,
    /// In flight or completed.
    pub state: RecordState,
}

/// Where a record is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordState {
    /// Claimed; the operation may be running.
    InFlight {
        /// When the lease ends and the key may be taken over.
        lease_expires_at: SystemTime,
    },
    /// Done; the outcome is replayed until `expires_at`.
    Completed {
        /// What is replayed.
        stored: Arc<Stored>,
        /// End of retention: after it the key is forgotten.
        expires_at: SystemTime,
    },
}

impl Record {
    /// When this record stops counting: lease end or retention end.
    pub fn expires_at(&self) -> SystemTime {
        match &self.state {
            RecordState::InFlight { lease_expires_at } => *lease_expires_at,
            RecordState::Completed { expires_at, .. } => *expires_at,
        }
    }

    /// Whether the record still counts at `now`. An expired record is as good as absent.
    pub fn is_live(&self, now: SystemTime) -> bool {
        now < self.expires_at()
    }
}

/// A key held in flight, as [`Store::in_flight`](crate::Store::in_flight) lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlightRecord {
    /// The key, with its scope as stored.
    pub key: ScopedKey,
    /// The holder's token.
    pub token: Token,
    /// When the current holder claimed the key (renewals do not move it).
    pub claimed_at: SystemTime,
    /// When the holder's lease ends, unless it renews.
    pub lease_expires_at: SystemTime,
}

/// What [`Store::begin`](crate::Store::begin) answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// The caller holds the key: run the operation, then `complete` or `release`.
    Acquired(Lease),
    /// Another caller holds the key; ask again after `retry_after`.
    InFlight {
        /// Time left on the holder's lease (never zero).
        retry_after: Duration,
    },
    /// The operation already completed: replay this, do not run it again.
    Completed {
        /// The outcome to replay.
        stored: Arc<Stored>,
        /// When the key will be forgotten.
        expires_at: SystemTime,
    },
    /// The key was used for a different request (another fingerprint).
    Mismatch,
}
