//! [`BodyBudget`]: a cap on the bytes of keyed request bodies held in memory at once.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How many bytes of keyed request bodies may be buffered at once, across every service
/// that shares the budget (every route of a gateway shares one). A keyed request's body
/// must be read whole before its key is claimed; without a cap, many slow clients each
/// sending a large body could make the process hold unbounded memory.
///
/// A request that finds the budget spent waits up to `wait` for bytes to free up, then is
/// answered `503` with `Retry-After` (nothing ran, nothing was stored).
///
/// ```
/// use std::time::Duration;
/// use idem_http::BodyBudget;
///
/// let budget = BodyBudget::new(64 << 20, Duration::from_secs(1));
/// assert_eq!(budget.available(), 64 << 20);
/// ```
#[derive(Debug, Clone)]
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
    capacity: usize,
    wait: Duration,
}

/// Bytes taken from a [`BodyBudget`] by one request, given back when dropped.
#[derive(Debug, Default)]
pub(crate) struct Reserved {
    permit: Option<OwnedSemaphorePermit>,
    bytes: usize,
}

impl Reserved {
    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

/// The default cap: 64 MiB.
pub const DEFAULT_BODY_BUDGET: usize = 64 << 20;
/// The default wait for bytes to free up: 1 s.
pub const DEFAULT_BODY_BUDGET_WAIT: Duration = Duration::from_secs(1);

impl BodyBudget {
    /// At most `capacity` bytes buffered at once; a request waits up to `wait` for room.
    pub fn new(capacity: usize, wait: Duration) -> Self {
        let capacity = capacity.min(Semaphore::MAX_PERMITS);
        Self {
            bytes: Arc::new(Semaphore::new(capacity)),
            capacity,
            wait,
        }
    }

    /// Bytes that may still be buffered now.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }

    /// The cap.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Adds `more` bytes to `reserved`, waiting until `until` for room; `false` when the
    /// room did not come in time. One request never asks for more than the whole budget.
    pub(crate) async fn grow(
        &self,
        reserved: &mut Reserved,
        more: usize,
        until: tokio::time::Instant,
    ) -> bool {
        let more = more.min(self.capacity.saturating_sub(reserved.bytes));
        if more == 0 {
            return true;
        }
        let Ok(wanted) = u32::try_from(more) else {
            return false;
        };
        let acquire = Arc::clone(&self.bytes).acquire_many_owned(wanted);
        match tokio::time::timeout_at(until, acquire).await {
            Ok(Ok(permit)) => {
                match &mut reserved.permit {
                    Some(held) => held.merge(permit),
                    None => reserved.permit = Some(permit),
                }
                reserved.bytes += more;
                true
            }
            _ => false,
        }
    }

    /// When a request that starts waiting now must give up.
    pub(crate) fn deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.wait
    }
}

impl Default for BodyBudget {
    fn default() -> Self {
        Self::new(DEFAULT_BODY_BUDGET, DEFAULT_BODY_BUDGET_WAIT)
    }
}
