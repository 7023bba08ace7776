//! [`FaultyStore`]: a store that misbehaves on command, for testing what sits above one.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::record::{Begin, Lease, Record, Stored, Token};
use crate::store::{Store, StoreError};
use crate::{Fingerprint, ScopedKey};

/// Wraps a store; on command its calls never answer (a partitioned backend), its claims
/// never answer, or its next completions fail (a full disk). It counts completions.
///
/// ```
/// use std::time::Duration;
/// use idem_core::testing::{FaultyStore, fingerprint, scoped};
/// use idem_core::{Begin, MemoryStore, Store, Stored};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let store = FaultyStore::new(MemoryStore::new());
/// let Ok(Begin::Acquired(lease)) = store.begin(&scoped("k"), &fingerprint("a"), Duration::from_secs(9)).await
/// else { unreachable!() };
/// store.fail_next_completes(1);
/// assert!(store.complete(&scoped("k"), lease.token, &Stored::new(200), Duration::from_secs(9)).await.is_err());
/// assert!(store.complete(&scoped("k"), lease.token, &Stored::new(200), Duration::from_secs(9)).await.is_ok());
/// assert_eq!(store.completes(), 2);
/// # }
/// ```
#[derive(Debug, Default)]
pub struct FaultyStore<S> {
    inner: S,
    stall_all: AtomicBool,
    stall_begins: AtomicBool,
    failing_completes: AtomicU32,
    completes: AtomicU64,
    fatal: std::sync::Mutex<Option<String>>,
}

impl<S> FaultyStore<S> {
    /// Behaves as `inner` until told otherwise.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            stall_all: AtomicBool::new(false),
            stall_begins: AtomicBool::new(false),
            failing_completes: AtomicU32::new(0),
            completes: AtomicU64::new(0),
            fatal: std::sync::Mutex::new(None),
        }
    }

    /// From now on no call answers (or, with `false`, calls answer again).
    pub fn stall_everything(&self, stall: bool) {
        self.stall_all.store(stall, Ordering::SeqCst);
    }

    /// From now on no `begin` answers (or, with `false`, they answer again).
    pub fn stall_begins(&self, stall: bool) {
        self.stall_begins.store(stall, Ordering::SeqCst);
    }

    /// The next `n` completions fail with a backend error (`u32::MAX`: every one).
    pub fn fail_next_completes(&self, n: u32) {
        self.failing_completes.store(n, Ordering::SeqCst);
    }

    /// From now on [`Store::fatal_error`] says `reason`, as a store whose background
    /// worker died would.
    pub fn die(&self, reason: impl Into<String>) {
        *self.fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.into());
    }

    /// How many completions were asked for, failed ones included.
    pub fn completes(&self) -> u64 {
        self.completes.load(Ordering::SeqCst)
    }

    async fn stall_if_told(&self) {
        if self.stall_all.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    }
}

#[async_trait]
impl<S: Store> Store for FaultyStore<S> {
    async fn begin(
        &self,
        key: &ScopedKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        self.stall_if_told().await;
        if self.stall_begins.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.inner.begin(key, fingerprint, lease).await
    }
    async fn complete(
        &self,
        key: &ScopedKey,
        token: Token,
        stored: &Stored,
        retain: Duration,
    ) -> Result<SystemTime, StoreError> {
        self.stall_if_told().await;
        self.completes.fetch_add(1, Ordering::SeqCst);
        let failing = self
            .failing_completes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(StoreError::backend(
                "complete",
                "injected failure: disk full",
            ));
        }
        self.inner.complete(key, token, stored, retain).await
    }
    async fn release(&self, key: &ScopedKey, token: Token) -> Result<(), StoreError> {
        self.stall_if_told().await;
        self.inner.release(key, token).await
    }
    async fn renew(
        &self,
        key: &ScopedKey,
        token: Token,
        lease: Duration,
    ) -> Result<Lease, StoreError> {
        self.stall_if_told().await;
        self.inner.renew(key, token, lease).await
    }
    async fn get(&self, key: &ScopedKey) -> Result<Option<Record>, StoreError> {
        self.stall_if_told().await;
        self.inner.get(key).await
    }
    async fn delete(&self, key: &ScopedKey) -> Result<bool, StoreError> {
        self.stall_if_told().await;
        self.inner.delete(key).await
    }
    async fn sweep(&self, limit: usize) -> Result<usize, StoreError> {
        self.stall_if_told().await;
        self.inner.sweep(limit).await
    }
    async fn in_flight(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> Result<Vec<crate::InFlightRecord>, StoreError> {
        self.stall_if_told().await;
        self.inner.in_flight(older_than, limit).await
    }
    fn fatal_error(&self) -> Option<String> {
        let told = self.fatal.lock().unwrap_or_else(|p| p.into_inner()).clone();
        told.or_else(|| self.inner.fatal_error())
    }
    fn counters(&self) -> crate::StoreCounters {
        self.inner.counters()
    }
}
