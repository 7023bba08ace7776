//! The gateway over a store that always fails: fail closed (503 + Retry-After, the upstream
//! never called), or with `fail_open = true`, forwarded unprotected.

mod common;

use std::sync::Arc;

use axum::body::Body;
use common::*;
use http::Request;

use idem_core::testing::FailingStore;

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
    assert!(store.calls() >= 2);
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
