//! Counters a running layer keeps, for metrics and tests.

use std::sync::atomic::{AtomicU64, Ordering};

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
    /// A moving average of the inner service's answer time, in microseconds (0: none yet).
    latency_micros: AtomicU64,
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

    /// Requests without a key that were keyed by their fingerprint
    /// ([`KeyFrom::Fingerprint`](crate::KeyFrom::Fingerprint)), whatever came of them
    /// (each is also counted as executed, replayed, in flight, …).
    pub fn derived(&self) -> u64 {
        self.derived.load(Ordering::Relaxed)
    }
}
