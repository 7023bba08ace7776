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
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Counter {
    Executed,
    Replayed,
    InFlight,
    Mismatch,
    StoreError,
    FailOpen,
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
        };
        cell.fetch_add(1, Ordering::Relaxed);
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
}
