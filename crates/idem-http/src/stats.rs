//! Counters a running layer keeps, for metrics and tests, and the one log line per
//! handled request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::{Method, Response, StatusCode};
use idem_core::{Scope, ScopedKey};

use crate::problem::IdempotencyError;

/// What the layer has done since it was built, shared by every service the layer made.
/// Read it from [`IdempotencyLayer::stats`](crate::IdempotencyLayer::stats) or
/// [`Idempotency::stats`](crate::Idempotency::stats).
#[derive(Debug, Default)]
pub struct IdempotencyStats {
    executed: AtomicU64,
    replayed: AtomicU64,
    in_flight: AtomicU64,
    mismatches: AtomicU64,
    store_errors: AtomicU64,
    fail_open: AtomicU64,
    unknown_outcomes: AtomicU64,
    not_stored: AtomicU64,
    lease_lost: AtomicU64,
    overloaded: AtomicU64,
    derived: AtomicU64,
    running: AtomicU64,
    /// Indexed by [`Outcome`]'s discriminant.
    outcomes: [AtomicU64; Outcome::ALL.len()],
    /// A moving average of the inner service's answer time, in microseconds (0: none yet).
    latency_micros: AtomicU64,
}

/// How the layer answered one request it handled (a keyed one, or one it refused), in
/// the response's extensions as the layer hands it back, and counted by
/// [`IdempotencyStats::outcome`]. Every handled request has exactly one.
///
/// ```
/// use idem_http::Outcome;
///
/// assert_eq!(Outcome::Replayed.as_str(), "replayed");
/// assert!(Outcome::ALL.contains(&Outcome::UnknownOutcome));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// Claimed and sent to the inner service, which answered.
    Executed,
    /// Answered with the stored response (including `response-not-kept`).
    Replayed,
    /// `409`: the key was in flight.
    InFlight,
    /// `422`: the key belonged to another request.
    Mismatch,
    /// `400`: the route requires a key and there was none.
    MissingKey,
    /// `400`: the key header was malformed or repeated.
    MalformedKey,
    /// `400`: the route requires a caller identity and there was none.
    MissingIdentity,
    /// `400`: a protected method on an ambiguous path.
    AmbiguousPath,
    /// `413`: the body was larger than `max_request_body`.
    TooLarge,
    /// `400`/`408`: the body could not be read, or did not arrive in time.
    BodyUnreadable,
    /// `503`: the body budget was spent.
    Overloaded,
    /// `503`: the store failed; nothing ran.
    StoreUnavailable,
    /// The store failed and the policy forwarded the request unprotected.
    FailOpen,
    /// `502`: the upstream could not be reached; the key was released.
    UpstreamUnavailable,
    /// `502`/`504`: the upstream failed after the request may have reached it, or timed
    /// out; never run again with this key.
    UnknownOutcome,
}

impl Outcome {
    /// Every outcome, in discriminant order.
    pub const ALL: [Self; 15] = [
        Self::Executed,
        Self::Replayed,
        Self::InFlight,
        Self::Mismatch,
        Self::MissingKey,
        Self::MalformedKey,
        Self::MissingIdentity,
        Self::AmbiguousPath,
        Self::TooLarge,
        Self::BodyUnreadable,
        Self::Overloaded,
        Self::StoreUnavailable,
        Self::FailOpen,
        Self::UpstreamUnavailable,
        Self::UnknownOutcome,
    ];

