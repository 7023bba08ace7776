//! One test per row of docs/DESIGN.md's HTTP semantics table, and the details below it,
//! through the layer around a proxy to a real upstream socket.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use common::{Answer, Harness, Proxy, Upstream, post, unreachable_inner, with_body};
use http::{HeaderValue, Method, Request, StatusCode};
use idem_core::testing::FailingStore;
use idem_core::{BoxError, Key, MemoryStore, RecordState, Scope, ScopedKey, Store};
use idem_http::{IdempotencyLayer, IdempotencyPolicy, NotSent, OnConflict, ReplayHeaders};
use tower::{Layer, ServiceExt};

fn policy() -> IdempotencyPolicy {
    IdempotencyPolicy::default()
}

async fn wait_for(mut done: impl FnMut() -> bool) {
    for _ in 0..300 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("condition not reached in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_key_is_forwarded_once_with_its_header_unchanged_and_stored_before_it_returns() {
    let h = Harness::new(policy()).await;
    let answer = h
        .send(with_body(post("/payments", r#""pay-1""#, "{}"), "{}"))
        .await;

    assert_eq!(answer.status, StatusCode::CREATED);
    assert!(!answer.is_replay());
    answer.expires();
    let seen = answer.json();
    assert_eq!(seen["n"], 1);
    // The key header reached the upstream exactly as the client sent it.
    assert_eq!(seen["key"], r#""pay-1""#);
    assert_eq!(h.upstream.count(r#""pay-1""#), 1);

    // By the time the client has its answer, the store holds it.
    let key = ScopedKey::new(Scope::anonymous(), Key::new("pay-1").unwrap());
    let record = h.store.get(&key).await.unwrap().expect("a record");
    let RecordState::Completed { stored, .. } = record.state else {
        panic!("not completed: {record:?}")
    };
    assert_eq!(stored.status, 201);
    assert_eq!(stored.body.as_deref(), Some(&answer.body[..]));
    let names: Vec<&str> = stored.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"x-upstream") && names.contains(&"set-cookie"));
    assert!(!names.contains(&"date") && !names.contains(&"content-length"));
    assert_eq!(h.stats().executed(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn completed_key_is_replayed_with_status_headers_body_and_never_forwarded_again() {
    let h = Harness::new(policy()).await;
    let first = h
        .send(with_body(
            post("/payments", "pay-2", r#"{"cents":1}"#),
            r#"{"cents":1}"#,
        ))
        .await;
    let retry = h
        .send(with_body(
            post("/payments", "pay-2", r#"{"cents":1}"#),
            r#"{"cents":1}"#,
        ))
        .await;
    // The sf-string form names the same key.
    let quoted = h
        .send(with_body(
            post("/payments", r#""pay-2""#, r#"{"cents":1}"#),
            r#"{"cents":1}"#,
        ))
        .await;

    assert_eq!(h.upstream.total(), 1);
    for replay in [&retry, &quoted] {
        assert_eq!(replay.status, first.status);
        assert_eq!(replay.body, first.body);
        assert!(replay.is_replay(), "{replay:?}");
        replay.expires();
        assert_eq!(replay.header("x-upstream"), Some("yes"));
        assert_eq!(replay.header("location"), Some("/payments/1"));
        let cookies: Vec<_> = replay.headers.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        assert_eq!(
            replay.header("content-length"),
            None,
            "recomputed by the server"
        );
    }
    assert_eq!(first.expires(), retry.expires());
    assert_eq!(h.stats().replayed(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_key_in_flight_gets_409_with_retry_after() {
    let h = Arc::new(Harness::new(policy()).await);
    let first = tokio::spawn({
        let h = Arc::clone(&h);
        async move {
            h.send(with_body(
                post("/slow", "k", "{}").header("x-sleep-ms", "300"),
                "{}",
            ))
            .await
        }
    });
    wait_for(|| h.upstream.total() == 1).await;

    let second = h.send(with_body(post("/slow", "k", "{}"), "{}")).await;
    second.assert_problem(409, "in-flight");
    // No upstream latency observed yet on this route: the 1 s default, not the 60 s left
    // on the lease (the hint is when the answer is likely ready).
    assert_eq!(second.header("retry-after"), Some("1"));
    second.expires();

    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(h.upstream.total(), 1);
    assert_eq!(h.stats().in_flight(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wait_mode_answers_the_waiting_retry_with_the_replay() {
    let h = Arc::new(
        Harness::new(IdempotencyPolicy {
            on_conflict: OnConflict::Wait,
            ..policy()
        })
        .await,
    );
    let first = tokio::spawn({
        let h = Arc::clone(&h);
        async move {
            h.send(with_body(
                post("/slow", "w", "{}").header("x-sleep-ms", "200"),
                "{}",
            ))
            .await
        }
    });
    wait_for(|| h.upstream.total() == 1).await;
    let second = h.send(with_body(post("/slow", "w", "{}"), "{}")).await;
    let first = first.await.unwrap();
    assert_eq!(second.status, StatusCode::CREATED);
    assert!(second.is_replay());
    assert_eq!(second.body, first.body);
    assert_eq!(h.upstream.total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wait_mode_gives_up_after_wait_timeout_with_409() {
    let h = Arc::new(
        Harness::new(IdempotencyPolicy {
            on_conflict: OnConflict::Wait,
            wait_timeout: Duration::from_millis(60),
            ..policy()
        })
        .await,
    );
    let first = tokio::spawn({
        let h = Arc::clone(&h);
        async move {
            h.send(with_body(
                post("/slow", "w", "{}").header("x-sleep-ms", "300"),
                "{}",
            ))
            .await
        }
    });
    wait_for(|| h.upstream.total() == 1).await;
    let started = tokio::time::Instant::now();
    let second = h.send(with_body(post("/slow", "w", "{}"), "{}")).await;
    assert!(started.elapsed() >= Duration::from_millis(60));
    second.assert_problem(409, "in-flight");
    assert!(second.header("retry-after").is_some());
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(h.upstream.total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_key_for_a_different_request_is_422() {
    let h = Harness::new(policy()).await;
    let first = h
        .send(with_body(
            post("/payments", "m", r#"{"a":1}"#),
            r#"{"a":1}"#,
        ))
        .await;
    assert_eq!(first.status, StatusCode::CREATED);

    let other_body = h
        .send(with_body(
            post("/payments", "m", r#"{"a":2}"#),
            r#"{"a":2}"#,
        ))
        .await;
    let other_path = h
        .send(with_body(post("/refunds", "m", r#"{"a":1}"#), r#"{"a":1}"#))
        .await;
    let other_query = h
        .send(with_body(
            post("/payments?x=1", "m", r#"{"a":1}"#),
            r#"{"a":1}"#,
        ))
        .await;
    let other_method = h
        .send(with_body(
            post("/payments", "m", r#"{"a":1}"#).method(Method::PATCH),
            r#"{"a":1}"#,
        ))
        .await;
    for answer in [other_body, other_path, other_query, other_method] {
        let problem = answer.assert_problem(422, "mismatch");
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("different request")
        );
        answer.expires();
    }
    assert_eq!(h.upstream.total(), 1);
    assert_eq!(h.stats().mismatches(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_key_where_required_is_400() {
    let h = Harness::new(IdempotencyPolicy {
        key_required: true,
        ..policy()
    })
    .await;
    let request = Request::post("/payments").body(Body::from("{}")).unwrap();
    let answer = h.send(request).await;
    let problem = answer.assert_problem(400, "missing-key");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("idempotency-key")
    );
    assert!(answer.header("idempotency-key-expires").is_none());
    assert_eq!(h.upstream.total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_optional_key_passes_through_untouched() {
    let h = Harness::new(policy()).await;
    for _ in 0..2 {
        let request = Request::post("/payments").body(Body::from("{}")).unwrap();
        let answer = h.send(request).await;
        assert_eq!(answer.status, StatusCode::CREATED);
        assert!(!answer.is_replay());
        assert!(answer.header("idempotency-key-expires").is_none());
    }
    assert_eq!(h.upstream.total(), 2);
    assert_eq!(h.stats().executed(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_keys_are_400_and_say_what_is_wrong() {
    let h = Harness::new(policy()).await;
    let long = "k".repeat(256);
    let cases: Vec<(Vec<HeaderValue>, &str)> = vec![
        (vec![HeaderValue::from_static("")], "empty"),
        (vec![HeaderValue::from_static(r#""""#)], "empty"),
        (vec![HeaderValue::from_str(&long).unwrap()], "at most 255"),
        (
            vec![HeaderValue::from_bytes(b"caf\xe9").unwrap()],
            "not printable ASCII",
        ),
        (
            vec![HeaderValue::from_static(r#""unterminated"#)],
            "structured-field",
        ),
        (
            vec![HeaderValue::from_static("a"), HeaderValue::from_static("b")],
            "more than once",
        ),
    ];
    for (values, why) in cases {
        let mut request = with_body(
            Request::post("/payments").header("content-type", "application/json"),
            "{}",
        );
        for value in values {
            request.headers_mut().append("idempotency-key", value);
        }
        let answer = h.send(request).await;
        let problem = answer.assert_problem(400, "malformed-key");
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains(why), "{detail:?} should say {why:?}");
    }
    assert_eq!(h.upstream.total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_body_over_the_limit_is_413_and_nothing_is_stored() {
    let h = Harness::new(IdempotencyPolicy {
        max_request_body: 16,
        ..policy()
    })
    .await;
    let big = "x".repeat(17);

    // Refused on its declared length.
    let declared = h.send(with_body(post("/p", "big", &big), &big)).await;
    declared.assert_problem(413, "body-too-large");

    // Refused while reading a body that declared nothing.
    let chunks = vec![
        Ok::<_, std::io::Error>(Bytes::from("0123456789")),
        Ok(Bytes::from("0123456789")),
    ];
    let streamed = Request::post("/p")
        .header("idempotency-key", "big")
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap();
    let streamed = h.send(streamed).await;
    streamed.assert_problem(413, "body-too-large");
    assert_eq!(h.upstream.total(), 0);

    // Nothing was stored: the key is still free for a request that fits.
    let small = h.send(with_body(post("/p", "big", "{}"), "{}")).await;
    assert_eq!(small.status, StatusCode::CREATED);
    assert!(!small.is_replay());
    assert_eq!(h.upstream.total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_unreachable_is_503_with_retry_after_and_nothing_runs() {
    let upstream = Upstream::start().await;
    let store = FailingStore::default();
    let h = Harness::around(upstream, store.clone(), policy());
    let answer = h.send(with_body(post("/payments", "s", "{}"), "{}")).await;
    answer.assert_problem(503, "store-unavailable");
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert_eq!(h.upstream.total(), 0);
    assert!(store.calls() >= 1);
    assert_eq!(h.stats().store_errors(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fail_open_forwards_unprotected_and_counts_it() {
    let upstream = Upstream::start().await;
    let h = Harness::around(
        upstream,
        FailingStore::default(),
        IdempotencyPolicy {
            fail_open: true,
            ..policy()
        },
    );
    for _ in 0..2 {
        let answer = h.send(with_body(post("/payments", "s", "{}"), "{}")).await;
        assert_eq!(answer.status, StatusCode::CREATED);
        assert!(!answer.is_replay());
    }
    assert_eq!(h.upstream.total(), 2, "unprotected: both ran");
    assert_eq!(h.stats().fail_open(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_unreachable_is_502_and_the_key_is_released() {
    // A proxy to a port nobody listens on.
    let closed = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let store = Arc::new(MemoryStore::new());
    let service = IdempotencyLayer::new(Arc::clone(&store)).layer(Proxy::new(closed));
    let request = with_body(post("/payments", "u", "{}"), "{}");
    let answer = Answer::read(service.oneshot(request).await.unwrap()).await;
    answer.assert_problem(502, "upstream-unavailable");
    let key = ScopedKey::new(Scope::anonymous(), Key::new("u").unwrap());
    assert_eq!(store.get(&key).await.unwrap(), None, "released");

    // An inner service that fails once before sending, then works: the retry runs.
    let calls = Arc::new(AtomicU64::new(0));
    let service = IdempotencyLayer::new(MemoryStore::new())
        .layer(fails_once(Arc::clone(&calls), || {
            NotSent::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)).into()
        }));
    let send = || {
        let service = service.clone();
        async move {
            let request = with_body(post("/payments", "u", "{}"), "{}");
            Answer::read(service.oneshot(request).await.unwrap()).await
        }
    };
    send().await.assert_problem(502, "upstream-unavailable");
    let retry = send().await;
    assert_eq!(retry.status, StatusCode::OK);
    assert!(!retry.is_replay());
    assert_eq!(&retry.body[..], b"ok");
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // Always failing: answered, never an error from the service.
    let service = IdempotencyLayer::new(MemoryStore::new()).layer(unreachable_inner());
    let request = with_body(post("/payments", "u", "{}"), "{}");
    let answer = Answer::read(service.oneshot(request).await.unwrap()).await;
    answer.assert_problem(502, "upstream-unavailable");
}

/// An inner service whose first call fails with `error()`, and later ones answer `ok`.
fn fails_once(
    calls: Arc<AtomicU64>,
    error: fn() -> BoxError,
) -> impl tower::Service<Request<Body>, Response = http::Response<Body>, Error = BoxError, Future: Send>
+ Clone
+ Send
+ 'static {
    tower::service_fn(move |_: Request<Body>| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                Err(error())
            } else {
                Ok(http::Response::new(Body::from("ok")))
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_inner_error_after_sending_is_a_stored_unknown_outcome_never_run_again() {
    // A reset after the request may have been written: not provably unsent.
    let calls = Arc::new(AtomicU64::new(0));
    let store = Arc::new(MemoryStore::new());
    let service = IdempotencyLayer::new(Arc::clone(&store))
        .layer(fails_once(Arc::clone(&calls), || {
            std::io::Error::from(std::io::ErrorKind::ConnectionReset).into()
        }));
    let send = || {
        let service = service.clone();
        async move {
            let request = with_body(post("/payments", "unknown-1", "{}"), "{}");
            Answer::read(service.oneshot(request).await.unwrap()).await
        }
    };
    let first = send().await;
    first.assert_problem(502, "outcome-unknown");
    assert!(!first.is_replay());
    let retry = send().await;
    retry.assert_problem(502, "outcome-unknown");
    assert!(retry.is_replay(), "stored and replayed: {retry:?}");
    assert_eq!(retry.body, first.body);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "never run again");
    let key = ScopedKey::new(Scope::anonymous(), Key::new("unknown-1").unwrap());
    assert!(
        store.get(&key).await.unwrap().is_some(),
        "kept, not released"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn safe_and_unprotected_methods_pass_through_untouched() {
    let h = Harness::new(IdempotencyPolicy {
        max_request_body: 16,
        ..policy()
    })
    .await;
    // A body far over the limit proves it is not buffered or checked.
    let big = "x".repeat(4096);
    for method in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
        for _ in 0..2 {
            let request = Request::builder()
                .method(method)
                .uri("/items")
                .header("idempotency-key", "same")
                .body(Body::from(big.clone()))
                .unwrap();
            let answer = h.send(request).await;
            assert_eq!(answer.status, StatusCode::CREATED, "{method}");
            assert!(!answer.is_replay());
            assert!(answer.header("idempotency-key-expires").is_none());
        }
    }
    assert_eq!(h.upstream.total(), 12, "each one executed");
    assert_eq!(h.stats().executed(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn patch_is_protected_by_default() {
    let h = Harness::new(policy()).await;
    let patch = || {
        with_body(
            post("/items/1", "p", r#"{"name":"x"}"#).method(Method::PATCH),
            r#"{"name":"x"}"#,
        )
    };
    let first = h.send(patch()).await;
    let retry = h.send(patch()).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(retry.is_replay());
    assert_eq!(h.upstream.total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_errors_are_stored_and_replayed_by_default() {
    let h = Harness::new(policy()).await;
    let send = || {
        h.send(with_body(
            post("/p", "e", "{}").header("x-status", "500"),
            "{}",
        ))
    };
    let first = send().await;
    let retry = send().await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(retry.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(retry.is_replay());
    assert_eq!(h.upstream.total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_errors_release_the_key_when_not_stored() {
    let h = Harness::new(IdempotencyPolicy {
        store_server_errors: false,
        ..policy()
    })
    .await;
    let send = || {
        h.send(with_body(
            post("/p", "e", "{}").header("x-status", "503"),
            "{}",
        ))
    };
    let first = send().await;
    let retry = send().await;
    for answer in [&first, &retry] {
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(!answer.is_replay());
        assert!(answer.header("idempotency-key-expires").is_none());
    }
    assert_eq!(h.upstream.total(), 2, "the retry ran again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn response_too_large_to_keep_is_returned_once_then_reported_never_rerun() {
    let h = Harness::new(IdempotencyPolicy {
        max_stored_body: 1024,
        ..policy()
    })
    .await;
    let send = || {
        h.send(with_body(
            post("/export", "big", "{}").header("x-body-size", "100000"),
            "{}",
        ))
    };
    let first = send().await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(
        first.body.len(),
        100_000,
        "the whole body reached the client"
    );
    first.expires();

    let retry = send().await;
    let problem = retry.assert_problem(409, "response-not-kept");
    assert_eq!(problem["original_status"], 201);
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("response was too large to keep")
    );
    retry.expires();
    assert_eq!(h.upstream.total(), 1, "never a second execution");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scopes_keep_tenants_apart() {
    let h = Harness::new(policy()).await;
    let send = |name: &'static str, credential: &'static str| {
        h.send(with_body(
            post("/p", "shared-key", "{}").header(name, credential),
            "{}",
        ))
    };
    let a = send("authorization", "Bearer tenant-a").await;
    let b = send("authorization", "Bearer tenant-b").await;
    let c = send("x-api-key", "tenant-c").await;
    assert_eq!(h.upstream.total(), 3, "one execution per scope");
    assert!(!b.is_replay() && !c.is_replay());
    assert_ne!(a.body, b.body);

    let a_again = send("authorization", "Bearer tenant-a").await;
    let b_again = send("authorization", "Bearer tenant-b").await;
    assert!(a_again.is_replay() && b_again.is_replay());
    assert_eq!(a_again.body, a.body, "tenant a gets its own response");
    assert_eq!(b_again.body, b.body, "tenant b gets its own response");
    assert_eq!(h.upstream.total(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_key_order_and_whitespace_do_not_change_the_fingerprint() {
    let h = Harness::new(policy()).await;
    let first = r#"{"amount":100,"currency":"eur","meta":{"b":1,"a":2}}"#;
    let reordered = r#"{ "meta": {"a": 2, "b": 1}, "currency": "eur", "amount": 100 }"#;
    h.send(with_body(post("/p", "j", first), first)).await;
    let retry = h
        .send(with_body(post("/p", "j", reordered), reordered))
        .await;
    assert!(retry.is_replay(), "{retry:?}");
    assert_eq!(h.upstream.total(), 1);

    // Without a JSON content type the bytes count as they are.
    let text = |body: &str| {
        with_body(
            Request::post("/t")
                .header("idempotency-key", "t")
                .header("content-type", "text/plain"),
            body,
        )
    };
    h.send(text(first)).await;
    h.send(text(reordered))
        .await
        .assert_problem(422, "mismatch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_ignore_leaves_the_named_fields_out_of_the_fingerprint() {
    let h = Harness::new(IdempotencyPolicy {
        json_ignore: vec!["/sent_at".into(), "/meta/trace_id".into()],
        ..policy()
    })
    .await;
    let first = r#"{"amount":100,"sent_at":"10:00","meta":{"trace_id":"a1"}}"#;
    let retry = r#"{"amount":100,"sent_at":"10:05","meta":{"trace_id":"b2"}}"#;
    let changed = r#"{"amount":200,"sent_at":"10:00","meta":{"trace_id":"a1"}}"#;
    h.send(with_body(post("/p", "i", first), first)).await;
    assert!(
        h.send(with_body(post("/p", "i", retry), retry))
            .await
            .is_replay()
    );
    h.send(with_body(post("/p", "i", changed), changed))
        .await
        .assert_problem(422, "mismatch");
    assert_eq!(h.upstream.total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_headers_can_be_narrowed() {
    let h = Harness::new(IdempotencyPolicy {
        replay_headers: ReplayHeaders::AllExcept(vec!["set-cookie".into()]),
        ..policy()
    })
    .await;
    let send = || h.send(with_body(post("/p", "r", "{}"), "{}"));
    let first = send().await;
    assert!(
        first.headers.contains_key("set-cookie"),
        "the first client gets all"
    );
    let retry = send().await;
    assert!(retry.is_replay());
    assert!(!retry.headers.contains_key("set-cookie"));
    assert_eq!(retry.header("location"), Some("/payments/1"));
}

impl idem_testkit::semantics::Subject for Harness {
    fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    fn target(&self, path: &str) -> String {
        path.to_owned()
    }

    async fn send(&self, request: Request<Body>) -> Answer {
        Harness::send(self, request).await
    }
}

/// The table rows shared with the gateway's suite (idem-cli's gateway_http.rs), through
/// the layer in process.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_shared_http_semantics_hold_in_process() {
    let h = Harness::new(policy()).await;
    idem_testkit::semantics::run_all(&h).await;
}
