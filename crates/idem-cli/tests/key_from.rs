//! `key_from = "fingerprint"` through `idem serve` (in process, real sockets): a route whose
//! clients send no key gets keys from the request itself, from the TOML route policy.

mod common;

use std::time::{Duration, SystemTime};

use axum::body::Body;
use common::*;
use http::Request;
use idem_cli::config::{FileConfig, GatewayConfig, Overrides};
use idem_http::fmt_http_date;

/// `/orders` derives keys (for `window`); everything else keeps the defaults.
fn orders_derive(window: &str) -> String {
    format!(
        "[[route]]\nprefix = \"/orders\"\n\
         policy = {{ key_from = \"fingerprint\", fingerprint_window = \"{window}\" }}\n"
    )
}

/// A JSON `POST` without a key, from an identified caller (anonymous callers share one
/// scope, so their requests are never keyed by their fingerprint).
fn keyless(url: &str, body: &str) -> Request<Body> {
    post(url, None)
        .header("authorization", "Bearer orders-client")
        .body(Body::from(body.to_owned()))
        .unwrap()
}

/// A client whose answer is lost after the gateway answered, then its retry: the upstream
/// runs the order once, and the retry gets the first answer, marked replayed.
async fn a_lost_answer_is_retried_into_one_execution(gateway: &TestGateway, upstream: &Upstream) {
    let hop = FaultProxy::start(gateway.addr).await;
    let url = format!("http://{}/orders", hop.addr());
    let order = r#"{"item":"book","qty":1}"#;

    hop.set(Fault::DropAfterRequest).await;
    let lost = client().request(keyless(&url, order)).await;
    assert!(lost.is_err(), "the answer was meant to be lost: {lost:?}");
    upstream.wait_total(1).await;

    hop.set(Fault::Pass).await;
    let retry = send(&client(), keyless(&url, order)).await;
    assert_eq!(retry.status, 201, "{retry:?}");
    assert!(retry.is_replay(), "{retry:?}");
    assert_eq!(retry.json()["execution"], 1);
    assert_eq!(upstream.total(), 1);
    // The derived key stays in the gateway: the upstream saw no key header.
    assert_eq!(upstream.count(""), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_keyless_post_runs_once() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, &orders_derive("10m")).await;
    a_lost_answer_is_retried_into_one_execution(&gateway, &upstream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_keyless_post_runs_once_on_redis() {
    let prefix = RedisPrefix::new("key-from");
    let upstream = Upstream::start().await;
    let config = load_config(
        &orders_derive("10m"),
        Overrides {
            store: Some(prefix.store_url(None)),
            ..upstream_only(&upstream)
        },
    );
    let gateway = TestGateway::start(&config).await;
    a_lost_answer_is_retried_into_one_execution(&gateway, &upstream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_one_postgres_derive_the_same_key() {
    let schema = PostgresSchema::new("key_from");
    let upstream = Upstream::start().await;
    let config = load_config(
        &orders_derive("10m"),
        Overrides {
            store: Some(schema.store_url(None)),
            ..upstream_only(&upstream)
        },
    );
    let first = TestGateway::start(&config).await;
    let second = TestGateway::start(&config).await;
    let order = r#"{"item":"pen","qty":3}"#;

    let ran = send(&client(), keyless(&first.url("/orders"), order)).await;
    let retry = send(&client(), keyless(&second.url("/orders"), order)).await;

    assert!(!ran.is_replay(), "{ran:?}");
    assert!(retry.is_replay(), "{retry:?}");
    assert_eq!(retry.body, ran.body);
    assert_eq!(upstream.total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_body_or_path_runs_again() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, &orders_derive("10m")).await;
    let client = client();

    let first = send(&client, keyless(&gateway.url("/orders"), r#"{"qty":1}"#)).await;
    let other_body = send(&client, keyless(&gateway.url("/orders"), r#"{"qty":2}"#)).await;
    let other_path = send(
        &client,
        keyless(&gateway.url("/orders/gift"), r#"{"qty":1}"#),
    )
    .await;
    for answer in [&first, &other_body, &other_path] {
        assert_eq!(answer.status, 201, "{answer:?}");
        assert!(!answer.is_replay(), "{answer:?}");
    }
    assert_eq!(upstream.total(), 3);

    // Outside the route, a keyless request is not protected: it runs every time.
    for _ in 0..2 {
        let answer = send(&client, keyless(&gateway.url("/payments"), r#"{"qty":1}"#)).await;
        assert!(!answer.is_replay(), "{answer:?}");
        assert!(answer.header("idempotency-key-expires").is_none());
    }
    assert_eq!(upstream.total(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_request_on_the_route_still_uses_its_key() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, &orders_derive("10m")).await;
    let client = client();
    let order = r#"{"qty":1}"#;

    let keyed_first = send(&client, keyed(&gateway.url("/orders"), "ord-1", order)).await;
    let keyed_retry = send(&client, keyed(&gateway.url("/orders"), "ord-1", order)).await;
    let keyless_same = send(&client, keyless(&gateway.url("/orders"), order)).await;
    let keyed_other = send(
        &client,
        keyed(&gateway.url("/orders"), "ord-1", r#"{"qty":9}"#),
    )
    .await;

    assert!(!keyed_first.is_replay());
    assert!(keyed_retry.is_replay(), "{keyed_retry:?}");
    // The client's key reaches the upstream, and binds its request as ever.
    assert_eq!(upstream.count("ord-1"), 1);
    assert_eq!(keyed_first.json()["key"], "ord-1");
    keyed_other.assert_problem(422, "mismatch");
    // The same request without the key is an operation of its own.
    assert!(!keyless_same.is_replay(), "{keyless_same:?}");
    assert_eq!(upstream.total(), 2);
    assert!(gateway.record("ord-1").await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_window_the_same_request_runs_again() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, &orders_derive("1s")).await;
    let client = client();
    let order = r#"{"qty":1}"#;

    let before = SystemTime::now();
    let first = send(&client, keyless(&gateway.url("/orders"), order)).await;
    assert!(!first.is_replay());
    // The record ends with the window (a second from now), not with retention (24 h).
    let ends: Vec<String> = (0..=10)
        .map(|s| fmt_http_date(before + Duration::from_secs(s)))
        .collect();
    assert!(ends.contains(&first.expires().to_owned()), "{first:?}");

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let again = send(&client, keyless(&gateway.url("/orders"), order)).await;
    assert_eq!(again.status, 201, "{again:?}");
    assert!(!again.is_replay(), "{again:?}");
    assert_eq!(upstream.total(), 2);
}

#[test]
fn the_route_policy_refuses_bad_values_naming_the_field() {
    let overrides = Overrides {
        upstream: Some("http://127.0.0.1:3000".to_owned()),
        store: Some("memory:".to_owned()),
        ..Overrides::default()
    };
    for (file, field) in [
        (
            "[[route]]\nprefix = \"/o\"\npolicy = { key_from = \"body\" }\n",
            "route[0].policy.key_from",
        ),
        (
            "[[route]]\nprefix = \"/o\"\npolicy = { fingerprint_window = \"0s\" }\n",
            "route[0].policy.fingerprint_window",
        ),
        (
            "[[route]]\nprefix = \"/o\"\npolicy = { fingerprint_window = \"400days\" }\n",
            "route[0].policy.fingerprint_window",
        ),
        (
            "[policy]\nfingerprint_window = \"soon\"\n",
            "policy.fingerprint_window",
        ),
        ("[policy]\nkey_from = 1\n", "policy.key_from"),
    ] {
        let parsed: FileConfig = toml::from_str(file).unwrap();
        let error =
            GatewayConfig::resolve(parsed, &overrides).expect_err(&format!("accepted: {file}"));
        assert_eq!(error.field, field, "`{file}`: {error}");
    }
    let parsed: FileConfig = toml::from_str(&orders_derive("30s")).unwrap();
    let config = GatewayConfig::resolve(parsed, &overrides).unwrap();
    assert_eq!(
        config.routes[0].policy.key_from,
        idem_http::KeyFrom::Fingerprint
    );
    assert_eq!(
        config.routes[0].policy.fingerprint_window,
        Duration::from_secs(30)
    );
    // `--check` says what becomes of a request without a key, per policy.
    let described = config.describe();
    assert!(
        described.contains("requests without one are keyed by their fingerprint for 30s"),
        "{described}"
    );
    assert!(
        described.contains("requests without one pass through"),
        "the default policy: {described}"
    );
}
