//! Time, injectable so that lease and retention tests never sleep.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where a store reads the time. Stores backed by a server use the server's clock instead
/// (Redis `TIME`, Postgres `now()`), so that gateways with skewed clocks agree on leases.
pub trait Clock: fmt::Debug + Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The operating system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to, with millisecond resolution. Clones share one time.
///
/// ```
/// use std::time::Duration;
/// use idem_core::{Clock, ManualClock};
///
/// let clock = ManualClock::new();
/// let before = clock.now();
/// clock.advance(Duration::from_secs(90));
/// assert_eq!(clock.now().duration_since(before).unwrap(), Duration::from_secs(90));
/// ```
#[derive(Debug, Clone)]
pub struct ManualClock {
    millis_since_epoch: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock stopped at 2026-01-01T00:00:00Z.
    pub fn new() -> Self {
        Self {
            millis_since_epoch: Arc::new(AtomicU64::new(1_767_225_600_000)),
        }
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        self.millis_since_epoch
            .fetch_add(to_millis(by), Ordering::SeqCst);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        from_unix_millis(self.millis_since_epoch.load(Ordering::SeqCst))
    }
}

/// Whole milliseconds in `d`, saturating: stores keep times as Unix milliseconds.
pub fn to_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Unix milliseconds of `t`; times before 1970 count as 0.
pub fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(to_millis).unwrap_or(0)
}

/// The time `millis` milliseconds after the Unix epoch.
pub fn from_unix_millis(millis: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(millis)
}
