//! Every row of docs/DESIGN.md's HTTP semantics table, through the gateway over real
//! sockets: a client, the gateway (in process, on 127.0.0.1:0) and a counting upstream.

mod common;

use std::time::Duration;

use axum::body::Body;
use common::*;
use http::{HeaderValue, Method, Request};
use idem_cli::config::Overrides;
use idem_core::RecordState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_key_is_forwarded_once_stored_and_returned() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, "").await;
    let client = client();

    let answer = send(&client, keyed(&gateway.url("/payments"), "new-1", "{}")).await;

    assert_eq!(answer.status, 201, "{answer:?}");
    assert!(!answer.is_replay(), "{answer:?}");
    answer.expires();
    assert_eq!(answer.json()["key"], "new-1");
    assert_eq!(answer.json()["n"], 1);
    assert_eq!(answer.header("location"), Some("/payments/1"));
    assert_eq!(upstream.count("new-1"), 1);
    assert_eq!(upstream.total(), 1);
    let record = gateway
        .record("new-1")
        .await
        .expect("the response is stored");
    match &record.state {
        RecordState::Completed { stored, .. } => {
            assert_eq!(stored.status, 201);
            assert_eq!(stored.body.as_deref(), Some(&answer.body[..]));
        }
        other => panic!("expected a completed record, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_key_is_replayed_identically_and_never_forwarded_again() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, "").await;
    let client = client();

    let first = send(&client, keyed(&gateway.url("/payments"), "rep-1", "{}")).await;
    let mut replays = Vec::new();
    for _ in 0..3 {
        // A new connection each time too: the replay does not depend on the connection.
        replays.push(
            send(
                &common::client(),
                keyed(&gateway.url("/payments"), "rep-1", "{}"),
            )
            .await,
        );
    }

    assert_eq!(first.status, 201);
    assert!(!first.is_replay());
    for replay in &replays {
        assert!(replay.is_replay(), "{replay:?}");
        assert_eq!(replay.status, first.status);
        assert_eq!(replay.body, first.body);
        assert_eq!(replay.replayable_headers(), first.replayable_headers());
        assert_eq!(
            replay.header("idempotency-key-expires"),
            Some(first.expires())
        );
        let cookies: Vec<_> = replay.headers.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
    }
    assert_eq!(upstream.count("rep-1"), 1);
    assert_eq!(upstream.total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_while_in_flight_gets_409_with_retry_after() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, "").await;
    let client = client();
    let slow = || {
        post(&gateway.url("/payments"), Some("busy-1"))
            .header("x-sleep-ms", "600")
            .body(Body::from("{}"))
            .unwrap()
    };

    let first = tokio::spawn(send_owned(client.clone(), slow()));
    upstream.wait_total(1).await;
    let duplicate = send(&client, slow()).await;

    duplicate.assert_problem(409, "in-flight");
    let retry_after = duplicate.retry_after();
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    duplicate.expires();
    let first = first.await.unwrap();
    assert_eq!(first.status, 201);
    assert!(!first.is_replay());
    let after = send(&client, slow()).await;
    assert!(after.is_replay(), "{after:?}");
    assert_eq!(after.body, first.body);
    assert_eq!(upstream.count("busy-1"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_on_conflict_wait_a_duplicate_is_held_and_gets_the_replay() {
    let upstream = Upstream::start().await;
    let config = load_config(
        "",
        Overrides {
            on_conflict: Some(idem_http::OnConflict::Wait),
            ..upstream_only(&upstream)
        },
    );
    let gateway = TestGateway::start(&config).await;
    let client = client();
    let slow = || {
        post(&gateway.url("/payments"), Some("wait-1"))
            .header("x-sleep-ms", "500")
            .body(Body::from("{}"))
            .unwrap()
    };

    let first = tokio::spawn(send_owned(client.clone(), slow()));
    upstream.wait_total(1).await;
    let duplicate = send(&client, slow()).await;
    let first = first.await.unwrap();

    assert_eq!(first.status, 201);
    assert!(!first.is_replay());
    assert!(duplicate.is_replay(), "{duplicate:?}");
    assert_eq!(duplicate.status, 201);
    assert_eq!(duplicate.body, first.body);
    assert_eq!(duplicate.replayable_headers(), first.replayable_headers());
    assert_eq!(upstream.count("wait-1"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_with_a_different_request_is_422() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, "").await;
    let client = client();

    let first = send(
        &client,
        keyed(&gateway.url("/payments"), "mm-1", r#"{"cents":100}"#),
    )
    .await;
    let other_body = send(
        &client,
        keyed(&gateway.url("/payments"), "mm-1", r#"{"cents":999}"#),
    )
    .await;
    let other_path = send(
        &client,
        keyed(&gateway.url("/refunds"), "mm-1", r#"{"cents":100}"#),
    )
    .await;
    let other_method = send(
        &client,
        post(&gateway.url("/payments"), Some("mm-1"))
            .method(Method::PATCH)
            .body(Body::from(r#"{"cents":100}"#))
            .unwrap(),
    )
    .await;

    assert_eq!(first.status, 201);
    for answer in [&other_body, &other_path, &other_method] {
        answer.assert_problem(422, "mismatch");
    }
    assert_eq!(upstream.count("mm-1"), 1);
    // The original request still replays.
    let again = send(
        &client,
        keyed(&gateway.url("/payments"), "mm-1", r#"{"cents":100}"#),
    )
    .await;
    assert!(again.is_replay());
    assert_eq!(again.body, first.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_key_with_require_key_is_400() {
    let upstream = Upstream::start().await;
    let config = load_config(
        "",
        Overrides {
            require_key: true,
            ..upstream_only(&upstream)
        },
    );
    let gateway = TestGateway::start(&config).await;
    let client = client();

    let post_answer = send(
        &client,
        post(&gateway.url("/payments"), None)
            .body(Body::from("{}"))
            .unwrap(),
    )
    .await;
    let patch_answer = send(
        &client,
        post(&gateway.url("/payments/1"), None)
            .method(Method::PATCH)
            .body(Body::from("{}"))
            .unwrap(),
    )
    .await;
    let get_answer = send(
        &client,
        Request::get(gateway.url("/payments"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;

    let problem = post_answer.assert_problem(400, "missing-key");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("idempotency-key"),
        "{problem}"
    );
    patch_answer.assert_problem(400, "missing-key");
    assert_eq!(get_answer.status, 201, "a GET needs no key: {get_answer:?}");
    assert_eq!(upstream.total(), 1);
    assert_eq!(upstream.last().method, "GET");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_keys_are_400_and_never_reach_the_upstream() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, "").await;
    let client = client();
    let long = "k".repeat(256);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", b"".to_vec()),
        ("only spaces", b"   ".to_vec()),
        ("empty sf-string", b"\"\"".to_vec()),
        ("256 characters", long.as_bytes().to_vec()),
        (
            "256 characters as an sf-string",
            format!("\"{long}\"").into_bytes(),
        ),
        ("non-ASCII byte", b"caf\xe9".to_vec()),
        ("UTF-8", "caf\u{e9}".as_bytes().to_vec()),
        ("tab inside", b"a\tb".to_vec()),
        ("unterminated sf-string", b"\"abc".to_vec()),
        ("sf-string with a bad escape", b"\"a\\qb\"".to_vec()),
        ("sf-string with parameters junk", b"\"abc\" junk".to_vec()),
    ];

    for (what, value) in &cases {
        let answer = send(
            &client,
            Request::post(gateway.url("/payments"))
                .header("idempotency-key", HeaderValue::from_bytes(value).unwrap())
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await;
        assert_eq!(answer.status, 400, "{what}: {answer:?}");
        answer.assert_problem(400, "malformed-key");
    }
    // The key header twice is ambiguous: refused too.
    let twice = send(
        &client,
        Request::post(gateway.url("/payments"))
            .header("idempotency-key", "a")
            .header("idempotency-key", "b")
            .body(Body::from("{}"))
            .unwrap(),
    )
    .await;
    twice.assert_problem(400, "malformed-key");
    assert_eq!(upstream.total(), 0, "a malformed key reached the upstream");

    // The limit is exact: 255 characters pass.
    let longest = "k".repeat(255);
    let ok = send(&client, keyed(&gateway.url("/payments"), &longest, "{}")).await;
    assert_eq!(ok.status, 201, "{ok:?}");
    assert_eq!(upstream.count(&longest), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_max_request_body_is_413_and_nothing_is_stored() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, "[policy]\nmax_request_body = 64\n").await;
    let client = client();
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(200));

    // Declared by Content-Length.
    let answer = send(&client, keyed(&gateway.url("/payments"), "big-1", &big)).await;
    answer.assert_problem(413, "body-too-large");
    assert!(
        gateway.record("big-1").await.is_none(),
        "a 413 stored a record"
    );

    // Not declared: a chunked body that only turns out too large while it is read.
    let chunk = "y".repeat(100);
    let request = format!(
        "POST /payments HTTP/1.1\r\nhost: gw\r\nidempotency-key: big-1\r\n\
         content-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n\
         {:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    let (head, _) = raw_exchange(gateway.addr, request.as_bytes()).await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(
        gateway.record("big-1").await.is_none(),
        "a 413 stored a record"
    );
    assert_eq!(upstream.total(), 0);

    // The same key with a body within the limit runs: nothing held it.
    let small = send(&client, keyed(&gateway.url("/payments"), "big-1", "{}")).await;
    assert_eq!(small.status, 201, "{small:?}");
    assert!(!small.is_replay());
    assert_eq!(upstream.count("big-1"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_502_and_the_key_is_released() {
    // A port nothing listens on: connections are refused, nothing is ever sent.
    let closed = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let config = load_config(
        "",
        Overrides {
            upstream: Some(format!("http://{closed}")),
            ..Overrides::default()
        },
    );
    let gateway = TestGateway::start(&config).await;
    let client = client();

    let answer = send(&client, keyed(&gateway.url("/payments"), "down-1", "{}")).await;
    answer.assert_problem(502, "upstream-unavailable");
    assert!(
        gateway.record("down-1").await.is_none(),
        "the key was not released"
    );
    // A retry is tried again (a held key would answer 409 for the whole lease).
    let retry = send(&client, keyed(&gateway.url("/payments"), "down-1", "{}")).await;
    retry.assert_problem(502, "upstream-unavailable");
    assert_eq!(gateway.executed(), 2);

    // Unkeyed requests that cannot be forwarded are 502 as well, not a dropped connection.
    let unkeyed = send(
        &client,
        post(&gateway.url("/payments"), None)
            .body(Body::from("{}"))
            .unwrap(),
    )
    .await;
    unkeyed.assert_problem(502, "upstream-unavailable");
    let get = send(
        &client,
        Request::get(gateway.url("/")).body(Body::empty()).unwrap(),
    )
    .await;
    get.assert_problem(502, "upstream-unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_refused_connect_a_retry_with_the_same_key_runs() {
    let upstream = Upstream::start().await;
    let door = FaultProxy::start(upstream.addr()).await;
    let config = load_config(
        "",
        Overrides {
            upstream: Some(format!("http://{}", door.addr())),
            ..Overrides::default()
        },
    );
    let gateway = TestGateway::start(&config).await;
    let client = client();

    // The upstream is down: connections are refused, so nothing was sent. (A connection
    // that is accepted and then fails is an unknown outcome instead: see faults.rs.)
    door.set(Fault::Refuse).await;
    let failed = send(&client, keyed(&gateway.url("/payments"), "flaky-1", "{}")).await;
    failed.assert_problem(502, "upstream-unavailable");
    assert!(gateway.record("flaky-1").await.is_none());

    door.set(Fault::Pass).await;
    let retry = send(&client, keyed(&gateway.url("/payments"), "flaky-1", "{}")).await;
    assert_eq!(retry.status, 201, "{retry:?}");
    assert!(!retry.is_replay(), "nothing was stored, so nothing replays");
    assert_eq!(upstream.count("flaky-1"), 1);
    let replay = send(&client, keyed(&gateway.url("/payments"), "flaky-1", "{}")).await;
    assert!(replay.is_replay());
    assert_eq!(upstream.count("flaky-1"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safe_methods_pass_through_untouched_and_are_not_stored() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, "").await;
    let client = client();
    let request = |method: Method| {
        Request::builder()
            .method(method)
            .uri(gateway.url("/things?x=1"))
            .header("idempotency-key", "safe-1")
            .body(Body::empty())
            .unwrap()
    };

    let get1 = send(&client, request(Method::GET)).await;
    let get2 = send(&client, request(Method::GET)).await;
    let head = send(&client, request(Method::HEAD)).await;
    let options = send(&client, request(Method::OPTIONS)).await;
    let trace = send(&client, request(Method::TRACE)).await;

    for answer in [&get1, &get2, &head, &options, &trace] {
        assert_eq!(answer.status, 201, "{answer:?}");
        assert!(!answer.is_replay(), "{answer:?}");
        assert!(answer.header("idempotency-key-expires").is_none());
    }
    assert_eq!(get1.json()["n"], 1);
    assert_eq!(get2.json()["n"], 2, "the second GET was not executed");
    assert!(head.body.is_empty());
    let seen: Vec<(String, String)> = upstream
        .seen()
        .into_iter()
        .map(|s| (s.method, s.path))
        .collect();
    let expected: Vec<(String, String)> = ["GET", "GET", "HEAD", "OPTIONS", "TRACE"]
        .iter()
        .map(|m| (m.to_string(), "/things?x=1".to_owned()))
        .collect();
    assert_eq!(seen, expected);
    assert!(
        upstream
            .seen()
            .iter()
            .all(|s| s.headers["idempotency-key"] == "safe-1")
    );
    assert_eq!(upstream.count("safe-1"), 5);
    assert!(
        gateway.record("safe-1").await.is_none(),
        "a safe method was stored"
    );
    assert_eq!(gateway.executed(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_under_two_scopes_runs_twice_and_never_crosses() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, "").await;
    let client = client();
    let as_tenant = |credential: Option<(&str, &str)>| {
        let mut builder = post(&gateway.url("/payments"), Some("shared-1"));
        if let Some((name, value)) = credential {
            builder = builder.header(name, value);
        }
        builder.body(Body::from("{}")).unwrap()
    };
    let alice = Some(("authorization", "Bearer alice"));
    let bob = Some(("authorization", "Bearer bob"));
    let api_key = Some(("x-api-key", "Bearer alice"));

    let a1 = send(&client, as_tenant(alice)).await;
    let b1 = send(&client, as_tenant(bob)).await;
    let k1 = send(&client, as_tenant(api_key)).await;
    let anon1 = send(&client, as_tenant(None)).await;
    let a2 = send(&client, as_tenant(alice)).await;
    let b2 = send(&client, as_tenant(bob)).await;
    let k2 = send(&client, as_tenant(api_key)).await;
    let anon2 = send(&client, as_tenant(None)).await;

    for first in [&a1, &b1, &k1, &anon1] {
        assert_eq!(first.status, 201);
        assert!(!first.is_replay(), "{first:?}");
    }
    assert_eq!(a1.json()["authorization"], "Bearer alice");
    assert_eq!(b1.json()["authorization"], "Bearer bob");
    assert_eq!(k1.json()["authorization"], serde_json::Value::Null);
    let executions: std::collections::HashSet<_> = [&a1, &b1, &k1, &anon1]
        .iter()
        .map(|a| a.json()["execution"].as_u64().unwrap())
        .collect();
    assert_eq!(executions.len(), 4, "each scope has its own execution");
    for (first, replay) in [(&a1, &a2), (&b1, &b2), (&k1, &k2), (&anon1, &anon2)] {
        assert!(replay.is_replay(), "{replay:?}");
        assert_eq!(
            replay.body, first.body,
            "a scope got another scope's response"
        );
    }
    assert_eq!(upstream.count("shared-1"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_policies_from_the_config_file_apply_per_route() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(
        &upstream,
        r#"
[[route]]
prefix = "/payments"
policy = { key_required = true }

[[route]]
pattern = "/orders/*/items"
methods = ["POST"]
policy = { max_request_body = 16 }
"#,
    )
    .await;
    let client = client();
    let unkeyed = |path: &str| {
        post(&gateway.url(path), None)
            .body(Body::from("{}"))
            .unwrap()
    };
    let padded = format!(r#"{{"pad":"{}"}}"#, "x".repeat(50));

    send(&client, unkeyed("/payments"))
        .await
        .assert_problem(400, "missing-key");
    send(&client, unkeyed("/payments/7"))
        .await
        .assert_problem(400, "missing-key");
    assert_eq!(upstream.total(), 0);
    let other = send(&client, unkeyed("/other")).await;
    assert_eq!(other.status, 201, "{other:?}");
    let near_miss = send(&client, unkeyed("/paymentsx")).await;
    assert_eq!(near_miss.status, 201, "{near_miss:?}");
    assert_eq!(upstream.total(), 2);

    let keyed_ok = send(&client, keyed(&gateway.url("/payments"), "route-1", "{}")).await;
    assert_eq!(keyed_ok.status, 201);
    send(
        &client,
        keyed(&gateway.url("/orders/9/items"), "route-2", &padded),
    )
    .await
    .assert_problem(413, "body-too-large");
    // The default limit (1 MiB) elsewhere.
    let elsewhere = send(
        &client,
        keyed(&gateway.url("/orders/9"), "route-3", &padded),
    )
    .await;
    assert_eq!(elsewhere.status, 201, "{elsewhere:?}");
    assert_eq!(upstream.total(), 4);
}

async fn send_owned(client: HttpClient, request: Request<Body>) -> Answer {
    send(&client, request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_stops_on_its_shutdown_signal() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, "").await;
    let addr = gateway.addr;
    let answer = send(&client(), keyed(&gateway.url("/p"), "stop-1", "{}")).await;
    assert_eq!(answer.status, 201);
    gateway.stop().await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_is_protected_like_post() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, "").await;
    let client = client();
    let patch = || {
        post(&gateway.url("/payments/1"), Some("patch-1"))
            .method(Method::PATCH)
            .body(Body::from(r#"{"note":"x"}"#))
            .unwrap()
    };

    let first = send(&client, patch()).await;
    let replay = send(&client, patch()).await;

    assert_eq!(first.status, 201);
    assert!(!first.is_replay());
    assert!(replay.is_replay(), "{replay:?}");
    assert_eq!(replay.body, first.body);
    assert_eq!(upstream.count("patch-1"), 1);
    assert_eq!(upstream.last().method, "PATCH");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_5xx_is_stored_and_replayed_not_run_again() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, "").await;
    let client = client();
    let failing = || {
        post(&gateway.url("/payments"), Some("err-1"))
            .header("x-status", "500")
            .body(Body::from("{}"))
            .unwrap()
    };

    let first = send(&client, failing()).await;
    let replay = send(&client, failing()).await;

    assert_eq!(first.status, 500);
    assert!(replay.is_replay(), "{replay:?}");
    assert_eq!(replay.status, 500);
    assert_eq!(replay.body, first.body);
    assert_eq!(
        upstream.count("err-1"),
        1,
        "it may have had effects: never run twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_over_max_stored_body_streams_once_and_is_never_run_again() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, "[policy]\nmax_stored_body = 1024\n").await;
    let client = client();
    let large = || {
        post(&gateway.url("/export"), Some("large-1"))
            .header("x-body-size", "200000")
            .body(Body::from("{}"))
            .unwrap()
    };

    let first = send(&client, large()).await;
    let retry = send(&client, large()).await;

    assert_eq!(first.status, 201);
    assert_eq!(
        first.body.len(),
        200_000,
        "the client got the whole response once"
    );
    let problem = retry.assert_problem(409, "response-not-kept");
    assert_eq!(problem["original_status"], 201);
    assert_eq!(upstream.count("large-1"), 1);
}

/// The gateway with the default policy, for the shared table rows.
struct Gateway {
    upstream: Upstream,
    gateway: TestGateway,
    client: HttpClient,
}

impl idem_testkit::semantics::Subject for Gateway {
    fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    fn target(&self, path: &str) -> String {
        self.gateway.url(path)
    }

    async fn send(&self, request: Request<Body>) -> Answer {
        send(&self.client, request).await
    }
}

/// The table rows shared with the layer's suite (idem-http's semantics.rs), through the
/// gateway over sockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_http_semantics_hold_through_the_gateway() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, "").await;
    let subject = Gateway {
        upstream,
        gateway,
        client: client(),
    };
    idem_testkit::semantics::run_all(&subject).await;
}
