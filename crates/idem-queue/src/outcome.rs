//! What happened to a delivery: the [`Outcome`] of processing it, the [`Replay`] of a
//! completed message returned to its duplicates, and the `status` codes kept in records.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use idem_core::{StoreError, Stored};

#[cfg(doc)]
use crate::DedupOptions;
use crate::{DeadLetterReason, HandlerError};

/// The `status` values this crate writes into a [`Stored`] outcome.
///
/// A message's record holds [`OK`](status::OK) and the handler's output as its body, or one
/// of the failure codes (the same codes as [`DeadLetterReason::code`]) and the error text in
/// an `error` header.
pub mod status {
    /// The handler succeeded; the body is its output.
    pub const OK: u16 = 0;
    /// The handler failed with an error it marked permanent.
    pub const FAILED: u16 = 1;
    /// The handler failed on the last allowed delivery.
    pub const GAVE_UP: u16 = 2;
    /// Only in dead-letter records: the id came back with another fingerprint.
    pub const MISMATCH: u16 = 3;
}

/// A completed message's kept outcome, returned for its duplicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    pub(crate) stored: Arc<Stored>,
    pub(crate) expires_at: SystemTime,
}

impl Replay {
    /// Whether the first run succeeded.
    pub fn succeeded(&self) -> bool {
        self.stored.status == status::OK
    }

    /// The stored status ([`status`]).
    pub fn status(&self) -> u16 {
        self.stored.status
    }

    /// The first run's output (or, after a failure, nothing).
    pub fn output(&self) -> Option<&Bytes> {
        self.stored.body.as_ref()
    }

    /// Why the first run failed, if it did.
    pub fn failure(&self) -> Option<DeadLetterReason> {
        DeadLetterReason::from_code(self.stored.status)
    }

    /// The first run's error text, if it failed.
    pub fn error(&self) -> Option<String> {
        self.stored
            .headers
            .iter()
            .find(|(name, _)| name == "error")
            .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
    }

    /// The whole stored outcome.
    pub fn stored(&self) -> &Stored {
        &self.stored
    }

    /// When the message will be forgotten.
    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }
}

/// What happened to one delivery.
#[derive(Debug)]
#[non_exhaustive]
pub enum Outcome {
    /// The handler ran now and succeeded; its output is stored. Acknowledge.
    Processed {
        /// The handler's output.
        output: Bytes,
    },
    /// A duplicate of a completed message: the handler did not run. Acknowledge (or, if the
    /// first run failed, treat as dead-lettered).
    Duplicate(Replay),
    /// Another consumer holds the message right now. Redeliver after `retry_after`.
    InFlight {
        /// Time left on the holder's lease.
        retry_after: Duration,
    },
    /// The id was completed or claimed with another fingerprint: the handler did not run.
    Mismatch,
    /// The handler failed transiently; the claim was released, so a redelivery runs it again.
    Released {
        /// The handler's error.
        error: HandlerError,
    },
    /// The handler failed permanently, or transiently on the last allowed delivery; the
    /// failure is stored, so the message is never run again. Dead-letter it.
    Failed {
        /// The handler's error.
        error: HandlerError,
        /// Permanent error or out of deliveries.
        reason: DeadLetterReason,
    },
    /// The handler panicked (the panic was caught). It counts as a failed run; the claim
    /// was released, or kept until its lease ends by [`PanicPolicy::Hold`](crate::PanicPolicy).
    /// Redeliver. On the last allowed run a panic is [`Outcome::Failed`] instead.
    Panicked {
        /// The panic, as a transient error with its text.
        error: HandlerError,
        /// Whether the claim was released (`false`: held until its lease ends).
        released: bool,
    },
    /// The claim was lost while the handler ran (its lease ended and another consumer took
    /// the message over), so its outcome was not stored. The handler's result is returned.
    LeaseLost {
        /// What the handler returned.
        result: Result<Bytes, HandlerError>,
    },
    /// The handler ran (succeeded, or failed for good), but its outcome could not be stored,
    /// even retried for [`DedupOptions::complete_for`] with the lease renewed meanwhile.
    ///
    /// The claim is **not released**: it stays held until its lease ends, so a redelivery
    /// until then is answered [`Outcome::InFlight`] and does not run the handler again. A
    /// redelivery after the lease ended finds no record and runs it again, so the adapters
    /// settle this like the outcome it could not store (a success is acknowledged) rather
    /// than ask for a redelivery. Logged at error level.
    Unrecorded {
        /// What the handler returned.
        result: Result<Bytes, HandlerError>,
        /// The store's last error.
        error: StoreError,
    },
}
