//! The gateway over a memory store at its limit (`memory:?max_records=N`): a new key is
//! refused with `503` `store-full` and `Retry-After`, nothing is forwarded for it, and every
//! record already held (completed or in flight) keeps answering as before: nothing is
//! evicted to make room.

mod common;

use std::time::Duration;

use axum::body::Body;
use common::*;
use http::Request;
use idem_core::RecordState;

fn slow(url: &str, key: &str, sleep: Duration) -> Request<Body> {
    Request::post(url)
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .header("x-sleep-ms", sleep.as_millis().to_string())
        .body(Body::from("{}"))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_memory_store_refuses_new_keys_with_503_and_evicts_nothing() {
    let upstream = Upstream::start().await;
    let mut overrides = upstream_only(&upstream);
    overrides.store = Some("memory:?max_records=3".to_owned());
    let gateway = TestGateway::start(&load_config("", overrides)).await;
    let client = client();
    let url = gateway.url("/payments");

    for key in ["full-1", "full-2"] {
        assert_eq!(send(&client, keyed(&url, key, "{}")).await.status, 201);
    }
    // The third record stays in flight while the store is full.
    let running = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move { send(&client, slow(&url, "full-3", Duration::from_secs(2))).await }
    });
    upstream.wait_total(3).await;

    let refused = send(&client, keyed(&url, "full-4", "{}")).await;
    let problem = refused.assert_problem(503, "store-full");
    assert_eq!(problem["title"], "Idempotency store full");
    assert_eq!(refused.retry_after(), 5);
    assert_eq!(upstream.count("full-4"), 0, "a refused key was forwarded");
    assert!(gateway.record("full-4").await.is_none());

    // What the store holds is untouched: completed keys replay, the running one is in flight.
    let replay = send(&client, keyed(&url, "full-1", "{}")).await;
    assert_eq!(replay.status, 201);
    assert!(replay.is_replay());
    send(&client, keyed(&url, "full-3", "{}"))
        .await
        .assert_problem(409, "in-flight");
    assert!(matches!(
        gateway.record("full-3").await.map(|r| r.state),
        Some(RecordState::InFlight { .. })
    ));

    // The running request completes although the store is full, and then replays.
    assert_eq!(running.await.unwrap().status, 201);
    let replay = send(&client, keyed(&url, "full-3", "{}")).await;
    assert!(replay.is_replay(), "{replay:?}");
    send(&client, keyed(&url, "full-4", "{}"))
        .await
        .assert_problem(503, "store-full");
    for key in ["full-1", "full-2", "full-3"] {
        assert_eq!(upstream.count(key), 1, "{key} ran again");
        assert!(gateway.record(key).await.is_some(), "{key} was evicted");
    }
    assert_eq!(upstream.total(), 3);
}
