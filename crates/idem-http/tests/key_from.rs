//! `key_from = "fingerprint"`: a request without a key is keyed by its fingerprint for
//! `fingerprint_window`, through the layer around a proxy to a real upstream socket. The
//! store's clock is a `ManualClock`, so the window ends when the test says, not by sleeping.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use common::{Harness, Upstream, post, with_body};
use http::{Request, StatusCode};
use idem_core::{Clock, ManualClock, MemoryStore};
use idem_http::{IdempotencyPolicy, KeyFrom, fmt_http_date};
use idem_testkit::wait_until;

const WINDOW: Duration = Duration::from_secs(10 * 60);

fn derives() -> IdempotencyPolicy {
    IdempotencyPolicy {
        key_from: KeyFrom::Fingerprint,
        fingerprint_window: WINDOW,
        ..IdempotencyPolicy::default()
    }
}

/// The layer with `policy`, its store on a clock the test moves.
async fn harness(policy: IdempotencyPolicy) -> (Harness, ManualClock) {
    let clock = ManualClock::new();
    let store = Arc::new(MemoryStore::with_clock(clock.clone()));
    let harness = Harness::around(Upstream::start().await, store, policy);
    (harness, clock)
}

/// A JSON `POST` without a key, from an identified caller.
fn keyless(path: &str, body: &str) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/json")
        .header("authorization", "Bearer caller-a")
        .body(Body::from(body.to_owned()))
        .unwrap()
}

