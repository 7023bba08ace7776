//! The gateway over a store that always fails: fail closed (503 + Retry-After, the upstream
//! never called), or with `fail_open = true`, forwarded unprotected.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use axum::body::Body;
use common::*;
use http::Request;
use idem::{Begin, Fingerprint, Lease, Record, ScopedKey, Store, StoreError, Stored, Token};

/// A store whose every call fails, as an unreachable backend does.
#[derive(Debug, Default)]
struct FailingStore {
    calls: AtomicU64,
}

impl FailingStore {
    fn fail(&self, operation: &'static str) -> StoreError {
        self.calls.fetch_add(1, Ordering::SeqCst);
        StoreError::backend(
            operation,
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused"),
        )
    }
}

#[async_trait]
impl Store for FailingStore {
    async fn begin(
        &self,
        _: &ScopedKey,
        _: &Fingerprint,
        _: Duration,
    ) -> Result<Begin, StoreError> {
        Err(self.fail("begin"))
    }
    async fn complete(
        &self,
        _: &ScopedKey,
        _: Token,
        _: &Stored,
        _: Duration,
    ) -> Result<SystemTime, StoreError> {
        Err(self.fail("complete"))
    }
    async fn release(&self, _: &ScopedKey, _: Token) -> Result<(), StoreError> {
        Err(self.fail("release"))
    }
    async fn renew(&self, _: &ScopedKey, _: Token, _: Duration) -> Result<Lease, StoreError> {
        Err(self.fail("renew"))
    }
    async fn get(&self, _: &ScopedKey) -> Result<Option<Record>, StoreError> {
        Err(self.fail("get"))
    }
    async fn delete(&self, _: &ScopedKey) -> Result<bool, StoreError> {
        Err(self.fail("delete"))
    }
    async fn sweep(&self, _: usize) -> Result<usize, StoreError> {
        Err(self.fail("sweep"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_store_is_503_with_retry_after_and_the_upstream_is_never_called() {
    let upstream = Upstream::start().await;
    let store = Arc::new(FailingStore::default());
    let config = load_config("", upstream_only(&upstream));
    let gateway = TestGateway::with_store(&config, store.clone()).await;
    let client = client();

    for _ in 0..2 {
        let answer = send(&client, keyed(&gateway.url("/payments"), "sf-1", "{}")).await;
        answer.assert_problem(503, "store-unavailable");
        assert_eq!(answer.retry_after(), 1);
    }
    assert_eq!(upstream.total(), 0, "a request ran without its key claimed");
    assert!(store.calls.load(Ordering::SeqCst) >= 2);
    let errors: u64 = gateway
        .gateway
        .stats()
        .iter()
        .map(|s| s.store_errors())
        .sum();
    assert!(errors >= 2);

    // Requests that need no store are unaffected.
    let get = send(
        &client,
        Request::get(gateway.url("/payments"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(get.status, 201);
    let unkeyed = send(
        &client,
        post(&gateway.url("/payments"), None)
            .body(Body::from("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(unkeyed.status, 201);
    assert_eq!(upstream.total(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fail_open_a_failing_store_forwards_unprotected_and_counts_it() {
    let upstream = Upstream::start().await;
    let store = Arc::new(FailingStore::default());
    let config = load_config("[policy]\nfail_open = true\n", upstream_only(&upstream));
    let gateway = TestGateway::with_store(&config, store).await;
    let client = client();

    let answer = send(&client, keyed(&gateway.url("/payments"), "sf-2", "{}")).await;

    assert_eq!(answer.status, 201, "{answer:?}");
    assert!(!answer.is_replay());
    assert_eq!(upstream.count("sf-2"), 1);
    let fail_open: u64 = gateway.gateway.stats().iter().map(|s| s.fail_open()).sum();
    assert_eq!(fail_open, 1);
}
