//! Arbitrary header bytes as `Idempotency-Key`, through the gateway over real sockets: never
//! a panic or a 5xx; a malformed key never reaches the upstream; a valid one at most once.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Body;
use common::*;
use http::{HeaderValue, Request};
use idem_core::Key;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

fn key_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // Bytes a header value may carry: visible ASCII, space, tab, obs-text.
        proptest::collection::vec(
            prop_oneof![
                6 => 0x21u8..=0x7e,
                1 => Just(b' '),
                1 => Just(b'\t'),
                1 => 0x80u8..=0xff,
            ],
            0..270,
        ),
        // Keys that look like sf-strings, with quotes and escapes.
        proptest::collection::vec(
            prop_oneof![4 => 0x20u8..=0x7e, 1 => Just(b'"'), 1 => Just(b'\\')],
            0..20,
        )
        .prop_map(|mut inner| {
            inner.insert(0, b'"');
            inner.push(b'"');
            inner
        }),
        // Short keys from a small alphabet, so that some repeat (bare and quoted alike).
        "[ab]{1,2}".prop_map(String::into_bytes),
        "\"[ab]{1,2}\"".prop_map(String::into_bytes),
    ]
}

/// What the gateway's HTTP server receives for a header value: the value without the
/// leading and trailing whitespace HTTP/1.1 trims.
fn as_received(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| !matches!(b, b' ' | b'\t'));
    let end = bytes.iter().rposition(|b| !matches!(b, b' ' | b'\t'));
    match (start, end) {
        (Some(start), Some(end)) => &bytes[start..=end],
        _ => &[],
    }
}

#[test]
fn arbitrary_key_bytes_never_panic_or_5xx_and_only_valid_keys_reach_the_upstream() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (upstream, gateway) = runtime.block_on(async {
        let upstream = Upstream::start().await;
        let gateway = TestGateway::around(&upstream, "").await;
        (upstream, gateway)
    });
    let client = client();
    let url = gateway.url("/payments");
    let executed_keys = Arc::new(std::sync::Mutex::new(HashSet::<Key>::new()));
    let sent = AtomicU64::new(0);
    let (valid, malformed) = (AtomicU64::new(0), AtomicU64::new(0));

    let mut runner = TestRunner::new(Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&key_bytes(), |bytes| {
        let value = HeaderValue::from_bytes(&bytes).expect("generated a valid header value");
        sent.fetch_add(1, Ordering::SeqCst);
        let before = upstream.total();
        let request = Request::post(&url)
            .header("idempotency-key", value)
            .header("content-type", "application/json")
            .body(Body::from("{}"))
            .unwrap();
        let answer = runtime.block_on(send(&client, request));
        let after = upstream.total();
        prop_assert!(!answer.status.is_server_error(), "{bytes:?} got {answer:?}");
        match Key::parse(as_received(&bytes)) {
            Ok(key) => {
                valid.fetch_add(1, Ordering::SeqCst);
                prop_assert_eq!(answer.status, 201, "{:?} got {:?}", bytes, answer);
                let first = executed_keys.lock().unwrap().insert(key);
                if first {
                    prop_assert_eq!(after - before, 1, "{:?} did not run", bytes);
                    prop_assert!(!answer.is_replay());
                } else {
                    prop_assert_eq!(after - before, 0, "{:?} ran twice", bytes);
                    prop_assert!(answer.is_replay(), "{:?} got {:?}", bytes, answer);
                }
            }
            Err(_) => {
                malformed.fetch_add(1, Ordering::SeqCst);
                prop_assert_eq!(answer.status, 400, "{:?} got {:?}", bytes, answer);
                prop_assert_eq!(
                    after - before,
                    0,
                    "malformed {:?} reached the upstream",
                    bytes
                );
            }
        }
        Ok::<(), TestCaseError>(())
    });
    if let Err(error) = result {
        panic!("{error}");
    }
    assert!(sent.load(Ordering::SeqCst) >= 64);
    assert!(valid.load(Ordering::SeqCst) > 0, "no valid key was tried");
    assert!(
        malformed.load(Ordering::SeqCst) > 0,
        "no malformed key was tried"
    );
    // The gateway is still healthy after all of it.
    let answer = runtime.block_on(send(&client, keyed(&url, "after-the-storm", "{}")));
    assert_eq!(answer.status, 201);
    runtime.block_on(gateway.stop());
}
