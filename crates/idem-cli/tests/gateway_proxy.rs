//! The gateway as a reverse proxy: what reaches the upstream (the key unchanged, the
//! forwarding headers, no hop-by-hop headers, bodies intact) and what comes back.

mod common;

use axum::body::Body;
use common::*;
use http::Request;
use idem_cli::config::Overrides;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_is_forwarded_unchanged_with_forwarding_headers_and_without_hop_by_hop_ones() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, "").await;

    // Raw bytes, so that exactly these headers reach the gateway.
    let request = "POST /payments?x=1 HTTP/1.1\r\n\
        host: gateway.example:8443\r\n\
        idempotency-key: \"k-7\"\r\n\
        authorization: Bearer tenant\r\n\
        content-type: application/json\r\n\
        content-length: 2\r\n\
        connection: close, x-custom\r\n\
        x-custom: connection-private\r\n\
        keep-alive: timeout=5\r\n\
        te: trailers\r\n\
        upgrade: websocket\r\n\
        proxy-authorization: Basic cHJveHk6c2VjcmV0\r\n\
        x-forwarded-for: 10.0.0.1\r\n\
        x-keep: end-to-end\r\n\
        \r\n{}";
    let (head, body) = raw_exchange(gateway.addr, request.as_bytes()).await;

    assert!(head.starts_with("HTTP/1.1 201"), "{head}\n{body:?}");
    let seen = upstream.last();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.path, "/payments?x=1");
    assert_eq!(&seen.body[..], b"{}");
    let header = |name: &str| {
        seen.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    assert_eq!(
        header("idempotency-key").as_deref(),
        Some("\"k-7\""),
        "the key changed"
    );
    assert_eq!(
        header("x-forwarded-for").as_deref(),
        Some("10.0.0.1, 127.0.0.1")
    );
    assert_eq!(header("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        header("x-forwarded-host").as_deref(),
        Some("gateway.example:8443")
    );
    assert_eq!(
        header("host"),
        Some(upstream.addr().to_string()),
        "Host not rewritten"
    );
    assert_eq!(header("authorization").as_deref(), Some("Bearer tenant"));
    assert_eq!(header("x-keep").as_deref(), Some("end-to-end"));
    assert_eq!(header("content-type").as_deref(), Some("application/json"));
    for hop in [
        "connection",
        "x-custom",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "transfer-encoding",
    ] {
        assert_eq!(header(hop), None, "hop-by-hop `{hop}` was forwarded");
    }

    // The bare form of the key is the same key, in the same scope: a replay.
    let replay = send(
        &client(),
        Request::post(gateway.url("/payments?x=1"))
            .header("idempotency-key", "k-7")
            .header("authorization", "Bearer tenant")
            .header("content-type", "application/json")
            .body(Body::from("{}"))
            .unwrap(),
    )
    .await;
    assert!(replay.is_replay(), "{replay:?}");
    assert_eq!(&replay.body[..], &body[..]);
    assert_eq!(upstream.total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_set_when_the_client_sent_none() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, "").await;

    let answer = send(
        &client(),
        Request::get(gateway.url("/status"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;

    assert_eq!(answer.status, 201);
    let seen = upstream.last();
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["x-forwarded-host"], gateway.addr.to_string());
    assert_eq!(seen.headers["host"], upstream.addr().to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_response_headers_are_not_passed_back_nor_replayed() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, "").await;
    let client = client();

    let get = send(
        &client,
        Request::get(gateway.url("/hop-response"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    let first = send(&client, keyed(&gateway.url("/hop-response"), "hop-1", "{}")).await;
    let replay = send(&client, keyed(&gateway.url("/hop-response"), "hop-1", "{}")).await;

    assert!(replay.is_replay());
    for answer in [&get, &first, &replay] {
        assert_eq!(answer.status, 201, "{answer:?}");
        assert_eq!(answer.header("x-private"), None, "{answer:?}");
        assert_eq!(answer.header("x-public"), Some("fine"), "{answer:?}");
        assert_ne!(answer.header("connection"), Some("x-private"), "{answer:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unkeyed_body_larger_than_max_request_body_streams_through_intact() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, "[policy]\nmax_request_body = 1024\n").await;
    let client = client();
    let big: Vec<u8> = (0..5 * 1024 * 1024).map(|i: u32| (i % 251) as u8).collect();

    let answer = send(
        &client,
        Request::post(gateway.url("/upload"))
            .header("content-type", "application/octet-stream")
            .body(Body::from(big.clone()))
            .unwrap(),
    )
    .await;

    assert_eq!(answer.status, 201, "{answer:?}");
    assert_eq!(answer.json()["body_len"], big.len());
    let seen = upstream.last();
    assert_eq!(seen.body.len(), big.len());
    assert!(seen.body[..] == big[..], "the body changed on the way");
    assert!(seen.headers.get("idempotency-key").is_none());

    // With a key, the same body is over the limit: refused on its Content-Length alone.
    // (Raw TCP, body not sent: a client still writing 5 MiB to a server that answered
    // early and closed may see a broken pipe instead of the answer.)
    let head_only = format!(
        "POST /upload HTTP/1.1\r\nhost: gw\r\nidempotency-key: up-1\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        big.len()
    );
    let (head, _) = raw_exchange(gateway.addr, head_only.as_bytes()).await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert_eq!(upstream.total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_base_path_is_prefixed_and_the_query_kept() {
    let upstream = Upstream::start().await;
    let config = load_config(
        "",
        Overrides {
            upstream: Some(format!("{}/api/", upstream.url())),
            ..Overrides::default()
        },
    );
    let gateway = TestGateway::start(&config).await;

    let answer = send(
        &client(),
        keyed(&gateway.url("/payments?a=1&b=2"), "base-1", "{}"),
    )
    .await;

    assert_eq!(answer.status, 201, "{answer:?}");
    assert_eq!(upstream.last().path, "/api/payments?a=1&b=2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_is_proxied_over_http1_with_the_same_semantics() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, "").await;
    let h2: HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();

    let first = send(&h2, keyed(&gateway.url("/payments"), "h2-1", "{}")).await;
    let replay = send(&h2, keyed(&gateway.url("/payments"), "h2-1", "{}")).await;

    assert_eq!(first.status, 201, "{first:?}");
    assert!(!first.is_replay());
    assert!(replay.is_replay(), "{replay:?}");
    assert_eq!(replay.body, first.body);
    assert_eq!(upstream.count("h2-1"), 1);
    let seen = upstream.last();
    assert_eq!(seen.headers["host"], upstream.addr().to_string());
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(
        seen.headers
            .get("x-forwarded-host")
            .map(|v| v.to_str().unwrap()),
        Some(gateway.addr.to_string().as_str()),
        "HTTP/2 carries the host in :authority"
    );
}
