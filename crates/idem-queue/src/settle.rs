//! What the broker adapters tell the broker, decided once for both.

use std::time::Duration;

use crate::{DeadLetterReason, DedupError, DeliveryAttempt, Outcome};

/// When adapters redeliver, and when they give up.
///
/// | field | default | meaning |
/// |---|---|---|
/// | `max_attempts` | 5 | a transient failure (or panic) on this run of the handler dead-letters the message |
/// | `backoff_initial` | 1 s | redelivery delay after the first failed run |
/// | `backoff_max` | 60 s | the delay doubles per failed run up to this |
/// | `in_flight_min` / `in_flight_max` | 100 ms / 30 s | bounds on the redelivery delay of a message another consumer holds (its lease's time left) |
///
/// Runs are counted by the [`Deduplicator`](crate::Deduplicator) in its own records, per
/// message id, not by the broker: deliveries answered "in flight elsewhere", store errors
/// before the handler ran and lost leases ([`Settlement::Defer`]) do not use up the
/// budget; only failed runs ([`Settlement::Retry`]) do. That works the same on every
/// queue type, including RabbitMQ classic queues, which count nothing.
///
/// A handler whose outcome could not be stored ([`Outcome::Unrecorded`]) is settled as that
/// outcome: acknowledged after a success (asking for a redelivery would make a second run
/// certain once the claim lapses; acknowledging leaves only a later copy of the message to
/// run again), dead-lettered after a failure for good (never acknowledged: if the dead
/// letter cannot be written either, the message is deferred and comes back).
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
/// assert_eq!(policy.limit().max_deliveries, Some(5));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Runs after which a transient failure is final; `None`: retry forever.
    pub max_attempts: Option<u64>,
    /// Delay before the second run after a failed one.
    pub backoff_initial: Duration,
    /// Longest delay between runs after failures.
    pub backoff_max: Duration,
    /// Shortest delay before redelivering a message held elsewhere.
    pub in_flight_min: Duration,
    /// Longest delay before redelivering a message held elsewhere.
    pub in_flight_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: Some(5),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            in_flight_min: Duration::from_millis(100),
            in_flight_max: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The delay after failed run `attempt` (1-based): doubling from `backoff_initial`, at
    /// most `backoff_max`.
    pub fn backoff(&self, attempt: u64) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31) as u32;
        self.backoff_initial
            .saturating_mul(1u32 << doublings)
            .min(self.backoff_max)
    }

    /// The delay before redelivering a message another consumer holds for `retry_after`.
    pub fn in_flight_delay(&self, retry_after: Duration) -> Duration {
        retry_after.clamp(
            self.in_flight_min,
            self.in_flight_max.max(self.in_flight_min),
        )
    }

    /// The limit to run a message's handler under: numbered by the deduplicator's count.
    pub fn limit(&self) -> DeliveryAttempt {
        DeliveryAttempt::limit(self.max_attempts)
    }

    /// What to tell the broker about a delivery with this outcome. `attempt.delivered` only
    /// spaces out redeliveries: the run's number if the handler ran, else the broker's
    /// delivery number (so repeated store errors back off); whether a run was the last is
    /// already in the outcome.
    ///
    /// ```
    /// use std::time::Duration;
    /// use idem_queue::{DeliveryAttempt, Outcome, RetryPolicy, Settlement};
    ///
    /// let policy = RetryPolicy::default();
    /// let in_flight = Ok(Outcome::InFlight { retry_after: Duration::from_secs(2) });
    /// assert_eq!(
    ///     policy.settlement(DeliveryAttempt::new(7, Some(5)), &in_flight),
    ///     Settlement::Defer { delay: Duration::from_secs(2) },
    /// );
    /// ```
    pub fn settlement(
        &self,
        attempt: DeliveryAttempt,
        outcome: &Result<Outcome, DedupError>,
    ) -> Settlement {
        let retry = Settlement::Retry {
            delay: self.backoff(attempt.delivered),
        };
        let defer = Settlement::Defer {
            delay: self.backoff(attempt.delivered),
        };
        match outcome {
            Ok(Outcome::Processed { .. }) => Settlement::Ack,
            Ok(Outcome::Duplicate(replay)) => match replay.failure() {
                None => Settlement::Ack,
                Some(reason) => Settlement::DeadLetter { reason },
            },
            Ok(Outcome::InFlight { retry_after }) => Settlement::Defer {
                delay: self.in_flight_delay(*retry_after),
            },
            Ok(Outcome::Mismatch) => Settlement::DeadLetter {
                reason: DeadLetterReason::Mismatch,
            },
            Ok(Outcome::Failed { reason, .. }) => Settlement::DeadLetter { reason: *reason },
            // The handler ran; its claim stays held until the lease ends and then lapses
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
            Ok(Outcome::Released { .. } | Outcome::Panicked { .. }) => retry,
            // Taken over: the new holder's run is the one that counts.
            Ok(Outcome::LeaseLost { .. }) => defer,
            Err(DedupError::InvalidId(_)) => Settlement::DeadLetter {
                reason: DeadLetterReason::Permanent,
            },
            Err(_) => defer,
        }
    }
}

/// What an adapter told the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Acknowledged: the broker forgets the message.
    Ack,
    /// The handler failed (or panicked) on a run that was not the last: handed back for
    /// another run after `delay` (JetStream: `-NAK` with that delay; RabbitMQ: held for
    /// `delay`, then `basic.reject` with requeue, which RabbitMQ 4.3+ counts in
    /// `x-delivery-count`). The run is counted in the deduplicator's records.
    Retry {
        /// How long until the redelivery.
        delay: Duration,
    },
    /// Handed back without the handler having failed: another consumer holds the message,
    /// the store could not be reached, or the claim was taken over (JetStream: `-NAK` with
    /// `delay`; RabbitMQ: held for `delay`, then `basic.nack` with requeue, which RabbitMQ
    /// 4.3+ does not count). Uses up none of [`RetryPolicy::max_attempts`].
    Defer {
        /// How long until the redelivery.
        delay: Duration,
    },
    /// Given up on: a dead-letter record was written (and, if configured, a copy published
    /// and confirmed), then the message was terminated (JetStream `+TERM`), rejected
    /// without requeue or acknowledged (RabbitMQ; see its module docs).
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
    /// Which run of the handler this was, by the deduplicator's count; `None` if the
    /// handler did not run (a duplicate, in flight elsewhere, a store error).
    pub attempt: Option<u64>,
    /// The broker's delivery number (JetStream `delivered`; RabbitMQ `x-delivery-count` plus
    /// one, or the `redelivered` flag), for logs: it also counts deliveries that never ran
    /// the handler, and decides nothing.
    pub delivered: u64,
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