/// A JSON `POST` without a key nor any identity.
fn anonymous_keyless(path: &str, body: &str) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_keyless_post_runs_once_and_is_replayed() {
    let (h, clock) = harness(derives()).await;

    let first = h.send(keyless("/payments", r#"{"cents":100}"#)).await;
    // The same operation, as a retrying client sends it again (key order and whitespace
    // do not matter to a JSON fingerprint).
    let retry = h.send(keyless("/payments", r#"{ "cents": 100 }"#)).await;

    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.is_replay(), "{first:?}");
    assert!(retry.is_replay(), "{retry:?}");
    assert_eq!(retry.status, first.status);
    assert_eq!(retry.body, first.body);
    assert_eq!(h.upstream.total(), 1);
    // Kept for the window, not for `retention` (24 h).
    let window_end = fmt_http_date(clock.now() + WINDOW);
    assert_eq!(first.expires(), window_end);
    assert_eq!(retry.expires(), window_end);
    // The derived key is idem's own: the upstream saw the request as the client sent it.
    let seen = h.upstream.last();
    assert!(!seen.headers.contains_key("idempotency-key"), "{seen:?}");
    assert_eq!(h.upstream.count(""), 1);
    assert_eq!(h.stats().derived(), 2);
    assert_eq!(h.stats().replayed(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_body_path_query_or_caller_runs_again() {
    let (h, _clock) = harness(derives()).await;
    let base = || keyless("/payments?to=a", r#"{"cents":100}"#);
    let first = h.send(base()).await;
    assert!(!first.is_replay());

    let others = [
        keyless("/payments?to=a", r#"{"cents":101}"#),
        keyless("/refunds?to=a", r#"{"cents":100}"#),
        keyless("/payments?to=b", r#"{"cents":100}"#),
        Request::post("/payments?to=a")
            .header("content-type", "text/plain")
            .header("authorization", "Bearer caller-a")
            .body(Body::from(r#"{"cents":100}"#))
            .unwrap(),
        Request::post("/payments?to=a")
            .header("content-type", "application/json")
            .header("authorization", "Bearer another-caller")
            .body(Body::from(r#"{"cents":100}"#))
            .unwrap(),
    ];
    for (i, other) in others.into_iter().enumerate() {
        let answer = h.send(other).await;
        // Each is a request of its own: it runs, and is neither a replay nor a `422`.
        assert_eq!(answer.status, StatusCode::CREATED, "{i}: {answer:?}");
        assert!(!answer.is_replay(), "{i}: {answer:?}");
        assert_eq!(h.upstream.total(), i as u64 + 2, "{i}");
    }
    // And the first is still its own: its retry replays.
    assert!(h.send(base()).await.is_replay());
    assert_eq!(h.upstream.total(), 6);
    assert_eq!(h.stats().mismatches(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_with_a_key_still_uses_its_key() {
    let (h, clock) = harness(IdempotencyPolicy {
        fingerprint_window: Duration::from_secs(60),
        ..derives()
    })
    .await;
    let body = r#"{"cents":7}"#;

    let keyed = h
        .send(with_body(post("/payments", "k-7", body), body))
        .await;
    // The same request without the key is another operation, under a derived key.
    let derived = h.send(keyless("/payments", body)).await;
    assert!(!keyed.is_replay() && !derived.is_replay());
    assert_eq!(h.upstream.count("k-7"), 1);
    assert_eq!(h.upstream.total(), 2);
    // The client's key keeps `retention`, not the window.
    assert_eq!(
        keyed.expires(),
        fmt_http_date(clock.now() + Duration::from_secs(24 * 60 * 60))
    );

    clock.advance(Duration::from_secs(61));
    let retry = h
        .send(with_body(post("/payments", "k-7", body), body))
        .await;
    assert!(retry.is_replay(), "{retry:?}");
    assert_eq!(retry.body, keyed.body);
    // The key is still bound to its request: another body under it is a `422`.
    let other = r#"{"cents":8}"#;
    h.send(with_body(post("/payments", "k-7", other), other))
        .await
        .assert_problem(422, "mismatch");
    // A malformed key is refused, not replaced by a derived one.
    h.send(with_body(post("/payments", "", body), body))
        .await
        .assert_problem(400, "malformed-key");
    assert_eq!(h.upstream.total(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_the_window_the_same_request_runs_again() {
    let (h, clock) = harness(derives()).await;
    let pay = || keyless("/payments", r#"{"cents":100}"#);

    assert!(!h.send(pay()).await.is_replay());
    clock.advance(WINDOW - Duration::from_secs(1));
    assert!(h.send(pay()).await.is_replay());
    assert_eq!(h.upstream.total(), 1);

    clock.advance(Duration::from_secs(2));
    let again = h.send(pay()).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert!(!again.is_replay(), "{again:?}");
    assert_eq!(again.json()["execution"], 2);
    assert_eq!(h.upstream.total(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_required_does_not_refuse_a_request_keyed_by_its_fingerprint() {
    let (h, _clock) = harness(IdempotencyPolicy {
        key_required: true,
        ..derives()
    })
    .await;
    let answer = h.send(keyless("/payments", "{}")).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{answer:?}");
    assert!(h.send(keyless("/payments", "{}")).await.is_replay());
    assert_eq!(h.upstream.total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keyless_duplicate_of_a_running_request_is_409() {
    let (h, _clock) = harness(derives()).await;
    let h = Arc::new(h);
    let slow = || {
        Request::post("/payments")
            .header("content-type", "application/json")
            .header("x-sleep-ms", "500")
            .header("authorization", "Bearer caller-a")
            .body(Body::from("{}"))
            .unwrap()
    };
    let first = tokio::spawn({
        let h = Arc::clone(&h);
        async move { h.send(slow()).await }
    });
    wait_until("the first request to reach the upstream", || {
        h.upstream.total() == 1
    })
    .await;

    let duplicate = h.send(slow()).await;
    duplicate.assert_problem(409, "in-flight");
    assert!(duplicate.retry_after() >= 1);
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(h.upstream.total(), 1);
    assert!(h.send(slow()).await.is_replay());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_scope_required_an_anonymous_keyless_request_is_refused() {
    let (h, _clock) = harness(IdempotencyPolicy {
        scope_required: true,
        ..derives()
    })
    .await;
    h.send(anonymous_keyless("/payments", "{}"))
        .await
        .assert_problem(400, "missing-identity");
    assert_eq!(h.upstream.total(), 0);
}

// Callers without an identity share one scope: deriving their keys would hand one the
// answer meant for another who sent the same body, and skip the second one's operation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_anonymous_keyless_request_is_not_keyed_by_its_fingerprint() {
    let (h, _clock) = harness(derives()).await;
    for execution in 1..=2 {
        let answer = h.send(anonymous_keyless("/payments", "{}")).await;
        assert_eq!(answer.status, StatusCode::CREATED, "{answer:?}");
        assert!(!answer.is_replay(), "{answer:?}");
        assert_eq!(h.upstream.total(), execution);
    }
    assert_eq!(h.stats().derived(), 0);

    let (h, _clock) = harness(IdempotencyPolicy {
        key_required: true,
        ..derives()
    })
    .await;
    h.send(anonymous_keyless("/payments", "{}"))
        .await
        .assert_problem(400, "missing-key");
    assert_eq!(h.upstream.total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_key_from_fingerprint_a_keyless_request_passes_through() {
    let (h, _clock) = harness(IdempotencyPolicy::default()).await;
    for _ in 0..2 {
        let answer = h.send(keyless("/payments", "{}")).await;
        assert!(!answer.is_replay());
        assert!(answer.header("idempotency-key-expires").is_none());
    }
    assert_eq!(h.upstream.total(), 2);
    assert_eq!(h.stats().derived(), 0);
}
