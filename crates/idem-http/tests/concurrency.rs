//! Many requests with one key, and clients that go away mid-request.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use common::{Answer, Harness, Upstream, post, with_body};
use http::StatusCode;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use idem_core::MemoryStore;
use idem_http::{IdempotencyLayer, IdempotencyPolicy, OnConflict};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn storm(h: Arc<Harness>, n: usize) -> Vec<Answer> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let h = Arc::clone(&h);
            tokio::spawn(async move {
                let request = with_body(
                    post("/storm", "one-key", r#"{"a":1}"#).header("x-sleep-ms", "200"),
                    r#"{"a":1}"#,
                );
                h.send(request).await
            })
        })
        .collect();
    let mut answers = Vec::with_capacity(n);
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn one_key_256_concurrent_requests_reject_mode_runs_once() {
    let h = Arc::new(Harness::new(IdempotencyPolicy::default()).await);
    let answers = storm(Arc::clone(&h), 256).await;

    assert_eq!(h.upstream.total(), 1, "the upstream ran once");
    let originals: Vec<_> = answers
        .iter()
        .filter(|a| a.status == StatusCode::CREATED && !a.is_replay())
        .collect();
    assert_eq!(originals.len(), 1);
    let original = originals[0];
    for answer in &answers {
        match answer.status {
            StatusCode::CREATED => assert_eq!(answer.body, original.body),
            StatusCode::CONFLICT => {
                answer.assert_problem(409, "in-flight");
                assert!(answer.header("retry-after").is_some());
            }
            other => panic!("unexpected {other}: {answer:?}"),
        }
    }
    assert!(answers.iter().any(|a| a.status == StatusCode::CONFLICT));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn one_key_256_concurrent_requests_wait_mode_all_get_the_same_bytes() {
    let h = Arc::new(
        Harness::new(IdempotencyPolicy {
            on_conflict: OnConflict::Wait,
            ..IdempotencyPolicy::default()
        })
        .await,
    );
    let answers = storm(Arc::clone(&h), 256).await;

    assert_eq!(h.upstream.total(), 1, "the upstream ran once");
    let first = &answers[0];
    for answer in &answers {
        assert_eq!(answer.status, StatusCode::CREATED);
        assert_eq!(answer.body, first.body, "byte-identical");
    }
    assert_eq!(answers.iter().filter(|a| !a.is_replay()).count(), 1);
    assert_eq!(h.stats().replayed(), 255);
}

async fn until_not_in_flight(h: &Harness, request: impl Fn() -> http::Request<Body>) -> Answer {
    for _ in 0..100 {
        let answer = h.send(request()).await;
        if answer.status != StatusCode::CONFLICT {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("still in flight");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_request_future_still_completes_and_the_retry_replays_it() {
    let h = Arc::new(Harness::new(IdempotencyPolicy::default()).await);
    let request = || with_body(post("/p", "gone", "{}").header("x-sleep-ms", "200"), "{}");
    let client = tokio::spawn({
        let h = Arc::clone(&h);
        let request = request();
        async move { h.send(request).await }
    });
    for _ in 0..200 {
        if h.upstream.total() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(h.upstream.total(), 1);
    // The client gives up while the upstream is still working.
    client.abort();
    assert!(client.await.unwrap_err().is_cancelled());

    let retry = until_not_in_flight(&h, request).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.is_replay(), "{retry:?}");
    assert_eq!(retry.json()["n"], 1);
    assert_eq!(h.upstream.total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_closing_its_socket_mid_request_still_gets_the_stored_response_on_retry() {
    // The layered axum app, served on a real socket; its handler is the upstream.
    let upstream = Upstream::unbound();
    let layer = IdempotencyLayer::with_policy(
        MemoryStore::new(),
        IdempotencyPolicy {
            on_conflict: OnConflict::Wait,
            ..IdempotencyPolicy::default()
        },
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = upstream.app().layer(layer);
    tokio::spawn(async move { axum::serve(listener, app).await });

    // A raw client: send the request, then hang up while the handler sleeps.
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let raw = "POST /charge HTTP/1.1\r\nhost: idem\r\nidempotency-key: sock-1\r\n\
               content-type: application/json\r\nx-sleep-ms: 200\r\ncontent-length: 2\r\n\r\n{}";
    socket.write_all(raw.as_bytes()).await.unwrap();
    for _ in 0..200 {
        if upstream.total() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(upstream.total(), 1);
    drop(socket);

    // The retry, over a fresh connection, waits for the detached call and gets its replay.
    let client = Client::builder(TokioExecutor::new()).build_http::<Body>();
    let retry = http::Request::post(format!("http://{addr}/charge"))
        .header("idempotency-key", "sock-1")
        .header("content-type", "application/json")
        .body(Body::from("{}"))
        .unwrap();
    let retry = client.request(retry).await.unwrap();
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert!(retry.headers().contains_key("idempotency-key-expires"));
    let body = retry.into_body().collect().await.unwrap().to_bytes();
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["n"], 1);
    assert_eq!(upstream.total(), 1, "one execution");

    // A second raw request on a socket also reads the replay in full.
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let raw = "POST /charge HTTP/1.1\r\nhost: idem\r\nidempotency-key: sock-1\r\n\
               content-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}";
    socket.write_all(raw.as_bytes()).await.unwrap();
    let mut text = String::new();
    socket.read_to_string(&mut text).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 201"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("idempotent-replayed: true")
    );
    assert_eq!(upstream.total(), 1);
}
