//! Stores that misbehave on purpose, for the core crate's own unit tests.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::record::{Begin, Lease, Record, Stored, Token};
use crate::store::{Store, StoreError};
use crate::{Fingerprint, Key, Scope, ScopedKey};

pub(crate) fn key() -> ScopedKey {
    ScopedKey::new(Scope::anonymous(), Key::new("unit").unwrap())
}

/// Never answers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stalled;

#[async_trait]
impl Store for Stalled {
    async fn begin(
        &self,
        _: &ScopedKey,
        _: &Fingerprint,
        _: Duration,
    ) -> Result<Begin, StoreError> {
        std::future::pending().await
    }
    async fn complete(
        &self,
        _: &ScopedKey,
        _: Token,
        _: &Stored,
        _: Duration,
    ) -> Result<SystemTime, StoreError> {
        std::future::pending().await
    }
    async fn release(&self, _: &ScopedKey, _: Token) -> Result<(), StoreError> {
        std::future::pending().await
    }
    async fn renew(&self, _: &ScopedKey, _: Token, _: Duration) -> Result<Lease, StoreError> {
        std::future::pending().await
    }
    async fn get(&self, _: &ScopedKey) -> Result<Option<Record>, StoreError> {
        std::future::pending().await
    }
    async fn delete(&self, _: &ScopedKey) -> Result<bool, StoreError> {
        std::future::pending().await
    }
    async fn sweep(&self, _: usize) -> Result<usize, StoreError> {
        std::future::pending().await
    }
}

/// A store whose next `complete`s fail, counting every `complete` it is asked for.
#[derive(Debug)]
pub(crate) struct Flaky<S> {
    inner: S,
    failing_completes: AtomicU32,
    completes: AtomicU64,
}

impl<S> Flaky<S> {
    pub(crate) fn new(inner: S) -> Self {
        Self {
            inner,
            failing_completes: AtomicU32::new(0),
            completes: AtomicU64::new(0),
        }
    }

    pub(crate) fn fail_next_completes(&self, n: u32) {
        self.failing_completes.store(n, Ordering::SeqCst);
    }

    pub(crate) fn completes(&self) -> u64 {
        self.completes.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl<S: Store> Store for Flaky<S> {
    async fn begin(
        &self,
        key: &ScopedKey,
        fp: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        self.inner.begin(key, fp, lease).await
    }
    async fn complete(
        &self,
        key: &ScopedKey,
        token: Token,
        stored: &Stored,
        retain: Duration,
    ) -> Result<SystemTime, StoreError> {
        self.completes.fetch_add(1, Ordering::SeqCst);
        let failing = self
            .failing_completes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(StoreError::backend("complete", "injected failure"));
        }
        self.inner.complete(key, token, stored, retain).await
    }
    async fn release(&self, key: &ScopedKey, token: Token) -> Result<(), StoreError> {
        self.inner.release(key, token).await
    }
    async fn renew(
        &self,
        key: &ScopedKey,
        token: Token,
        lease: Duration,
    ) -> Result<Lease, StoreError> {
        self.inner.renew(key, token, lease).await
    }
    async fn get(&self, key: &ScopedKey) -> Result<Option<Record>, StoreError> {
        self.inner.get(key).await
    }
    async fn delete(&self, key: &ScopedKey) -> Result<bool, StoreError> {
        self.inner.delete(key).await
    }
    async fn sweep(&self, limit: usize) -> Result<usize, StoreError> {
        self.inner.sweep(limit).await
    }
}
