//! [`DedupOptions`]: lease, renewal, store deadlines and retention, and their validation.

use std::time::Duration;

#[cfg(doc)]
use idem_core::StoreError;
use idem_core::{HoldOptions, Scope};

#[cfg(doc)]
use crate::{Deduplicator, Outcome};

/// Lease, renewal, store deadlines and retention for a [`Deduplicator`].
///
/// The defaults suit handlers that take up to a few seconds and brokers that redeliver
/// within days:
///
/// | field | default | meaning |
/// |---|---|---|
/// | `lease` | 30 s | how long a claim holds without renewal; after it, another consumer may take the message over (10 ms to 1 day) |
/// | `renew_every` | `lease / 3` | how often a held message's lease is renewed, on a task of its own |
/// | `retention` | 7 days | how long a completed message is remembered (at least `lease`, at most 100 years) |
/// | `dead_letter_retention` | 30 days | how long a dead-letter record is kept (at most 100 years) |
/// | `store_timeout` | 5 s | the deadline of every store call; a call that takes longer fails with [`StoreError::Timeout`] (at most 10 minutes) |
/// | `complete_for` | 30 s | how long storing a handler's outcome is retried, with backoff and the lease still renewed, when the store fails (at most 1 day) |
///
/// If an outcome still cannot be stored after `complete_for`, the claim is **not**
/// released: it stays held until its lease ends, so a redelivery meanwhile is answered
/// [`Outcome::InFlight`] instead of running the handler again (see
/// [`Outcome::Unrecorded`]).
///
/// **The retention window must cover the longest redelivery or replay horizon**: a
/// duplicate that arrives after `retention` is indistinguishable from a new message and runs
/// again. Set it at least to the broker's longest redelivery delay plus the age of the
/// oldest message that can still be redelivered or replayed: the stream's `max_age` on
/// JetStream if consumers may be reset or recreated, the queue's message TTL or the longest
/// a message may sit unacked on RabbitMQ, and the producer's own retry horizon for
/// re-published messages.
///
/// ```
/// use std::time::Duration;
/// use idem_queue::DedupOptions;
///
/// let options = DedupOptions {
///     lease: Duration::from_secs(60),
///     retention: Duration::from_secs(3 * 24 * 3600),
///     store_timeout: Duration::from_secs(2),
///     ..DedupOptions::default()
/// };
/// options.validate().unwrap();
/// assert_eq!(options.renew_interval(), Duration::from_secs(20));
/// assert_eq!(options.complete_for, Duration::from_secs(30));
/// ```
#[derive(Debug, Clone)]
pub struct DedupOptions {
    /// How long a claim holds without renewal.
    pub lease: Duration,
    /// How often a held message's lease is renewed; `None` means `lease / 3`.
    pub renew_every: Option<Duration>,
    /// How long a completed message is remembered (and its duplicates suppressed).
    pub retention: Duration,
    /// Where dead-letter records live; `None` means the scope's name plus `.dead-letter`.
    pub dead_letter_scope: Option<Scope>,
    /// How long a dead-letter record is kept.
    pub dead_letter_retention: Duration,
    /// The client-side deadline of every call to the store.
    pub store_timeout: Duration,
    /// How long storing an outcome is retried after the handler ran, before the claim is
    /// left held until its lease ends.
    pub complete_for: Duration,
}

impl Default for DedupOptions {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            renew_every: None,
            retention: Duration::from_secs(7 * DAY_SECS),
            dead_letter_scope: None,
            dead_letter_retention: Duration::from_secs(30 * DAY_SECS),
            store_timeout: Duration::from_secs(5),
            complete_for: Duration::from_secs(30),
        }
    }
}

const DAY_SECS: u64 = 24 * 3600;
/// Bounds that keep every duration far from overflowing the stores' time arithmetic.
const MAX_LEASE: Duration = Duration::from_secs(DAY_SECS);
const MAX_RETENTION: Duration = Duration::from_secs(100 * 365 * DAY_SECS);
const MAX_STORE_TIMEOUT: Duration = Duration::from_secs(600);
const MAX_COMPLETE_FOR: Duration = Duration::from_secs(DAY_SECS);

/// A [`DedupOptions`] field with a value that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid option `{field}`: {reason}")]
pub struct OptionsError {
    /// The field's name.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl DedupOptions {
    /// The effective renewal interval.
    pub fn renew_interval(&self) -> Duration {
        self.renew_every.unwrap_or(self.lease / 3)
    }

    /// The lease lifecycle these options ask for, as the core crate's [`Holder`](idem_core::Holder) takes it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use idem_queue::DedupOptions;
    ///
    /// let hold = DedupOptions::default().hold_options();
    /// assert_eq!(hold.renew_every, Duration::from_secs(10));
    /// assert_eq!(hold.complete_for, Duration::from_secs(30));
    /// ```
    pub fn hold_options(&self) -> HoldOptions {
        HoldOptions {
            lease: self.lease,
            renew_every: self.renew_interval(),
            complete_for: self.complete_for,
        }
    }

    /// Checks that the options can work together; the error names the bad field.
    pub fn validate(&self) -> Result<(), OptionsError> {
        let bad = |field, reason: &str| {
            Err(OptionsError {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.lease < Duration::from_millis(10) || self.lease > MAX_LEASE {
            return bad("lease", "must be between 10 ms and 1 day");
        }
        let renew = self.renew_interval();
        if renew.is_zero() || renew >= self.lease {
            return bad("renew_every", "must be above zero and below `lease`");
        }
        if self.retention < self.lease {
            return bad(
                "retention",
                "must be at least `lease` (and should cover the broker's redelivery horizon)",
            );
        }
        if self.retention > MAX_RETENTION {
            return bad("retention", "must be at most 100 years");
        }
        if self.dead_letter_retention.is_zero() || self.dead_letter_retention > MAX_RETENTION {
            return bad(
                "dead_letter_retention",
                "must be above zero and at most 100 years",
            );
        }
        if self.store_timeout.is_zero() || self.store_timeout > MAX_STORE_TIMEOUT {
            return bad("store_timeout", "must be above zero and at most 10 minutes");
        }
        if self.complete_for.is_zero() || self.complete_for > MAX_COMPLETE_FOR {
            return bad("complete_for", "must be above zero and at most 1 day");
        }
        Ok(())
    }
}