    /// Its name in logs and metric labels, in snake case.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Executed => "executed",
            Self::Replayed => "replayed",
            Self::InFlight => "in_flight",
            Self::Mismatch => "mismatch",
            Self::MissingKey => "missing_key",
            Self::MalformedKey => "malformed_key",
            Self::MissingIdentity => "missing_identity",
            Self::AmbiguousPath => "ambiguous_path",
            Self::TooLarge => "too_large",
            Self::BodyUnreadable => "body_unreadable",
            Self::Overloaded => "overloaded",
            Self::StoreUnavailable => "store_unavailable",
            Self::FailOpen => "fail_open",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::UnknownOutcome => "unknown_outcome",
        }
    }

    /// The outcome of answering with `error`.
    pub(crate) fn of(error: &IdempotencyError) -> Self {
        match error {
            IdempotencyError::MissingKey { .. } => Self::MissingKey,
            IdempotencyError::MalformedKey { .. } | IdempotencyError::RepeatedKey { .. } => {
                Self::MalformedKey
            }
            IdempotencyError::Mismatch => Self::Mismatch,
            IdempotencyError::InFlight { .. } => Self::InFlight,
            IdempotencyError::BodyTooLarge { .. } => Self::TooLarge,
            IdempotencyError::BodyUnreadable { .. } | IdempotencyError::BodyTimeout { .. } => {
                Self::BodyUnreadable
            }
            IdempotencyError::StoreUnavailable { .. } => Self::StoreUnavailable,
            IdempotencyError::UpstreamUnavailable { .. } => Self::UpstreamUnavailable,
            IdempotencyError::OutcomeUnknown { .. } | IdempotencyError::UpstreamTimeout { .. } => {
                Self::UnknownOutcome
            }
            IdempotencyError::Overloaded { .. } => Self::Overloaded,
            IdempotencyError::AmbiguousPath { .. } => Self::AmbiguousPath,
            IdempotencyError::MissingIdentity => Self::MissingIdentity,
            IdempotencyError::ResponseNotKept { .. } => Self::Replayed,
        }
    }
}

/// Marks `response` with how it came about.
pub(crate) fn marked<B>(mut response: Response<B>, outcome: Outcome) -> Response<B> {
    response.extensions_mut().insert(outcome);
    response
}

/// How long the inner service took to answer a request that ran, in its response's
/// extensions, for the log line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UpstreamTook(pub(crate) Duration);

/// Who and what a handled request was, for its log line: never the raw key or scope
/// (the scope may be made of a credential), only short digests of them, which stay the
/// same across a request's retries so that its lines can be found together.
pub(crate) struct RequestLabel {
    pub(crate) method: Method,
    pub(crate) scope: Option<String>,
    pub(crate) key: Option<String>,
}

impl RequestLabel {
    /// A derived key is not known until the body is read, so it shows as `derived`.
    /// Empty when the line is not logged: the digests cost a hash each.
    pub(crate) fn new(
        method: &Method,
        scope: Option<&Scope>,
        key: Option<&ScopedKey>,
        derived: bool,
    ) -> Self {
        if !tracing::enabled!(target: "idem::request", tracing::Level::INFO) {
            return Self {
                method: method.clone(),
                scope: None,
                key: None,
            };
        }
        Self::made(method, scope, key, derived)
    }

    /// [`new`](Self::new), whether or not the line is logged.
    fn made(
        method: &Method,
        scope: Option<&Scope>,
        key: Option<&ScopedKey>,
        derived: bool,
    ) -> Self {
        let key = match key {
            Some(key) => Some(key.log_id()),
            None if derived => Some("derived".to_owned()),
            None => None,
        };
        Self {
            method: method.clone(),
            scope: scope.map(Scope::log_id),
            key,
        }
    }
}

/// Counts a handled request's outcome and logs its one line.
pub(crate) fn finish(
    stats: &IdempotencyStats,
    label: &RequestLabel,
    outcome: Outcome,
    status: StatusCode,
    took: Duration,
    upstream: Option<Duration>,
) {
    stats.outcomes[outcome as usize].fetch_add(1, Ordering::Relaxed);
    // The text values go in as Display (`%`): they are fixed words and hex digests, so the
    // quoting and per-character escaping of Debug buys nothing, and it was most of the
    // line's cost (about 14 k instructions a line, a sixth of a new key's). Durations are
    // rounded to microseconds, which also keeps the shortest-float printing short.
    tracing::info!(
        target: "idem::request",
        outcome = %outcome.as_str(),
        status = status.as_u16(),
        method = %label.method,
        scope = %label.scope.as_deref().unwrap_or("-"),
        key = %label.key.as_deref().unwrap_or("-"),
        total_ms = millis(took),
        upstream_ms = upstream.map(millis),
        "handled a keyed request"
    );
}

