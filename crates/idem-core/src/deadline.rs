//! [`TimeoutStore`]: a client-side deadline on every call to a store.

use std::future::Future;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::record::{Begin, Lease, Record, Stored, Token};
use crate::store::{Store, StoreError};
use crate::{Fingerprint, ScopedKey};

/// Wraps a store so that no call waits longer than `limit`: a slow, paused or partitioned
/// backend then answers [`StoreError::Timeout`] instead of holding the caller.
///
/// A timeout is not a failure of the operation, only of the wait: the backend may still
/// apply it. Callers treat it as they treat any store error (a `begin` that timed out is
/// answered `503` and may have claimed the key, which then stays held until its lease
/// ends; a `complete` that timed out is retried, which the contract makes safe).
///
/// ```
/// use std::time::Duration;
/// use idem_core::{Key, MemoryStore, Scope, ScopedKey, Store, TimeoutStore};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let store = TimeoutStore::new(MemoryStore::new(), Duration::from_secs(2));
/// let key = ScopedKey::new(Scope::anonymous(), Key::new("k").unwrap());
/// assert_eq!(store.get(&key).await.unwrap(), None);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct TimeoutStore<S> {
    inner: S,
    limit: Duration,
}

impl<S> TimeoutStore<S> {
    /// Every call to `inner` is given up after `limit`.
    pub fn new(inner: S, limit: Duration) -> Self {
        Self { inner, limit }
    }

    /// The deadline of each call.
    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// The wrapped store.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// Awaits `call`, giving up after `limit` with [`StoreError::Timeout`].
pub async fn within<T>(
    limit: Duration,
    operation: &'static str,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(limit, call).await {
        Ok(answer) => answer,
        Err(_) => Err(StoreError::Timeout {
            operation,
            after: limit,
        }),
    }
}

#[async_trait]
impl<S: Store> Store for TimeoutStore<S> {
    async fn begin(
        &self,
        key: &ScopedKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        within(
            self.limit,
            "begin",
            self.inner.begin(key, fingerprint, lease),
        )
        .await
    }
    async fn complete(
        &self,
        key: &ScopedKey,
        token: Token,
        stored: &Stored,
        retain: Duration,
    ) -> Result<SystemTime, StoreError> {
        within(
            self.limit,
            "complete",
            self.inner.complete(key, token, stored, retain),
        )
        .await
    }
    async fn release(&self, key: &ScopedKey, token: Token) -> Result<(), StoreError> {
        within(self.limit, "release", self.inner.release(key, token)).await
    }
    async fn renew(
        &self,
        key: &ScopedKey,
        token: Token,
        lease: Duration,
    ) -> Result<Lease, StoreError> {
        within(self.limit, "renew", self.inner.renew(key, token, lease)).await
    }
    async fn get(&self, key: &ScopedKey) -> Result<Option<Record>, StoreError> {
        within(self.limit, "get", self.inner.get(key)).await
    }
    async fn delete(&self, key: &ScopedKey) -> Result<bool, StoreError> {
        within(self.limit, "delete", self.inner.delete(key)).await
    }
    async fn sweep(&self, limit: usize) -> Result<usize, StoreError> {
        within(self.limit, "sweep", self.inner.sweep(limit)).await
    }
    async fn in_flight(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> Result<Vec<crate::InFlightRecord>, StoreError> {
        within(
            self.limit,
            "list in-flight records",
            self.inner.in_flight(older_than, limit),
        )
        .await
    }
    fn fatal_error(&self) -> Option<String> {
        self.inner.fatal_error()
    }
    fn counters(&self) -> crate::StoreCounters {
        self.inner.counters()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;
    use crate::faulty::FaultyStore;

    #[tokio::test(start_paused = true)]
    async fn a_stalled_store_answers_timeout_at_the_deadline() {
        let stalled = FaultyStore::new(MemoryStore::new());
        stalled.stall_everything(true);
        let store = TimeoutStore::new(stalled, Duration::from_millis(300));
        let started = tokio::time::Instant::now();
        let key = ScopedKey::new(crate::Scope::anonymous(), crate::Key::new("k").unwrap());
        let error = store.get(&key).await.unwrap_err();
        assert!(
            matches!(error, StoreError::Timeout { operation: "get", after } if after == Duration::from_millis(300)),
            "{error:?}"
        );
        assert_eq!(started.elapsed(), Duration::from_millis(300));
    }
}
