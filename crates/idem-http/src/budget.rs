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

/// Bytes taken from a [`BodyBudget`], given back when dropped.
#[derive(Debug)]
pub(crate) struct Reserved(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

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

    /// Takes `bytes` (capped at the budget's capacity), waiting up to the budget's wait
    /// deadline `until`; `None` when the room did not come in time.
    pub(crate) async fn reserve(
        &self,
        bytes: usize,
        until: tokio::time::Instant,
    ) -> Option<Reserved> {
        if bytes == 0 {
            return Some(Reserved(None));
        }
        let wanted = u32::try_from(bytes.min(self.capacity)).unwrap_or(u32::MAX);
        let acquire = Arc::clone(&self.bytes).acquire_many_owned(wanted);
        match tokio::time::timeout_at(until, acquire).await {
            Ok(Ok(permit)) => Some(Reserved(Some(permit))),
            _ => None,
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
