//! Many concurrent requests with one key, and clients that go away mid-request: exactly one
//! execution, over real sockets.

mod common;

use std::time::Duration;

use axum::body::Body;
use common::*;
use idem_cli::config::Overrides;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;

const CONCURRENT: usize = 256;

/// Fires `CONCURRENT` identical keyed requests at once, each on its own connection.
async fn storm(gateway: &TestGateway, key: &str) -> Vec<Answer> {
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(CONCURRENT));
    let mut tasks = JoinSet::new();
    for _ in 0..CONCURRENT {
        let url = gateway.url("/payments");
        let key = key.to_owned();
        let barrier = std::sync::Arc::clone(&barrier);
        tasks.spawn(async move {
            // A client each: one connection per request, all open at once.
            let client = client();
            let request = post(&url, Some(&key))
                .header("x-sleep-ms", "300")
                .body(Body::from(r#"{"cents":100}"#))
                .unwrap();
            barrier.wait().await;
            send(&client, request).await
        });
    }
    let mut answers = Vec::with_capacity(CONCURRENT);
    while let Some(answer) = tasks.join_next().await {
        answers.push(answer.unwrap());
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_with_one_key_execute_once_in_reject_mode() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, "").await;

    let answers = storm(&gateway, "storm-reject").await;

    assert_eq!(upstream.count("storm-reject"), 1, "executed more than once");
    assert_eq!(upstream.total(), 1);
    let originals: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.status == 201 && !a.is_replay())
        .collect();
    assert_eq!(originals.len(), 1, "exactly one answer is the execution");
    let original = originals[0];
    for answer in &answers {
        match answer.status.as_u16() {
            201 if answer.is_replay() => assert_eq!(answer.body, original.body),
            201 => {}
            409 => {
                answer.assert_problem(409, "in-flight");
                answer.retry_after();
            }
            _ => panic!("unexpected answer: {answer:?}"),
        }
    }
    assert!(
        answers.iter().any(|a| a.status == 409),
        "the upstream was slow, yet no duplicate saw it in flight"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_with_one_key_all_get_the_same_answer_in_wait_mode() {
    let upstream = Upstream::start().await;
    let config = load_config(
        "",
        Overrides {
            on_conflict: Some(idem_http::OnConflict::Wait),
            ..upstream_only(&upstream)
        },
    );
    let gateway = TestGateway::start(&config).await;

    let answers = storm(&gateway, "storm-wait").await;

    assert_eq!(upstream.count("storm-wait"), 1, "executed more than once");
    assert_eq!(upstream.total(), 1);
    let originals = answers.iter().filter(|a| !a.is_replay()).count();
    assert_eq!(originals, 1, "exactly one answer is the execution");
    let first = &answers[0];
    assert_eq!(first.status, 201, "{first:?}");
    for answer in &answers {
        assert_eq!(answer.status, first.status, "{answer:?}");
        assert_eq!(answer.body, first.body, "not byte-identical");
        assert_eq!(answer.replayable_headers(), first.replayable_headers());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_request_still_gets_its_response_on_retry() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, "").await;
    let client = client();

    // Raw TCP: send the whole request, then hang up while the upstream is still working.
    let body = r#"{"cents":100}"#;
    let request = format!(
        "POST /payments HTTP/1.1\r\nhost: gw\r\nidempotency-key: gone-1\r\n\
         content-type: application/json\r\nx-sleep-ms: 300\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    upstream.wait_total(1).await;
    drop(stream);

    let retry = || {
        post(&gateway.url("/payments"), Some("gone-1"))
            .header("x-sleep-ms", "300")
            .body(Body::from(body))
            .unwrap()
    };
    let answer = eventually("the retry to stop being 409", || {
        let client = client.clone();
        let request = retry();
        async move {
            let answer = send(&client, request).await;
            if answer.status == 409 {
                answer.assert_problem(409, "in-flight");
                None
            } else {
                Some(answer)
            }
        }
    })
    .await;

    assert_eq!(answer.status, 201, "{answer:?}");
    assert!(
        answer.is_replay(),
        "the retry ran instead of replaying: {answer:?}"
    );
    assert_eq!(answer.json()["n"], 1);
    assert_eq!(answer.json()["key"], "gone-1");
    assert_eq!(upstream.count("gone-1"), 1);
    // Nothing more runs later.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(upstream.total(), 1);
    assert_eq!(gateway.gateway.running(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_before_the_upstream_is_reached_leaves_no_execution_twice() {
    // Hang up right after sending: the key may or may not have been claimed yet, but either
    // way the operation runs at most once and the retry ends with its response.
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, "").await;
    let client = client();
    let body = "{}";
    let request = format!(
        "POST /payments HTTP/1.1\r\nhost: gw\r\nidempotency-key: gone-2\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    drop(stream);

    let answer = eventually("a final answer", || {
        let client = client.clone();
        let request = keyed(&gateway.url("/payments"), "gone-2", body);
        async move {
            let answer = send(&client, request).await;
            (answer.status != 409).then_some(answer)
        }
    })
    .await;
    assert_eq!(answer.status, 201, "{answer:?}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(upstream.count("gone-2"), 1);
}
