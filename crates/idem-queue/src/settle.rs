//! What the broker adapters tell the broker, decided once for both.

use std::time::Duration;

use crate::{DeadLetterReason, DedupError, DeliveryAttempt, Outcome};

/// When adapters redeliver, and when they give up.
///
/// | field | default | meaning |
/// |---|---|---|
/// | `max_deliveries` | 5 | a transient failure on this delivery dead-letters the message |
/// | `backoff_initial` | 1 s | redelivery delay after the first transient failure |
/// | `backoff_max` | 60 s | the delay doubles per delivery up to this |
/// | `in_flight_min` / `in_flight_max` | 100 ms / 30 s | bounds on the redelivery delay of a message another consumer holds (its lease's time left) |
///
/// Deliveries answered "in flight elsewhere" count towards `max_deliveries` on the broker,
/// but never dead-letter a message by themselves: only a handler failure on (or after) the
/// last delivery does.
///
/// A handler whose outcome could not be stored ([`Outcome::Unrecorded`]) is settled as that
/// outcome (acknowledged after a success, dead-lettered after a failure for good), not
/// redelivered: its claim lapses with its lease and leaves no record, so a redelivery would
/// only run it again.
///
/// ```
/// use std::time::Duration;
/// use idem_queue::RetryPolicy;
///
/// let policy = RetryPolicy::default();
/// assert_eq!(policy.backoff(1), Duration::from_secs(1));
/// assert_eq!(policy.backoff(3), Duration::from_secs(4));
/// assert_eq!(policy.backoff(30), Duration::from_secs(60));
/// assert_eq!(policy.in_flight_delay(Duration::from_millis(5)), Duration::from_millis(100));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Deliveries after which a transient failure is final; `None`: retry forever.
    pub max_deliveries: Option<u64>,
    /// Delay before the second delivery after a transient failure.
    pub backoff_initial: Duration,
    /// Longest delay between deliveries after failures.
    pub backoff_max: Duration,
    /// Shortest delay before redelivering a message held elsewhere.
    pub in_flight_min: Duration,
    /// Longest delay before redelivering a message held elsewhere.
    pub in_flight_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_deliveries: Some(5),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            in_flight_min: Duration::from_millis(100),
            in_flight_max: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The delay after a transient failure on delivery `delivered` (1-based): doubling from
    /// `backoff_initial`, at most `backoff_max`.
    pub fn backoff(&self, delivered: u64) -> Duration {
        let doublings = delivered.saturating_sub(1).min(32) as u32;
        self.backoff_initial
            .saturating_mul(1u32 << doublings.min(31))
            .min(self.backoff_max)
    }

    /// The delay before redelivering a message another consumer holds for `retry_after`.
    pub fn in_flight_delay(&self, retry_after: Duration) -> Duration {
        retry_after.clamp(
            self.in_flight_min,
            self.in_flight_max.max(self.in_flight_min),
        )
    }

    /// The attempt a delivery numbered `delivered` is under this policy.
    pub fn attempt(&self, delivered: u64) -> DeliveryAttempt {
        DeliveryAttempt::new(delivered.max(1), self.max_deliveries)
    }

    /// What to tell the broker about a delivery with this outcome.
    pub fn settlement(
        &self,
        attempt: DeliveryAttempt,
        outcome: &Result<Outcome, DedupError>,
    ) -> Settlement {
        let backoff = Settlement::Retry {
            delay: self.backoff(attempt.delivered),
        };
        match outcome {
            Ok(Outcome::Processed { .. }) => Settlement::Ack,
            Ok(Outcome::Duplicate(replay)) => match replay.failure() {
                None => Settlement::Ack,
                Some(reason) => Settlement::DeadLetter { reason },
            },
            Ok(Outcome::InFlight { retry_after }) => Settlement::Retry {
                delay: self.in_flight_delay(*retry_after),
            },
            Ok(Outcome::Mismatch) => Settlement::DeadLetter {
                reason: DeadLetterReason::Mismatch,
            },
            Ok(Outcome::Failed { reason, .. }) => Settlement::DeadLetter { reason: *reason },
            // The handler ran; its claim stays held until the lease ends and then expires
            // without a record, so a redelivery could only run it again. Settle it as the
            // outcome that could not be stored.
            Ok(Outcome::Unrecorded { result: Ok(_), .. }) => Settlement::Ack,
            Ok(Outcome::Unrecorded {
                result: Err(error), ..
            }) => Settlement::DeadLetter {
                reason: if error.is_permanent() {
                    DeadLetterReason::Permanent
                } else {
                    DeadLetterReason::MaxDeliveries
                },
            },
            Ok(Outcome::Released { .. } | Outcome::LeaseLost { .. }) => backoff,
            Err(DedupError::InvalidId(_)) => Settlement::DeadLetter {
                reason: DeadLetterReason::Permanent,
            },
            Err(_) => backoff,
        }
    }
}

/// What an adapter told the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Acknowledged: the broker forgets the message.
    Ack,
    /// Handed back for redelivery after `delay` (JetStream: `-NAK` with that delay;
    /// RabbitMQ: held for `delay`, then `basic.nack` with requeue).
    Retry {
        /// How long until the redelivery.
        delay: Duration,
    },
    /// Given up on: a dead-letter record was written, and the message was terminated
    /// (JetStream `+TERM`) or rejected without requeue (RabbitMQ).
    DeadLetter {
        /// Why.
        reason: DeadLetterReason,
    },
}

/// The full report of one delivery through an adapter.
#[derive(Debug)]
pub struct Handled {
    /// The message id used as the key.
    pub id: String,
    /// Which delivery this was.
    pub attempt: DeliveryAttempt,
    /// What the deduplicator found or did.
    pub outcome: Result<Outcome, DedupError>,
    /// What the broker was told.
    pub settlement: Settlement,
}

/// The text kept as a dead letter's error.
#[cfg(any(feature = "jetstream", feature = "rabbitmq"))]
pub(crate) fn dead_letter_error(outcome: &Result<Outcome, DedupError>) -> Option<String> {
    match outcome {
        Ok(
            Outcome::Failed { error, .. }
            | Outcome::Unrecorded {
                result: Err(error), ..
            },
        ) => Some(error.to_string()),
        Ok(Outcome::Duplicate(replay)) => replay
            .error()
            .or_else(|| replay.failure().map(|reason| reason.to_string())),
        Ok(Outcome::Mismatch) => Some(
            "the message id was used before for another message (fingerprint mismatch)".to_owned(),
        ),
        Err(error) => Some(error.to_string()),
        _ => None,
    }
}