/// A duration in milliseconds, to the microsecond.
fn millis(took: Duration) -> f64 {
    // Microseconds fit an f64 exactly for any duration a request can take.
    took.as_micros() as f64 / 1000.0
}

/// Lets a warning through at most once a second, counting the ones it holds back: for
/// failures that every request can meet at once (a full or unreachable store), whose each
/// request already gets its own `idem::request` line.
#[derive(Debug)]
pub(crate) struct Throttle {
    started: Instant,
    /// Milliseconds since `started` before which nothing more is let through.
    next_ms: AtomicU64,
    held_back: AtomicU64,
}

impl Default for Throttle {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            next_ms: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
        }
    }
}

impl Throttle {
    /// `Some(how many were held back since the last one)` when this one may be logged.
    pub(crate) fn due(&self) -> Option<u64> {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now.saturating_add(1000),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.held_back.swap(0, Ordering::Relaxed));
        }
        self.held_back.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// Counts one detached keyed request as running until dropped.
pub(crate) struct Running(std::sync::Arc<IdempotencyStats>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Counter {
    Executed,
    Replayed,
    InFlight,
    Mismatch,
    StoreError,
    FailOpen,
    UnknownOutcome,
    NotStored,
    LeaseLost,
    Overloaded,
    Derived,
}

impl IdempotencyStats {
    pub(crate) fn count(&self, counter: Counter) {
        let cell = match counter {
            Counter::Executed => &self.executed,
            Counter::Replayed => &self.replayed,
            Counter::InFlight => &self.in_flight,
            Counter::Mismatch => &self.mismatches,
            Counter::StoreError => &self.store_errors,
            Counter::FailOpen => &self.fail_open,
            Counter::UnknownOutcome => &self.unknown_outcomes,
            Counter::NotStored => &self.not_stored,
            Counter::LeaseLost => &self.lease_lost,
            Counter::Overloaded => &self.overloaded,
            Counter::Derived => &self.derived,
        };
        cell.fetch_add(1, Ordering::Relaxed);
    }

    /// Folds one observed answer time of the inner service into the moving average that
    /// `Retry-After` hints are made of (each new observation weighs one eighth).
    pub(crate) fn observe_latency(&self, took: std::time::Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        let _ = self
            .latency_micros
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |average| {
                Some(if average == 0 {
                    micros
                } else {
                    (average - average / 8).saturating_add(micros / 8).max(1)
                })
            });
    }

    /// The inner service's typical answer time so far, if any answer was observed.
    pub fn observed_latency(&self) -> Option<std::time::Duration> {
        match self.latency_micros.load(Ordering::Relaxed) {
            0 => None,
            micros => Some(std::time::Duration::from_micros(micros)),
        }
    }

    /// Marks a detached keyed request as running until the guard is dropped.
    pub(crate) fn enter(self: &std::sync::Arc<Self>) -> Running {
        self.running.fetch_add(1, Ordering::SeqCst);
        Running(std::sync::Arc::clone(self))
    }

    /// Keyed requests whose detached work (claim, inner call, storing) is under way now,
    /// whether or not their client is still waiting. A server shutting down waits for this
    /// to reach zero, so that every response it started is stored.
    pub fn running(&self) -> u64 {
        self.running.load(Ordering::SeqCst)
    }

    /// Keyed requests that claimed their key and were sent to the inner service.
    pub fn executed(&self) -> u64 {
        self.executed.load(Ordering::Relaxed)
    }

    /// Keyed requests answered with a stored response (including `response-not-kept`).
    pub fn replayed(&self) -> u64 {
        self.replayed.load(Ordering::Relaxed)
    }

    /// Keyed requests answered `409` because their key was in flight.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Keyed requests answered `422` because their key belonged to another request.
    pub fn mismatches(&self) -> u64 {
        self.mismatches.load(Ordering::Relaxed)
    }

    /// Store calls that failed (claims, completions, releases, renewals).
    pub fn store_errors(&self) -> u64 {
        self.store_errors.load(Ordering::Relaxed)
    }

    /// Keyed requests forwarded unprotected because the store failed and the policy says
    /// `fail_open`.
    pub fn fail_open(&self) -> u64 {
        self.fail_open.load(Ordering::Relaxed)
    }

    /// Keyed requests whose inner call failed after the request may have been sent, or
    /// timed out: answered `502` `outcome-unknown` or `504` `upstream-timeout`, never run
    /// again automatically.
    pub fn unknown_outcomes(&self) -> u64 {
        self.unknown_outcomes.load(Ordering::Relaxed)
    }

    /// Completed responses the store would not take even after retrying for
    /// `complete_for`; their keys stay held until their leases end.
    pub fn not_stored(&self) -> u64 {
        self.not_stored.load(Ordering::Relaxed)
    }

    /// Completed responses that could not be stored because another claim had taken the
    /// key over after this one's lease ended.
    pub fn lease_lost(&self) -> u64 {
        self.lease_lost.load(Ordering::Relaxed)
    }

    /// Keyed requests answered `503` `overloaded` because the body budget was spent.
    pub fn overloaded(&self) -> u64 {
        self.overloaded.load(Ordering::Relaxed)
    }

    /// Requests the layer handled (keyed, or refused) that ended with `outcome`.
    pub fn outcome(&self, outcome: Outcome) -> u64 {
        self.outcomes[outcome as usize].load(Ordering::Relaxed)
    }

    /// Requests without a key that were keyed by their fingerprint
    /// ([`KeyFrom::Fingerprint`](crate::KeyFrom::Fingerprint)), whatever came of them
    /// (each is also counted as executed, replayed, in flight, …).
    pub fn derived(&self) -> u64 {
        self.derived.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_counts_in_its_own_cell() {
        let stats = IdempotencyStats::default();
        for (position, outcome) in Outcome::ALL.iter().enumerate() {
            assert_eq!(*outcome as usize, position, "{outcome:?} is out of order");
            stats.outcomes[*outcome as usize].fetch_add(1, Ordering::Relaxed);
            assert_eq!(stats.outcome(*outcome), 1);
        }
        let names: std::collections::HashSet<_> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(names.len(), Outcome::ALL.len(), "two outcomes share a name");
    }

    #[test]
    fn a_logged_key_is_a_digest_not_the_key() {
        let key = ScopedKey::new(
            Scope::new("tenant-secret"),
            idem_core::Key::new("order-secret").unwrap(),
        );
        let label = RequestLabel::made(&Method::POST, Some(key.scope()), Some(&key), false);
        let shown = format!("{:?} {:?}", label.scope, label.key);
        assert!(!shown.contains("secret"), "{shown}");
        assert_eq!(label.key.as_deref().map(str::len), Some(16));
        assert_eq!(label.key, Some(key.log_id()));
        let derived = RequestLabel::made(&Method::POST, None, None, true);
        assert_eq!(derived.key.as_deref(), Some("derived"));
    }

    #[test]
    fn a_throttle_lets_one_through_a_second_and_counts_the_rest() {
        let throttle = Throttle::default();
        assert_eq!(throttle.due(), Some(0));
        for _ in 0..5 {
            assert_eq!(throttle.due(), None);
        }
        // A second later (moved back in time rather than waited for).
        throttle.next_ms.store(0, Ordering::Relaxed);
        assert_eq!(throttle.due(), Some(5));
        assert_eq!(throttle.due(), None);
    }
}
