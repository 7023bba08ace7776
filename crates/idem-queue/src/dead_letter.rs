//! Dead letters: messages given up on, kept under the dead-letter scope so an operator can
//! inspect and replay them.

use std::fmt;

use bytes::Bytes;
use idem::{Begin, RecordState, Store, StoreError, Stored};

use crate::{DedupError, Deduplicator, status};

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterReason {
    /// The handler failed with a permanent error.
    Permanent,
    /// The handler failed on the last allowed delivery.
    MaxDeliveries,
    /// The id was seen before with another fingerprint (another payload).
    Mismatch,
}

impl DeadLetterReason {
    /// The code kept as the record's `status` (see [`status`]).
    pub fn code(self) -> u16 {
        match self {
            Self::Permanent => status::FAILED,
            Self::MaxDeliveries => status::GAVE_UP,
            Self::Mismatch => status::MISMATCH,
        }
    }

    /// The reason for a status code, if it names one.
    pub fn from_code(code: u16) -> Option<Self> {
        match code {
            status::FAILED => Some(Self::Permanent),
            status::GAVE_UP => Some(Self::MaxDeliveries),
            status::MISMATCH => Some(Self::Mismatch),
            _ => None,
        }
    }

    /// A short name: `permanent`, `max-deliveries` or `mismatch`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Permanent => "permanent",
            Self::MaxDeliveries => "max-deliveries",
            Self::Mismatch => "mismatch",
        }
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message given up on, kept in the store under the dead-letter scope so it can be
/// inspected and replayed by hand.
///
/// ```
/// use bytes::Bytes;
/// use idem_queue::{DeadLetter, DeadLetterReason};
///
/// let letter = DeadLetter {
///     id: "order-7".into(),
///     reason: DeadLetterReason::MaxDeliveries,
///     deliveries: 5,
///     error: Some("inventory service unreachable".into()),
///     origin: "nats stream=ORDERS seq=42 subject=orders.created".into(),
///     payload: Bytes::from_static(b"{\"order\":7}"),
/// };
/// assert_eq!(DeadLetter::from_stored(&letter.to_stored()), Some(letter));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The message id.
    pub id: String,
    /// Why it was given up on.
    pub reason: DeadLetterReason,
    /// The delivery on which it was given up.
    pub deliveries: u64,
    /// The handler's last error, as text.
    pub error: Option<String>,
    /// Where it came from (broker, stream or queue, position).
    pub origin: String,
    /// The message body.
    pub payload: Bytes,
}

impl DeadLetter {
    /// The record's stored form: `status` is the reason's code, the fields are headers and
    /// the payload is the body.
    pub fn to_stored(&self) -> Stored {
        let mut stored = Stored::new(self.reason.code())
            .with_header("id", self.id.clone())
            .with_header("reason", self.reason.as_str())
            .with_header("deliveries", self.deliveries.to_string())
            .with_header("origin", self.origin.clone())
            .with_body(self.payload.clone());
        if let Some(error) = &self.error {
            stored = stored.with_header("error", error.clone());
        }
        stored
    }

    /// Reads a record written by [`DeadLetter::to_stored`].
    pub fn from_stored(stored: &Stored) -> Option<Self> {
        let header = |name: &str| {
            stored
                .headers
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
        };
        Some(Self {
            id: header("id")?,
            reason: DeadLetterReason::from_code(stored.status)?,
            deliveries: header("deliveries")?.parse().ok()?,
            error: header("error"),
            origin: header("origin").unwrap_or_default(),
            payload: stored.body.clone().unwrap_or_default(),
        })
    }
}

impl<S: Store> Deduplicator<S> {
    /// Forgets message `id`, so its next delivery runs the handler again (to replay a
    /// dead-lettered message after fixing its cause). Says whether a record was there.
    pub async fn forget(&self, id: &str) -> Result<bool, DedupError> {
        let key = self.key(id)?;
        self.inner
            .store
            .delete(&key)
            .await
            .map_err(DedupError::Store)
    }

    /// Writes a dead-letter record for `letter.id` under the dead-letter scope, unless one
    /// is already there. Says whether it wrote one.
    pub async fn dead_letter(&self, letter: &DeadLetter) -> Result<bool, DedupError> {
        let key = Self::key_in(&self.inner.dead_letter_scope, &letter.id)?;
        let store = &self.inner.store;
        let lease = self.inner.options.lease;
        match store
            .begin(&key, &self.inner.fingerprint, lease)
            .await
            .map_err(DedupError::Store)?
        {
            Begin::Acquired(claim) => {
                store
                    .complete(
                        &key,
                        claim.token,
                        &letter.to_stored(),
                        self.inner.options.dead_letter_retention,
                    )
                    .await
                    .map_err(DedupError::Store)?;
                Ok(true)
            }
            Begin::InFlight { .. } => Err(DedupError::Store(StoreError::backend(
                "write a dead-letter record",
                "another consumer is writing this dead-letter record",
            ))),
            _ => Ok(false),
        }
    }

    /// The dead-letter record for message `id`, if there is one.
    pub async fn dead_letter_record(&self, id: &str) -> Result<Option<DeadLetter>, DedupError> {
        let key = Self::key_in(&self.inner.dead_letter_scope, id)?;
        let record = self
            .inner
            .store
            .get(&key)
            .await
            .map_err(DedupError::Store)?;
        Ok(record.and_then(|record| match record.state {
            RecordState::Completed { stored, .. } => DeadLetter::from_stored(&stored),
            _ => None,
        }))
    }
}
