//! The gateway against clients and upstreams that misbehave, over real sockets: too many
//! connections, oversized heads, slow bodies, paths and methods spelled to slip past a
//! route, upstreams that fail after reading the request, and a store that dies.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use common::*;
use http::Request;
use idem_cli::config::Overrides;
use idem_cli::gateway::{Gateway, ServeError, serve_until, serve_with_store};
use idem_core::testing::FaultyStore;
use idem_core::{MemoryStore, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------------------
// Helpers of this file
// ---------------------------------------------------------------------------------------

/// Writes `request` on a fresh connection (a write error is tolerated: the server may close
/// early) and reads until the server closes or resets the connection, or `patience` passes.
/// Returns what was read.
async fn exchange_lossy(addr: SocketAddr, request: &[u8], patience: Duration) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(request).await;
    read_until_closed(&mut stream, patience).await
}

/// Reads until EOF, an error (a reset) or `patience`; returns what was read.
async fn read_until_closed(stream: &mut TcpStream, patience: Duration) -> Vec<u8> {
    let mut response = Vec::new();
    let _ = tokio::time::timeout(patience, async {
        let mut chunk = [0_u8; 8192];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => response.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    response
}

/// Whether the server closed `stream` (EOF or reset) within `patience`, reading and dropping
/// anything it sends first.
async fn closed_within(stream: &mut TcpStream, patience: Duration) -> bool {
    tokio::time::timeout(patience, async {
        let mut chunk = [0_u8; 8192];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// A connection that has been served one request and stays open (keep-alive).
async fn served_connection(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /held HTTP/1.1\r\nhost: gateway\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0_u8; 1];
    tokio::time::timeout(PATIENCE, async {
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
    })
    .await
    .expect("no answer on a connection under the cap");
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 201"), "{head}");
    stream
}

fn head_of(response: &[u8]) -> String {
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(response.len());
    String::from_utf8_lossy(&response[..end]).to_ascii_lowercase()
}

/// The problem `type` slug in a raw response's body.
fn slug_of(response: &[u8]) -> String {
    let start = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(response.len(), |at| at + 4);
    let problem: serde_json::Value = serde_json::from_slice(&response[start..])
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(response)));
    problem["type"]
        .as_str()
        .unwrap()
        .trim_start_matches("tag:idem.invalid,2026:problem:")
        .to_owned()
}

/// An upstream that reads each request whole, counts it, and closes the connection
/// without answering: the request was delivered, the outcome is unknown to the gateway.
struct ClosingUpstream {
    addr: SocketAddr,
    received: Arc<AtomicU64>,
}

impl ClosingUpstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&received);
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut chunk = [0_u8; 4096];
                    loop {
                        if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&request[..end]).to_lowercase();
                            let length = head
                                .lines()
                                .find_map(|line| line.strip_prefix("content-length:"))
                                .map_or(0, |n| n.trim().parse::<usize>().unwrap());
                            if request.len() >= end + 4 + length {
                                break;
                            }
                        }
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&chunk[..n]),
                        }
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    // Dropped without a word: closed after the request was written.
                });
            }
        });
        Self { addr, received }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }
}

/// A memory store whose [`Store::fatal_error`] turns `Some` on demand: a store whose
/// background worker died.
type DyingStore = FaultyStore<MemoryStore>;

// ---------------------------------------------------------------------------------------
// Connections and heads
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_beyond_max_connections_gets_503_and_is_closed() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, "max_connections = 2\n").await;

    let first = served_connection(gateway.addr).await;
    let _second = served_connection(gateway.addr).await;

    let (head, body) =
        raw_exchange(gateway.addr, b"GET /over HTTP/1.1\r\nhost: gateway\r\n\r\n").await;
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 503"), "{head}");
    assert!(head.contains("retry-after: 1"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(!body.is_empty());
    assert!(
        !upstream.seen().iter().any(|seen| seen.path == "/over"),
        "a refused connection's request was forwarded"
    );

    // A closed connection gives its slot back.
    drop(first);
    eventually("a slot to free up", || async {
        let response = exchange_lossy(
            gateway.addr,
            b"GET /again HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\n\r\n",
            PATIENCE,
        )
        .await;
        head_of(&response).starts_with("http/1.1 201").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_sends_a_request_is_closed_after_header_read_timeout() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, "header_read_timeout = \"500ms\"\n").await;

    // Nothing at all, and half an HTTP/2 preface: both hold a connection slot until closed.
    let mut silent = TcpStream::connect(gateway.addr).await.unwrap();
    let mut half_preface = TcpStream::connect(gateway.addr).await.unwrap();
    half_preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let started = Instant::now();
    assert!(closed_within(&mut silent, Duration::from_secs(4)).await);
    assert!(closed_within(&mut half_preface, Duration::from_secs(4)).await);
    assert!(started.elapsed() >= Duration::from_millis(400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_over_max_header_bytes_is_refused_and_not_forwarded() {
    let upstream = Upstream::start().await;
    // The default limit: 64 KiB.
    let gateway = TestGateway::around(&upstream, "").await;

    let request = |header_bytes: usize| {
        format!(
            "GET /big HTTP/1.1\r\nhost: gateway\r\nx-big: {}\r\nconnection: close\r\n\r\n",
            "a".repeat(header_bytes)
        )
    };
    let fits = exchange_lossy(gateway.addr, request(8 << 10).as_bytes(), PATIENCE).await;
    assert!(
        head_of(&fits).starts_with("http/1.1 201"),
        "{}",
        head_of(&fits)
    );
    assert_eq!(upstream.total(), 1);

    let over = exchange_lossy(gateway.addr, request(80 << 10).as_bytes(), PATIENCE).await;
    // hyper answers 431 and closes; the unread rest of the head may reset the connection
    // before the answer is read, so no answer at all is acceptable too, a forward is not.
    let head = head_of(&over);
    assert!(
        over.is_empty() || head.starts_with("http/1.1 431"),
        "an oversized head was not refused: {head}"
    );
    assert_eq!(
        upstream.total(),
        1,
        "an oversized head reached the upstream"
    );
}

// ---------------------------------------------------------------------------------------
// Slow and large keyed bodies
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_keyed_bodies_are_answered_and_closed_after_body_read_timeout() {
    const CLIENTS: usize = 20;
    const LENGTH: usize = 1 << 20;
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, "[policy]\nbody_read_timeout = \"1s\"\n").await;

    // Each sends all of a 1 MiB keyed body but its last byte, then stalls.
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let addr = gateway.addr;
        clients.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let head = format!(
                "POST /pay HTTP/1.1\r\nhost: gateway\r\nidempotency-key: slow-{i}\r\n\
                 content-type: application/octet-stream\r\ncontent-length: {LENGTH}\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await.unwrap();
            stream.write_all(&vec![b'x'; LENGTH - 1]).await.unwrap();
            let stalled = Instant::now();
            let response = read_until_closed(&mut stream, Duration::from_secs(6)).await;
            (response, stalled.elapsed())
        }));
    }
    for client in clients {
        let (response, waited) = client.await.unwrap();
        let head = head_of(&response);
        assert!(
            head.starts_with("http/1.1 408"),
            "a stalled body was not answered 408 (after {waited:?}): {head:?}"
        );
        assert_eq!(slug_of(&response), "body-timeout");
        assert!(
            waited < Duration::from_secs(5),
            "the connection stayed open for {waited:?}"
        );
    }
    assert_eq!(upstream.total(), 0, "a stalled request was forwarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_shares_one_buffered_body_budget() {
    let upstream = Upstream::start().await;
    // 64 KiB for all keyed bodies in flight, on every route.
    let gateway = TestGateway::around(
        &upstream,
        "max_buffered_bodies = 65536\nbuffer_wait = \"200ms\"\n\
         [policy]\nbody_read_timeout = \"5s\"\n\
         [[route]]\nprefix = \"/a\"\n\
         [[route]]\nprefix = \"/b\"\npolicy = { key_required = true }\n",
    )
    .await;

    // On route /a: 50 000 of 60 000 bytes, then a stall, holding most of the budget.
    let mut holder = TcpStream::connect(gateway.addr).await.unwrap();
    holder
        .write_all(
            b"POST /a HTTP/1.1\r\nhost: gateway\r\nidempotency-key: hold-1\r\n\
              content-length: 60000\r\n\r\n",
        )
        .await
        .unwrap();
    holder.write_all(&[b'x'; 50_000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // On route /b, a whole 60 000-byte body does not fit beside it.
    let mut request = b"POST /b HTTP/1.1\r\nhost: gateway\r\nidempotency-key: second-1\r\n\
          content-length: 60000\r\nconnection: close\r\n\r\n"
        .to_vec();
    request.extend_from_slice(&[b'y'; 60_000]);
    let response = exchange_lossy(gateway.addr, &request, PATIENCE).await;
    let head = head_of(&response);
    assert!(head.starts_with("http/1.1 503"), "{head}");
    assert!(head.contains("retry-after:"), "{head}");
    assert_eq!(slug_of(&response), "overloaded");
    assert_eq!(upstream.total(), 0);
    drop(holder);
}

// ---------------------------------------------------------------------------------------
// Routing sees what the upstream sees
// ---------------------------------------------------------------------------------------

const PAY_REQUIRES_A_KEY: &str =
    "[[route]]\nprefix = \"/pay\"\nmethods = [\"POST\"]\npolicy = { key_required = true }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_percent_encoded_path_meets_the_route_it_decodes_to() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, PAY_REQUIRES_A_KEY).await;

    let answer = send(
        &client(),
        post(&gateway.url("/%70ay"), None)
            .body(Body::from("{}"))
            .unwrap(),
    )
    .await;
    answer.assert_problem(400, "missing-key");
    assert_eq!(upstream.total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_frameworks_route_alike_meet_the_same_route() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(
        &upstream,
        "[[route]]\npattern = \"/orders/*/items\"\nmethods = [\"POST\"]\npolicy = { key_required = true }\n",
    )
    .await;
    // Express, ASP.NET Core and Spring route these to the `/orders/{id}/items` handler.
    for path in ["/orders/9/items/", "/Orders/9/ITEMS", "/ORDERS/9/Items/"] {
        let answer = send(
            &client(),
            post(&gateway.url(path), None)
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await;
        answer.assert_problem(400, "missing-key");
    }
    assert_eq!(upstream.total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_methods_in_any_case_match_requests_in_any_case() {
    let upstream = Upstream::start().await;
    // Written in lower case in the file.
    let gateway = TestGateway::around(
        &upstream,
        "[[route]]\nprefix = \"/pay\"\nmethods = [\"post\"]\npolicy = { key_required = true }\n",
    )
    .await;

    let unkeyed = exchange_lossy(
        gateway.addr,
        b"POST /pay HTTP/1.1\r\nhost: gateway\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
        PATIENCE,
    )
    .await;
    assert!(
        head_of(&unkeyed).starts_with("http/1.1 400"),
        "{}",
        head_of(&unkeyed)
    );
    assert_eq!(slug_of(&unkeyed), "missing-key");

    // And a lower-case request method on it.
    let lower = exchange_lossy(
        gateway.addr,
        b"post /pay HTTP/1.1\r\nhost: gateway\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
        PATIENCE,
    )
    .await;
    assert!(
        head_of(&lower).starts_with("http/1.1 400"),
        "{}",
        head_of(&lower)
    );
    assert_eq!(slug_of(&lower), "missing-key");
    assert_eq!(upstream.total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lower_case_post_with_a_key_runs_once() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, PAY_REQUIRES_A_KEY).await;
    let request = b"post /pay HTTP/1.1\r\nhost: gateway\r\nidempotency-key: lower-1\r\n\
        content-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}";

    let first = exchange_lossy(gateway.addr, request, PATIENCE).await;
    let retry = exchange_lossy(gateway.addr, request, PATIENCE).await;
    assert!(
        head_of(&first).starts_with("http/1.1 201"),
        "{}",
        head_of(&first)
    );
    assert!(
        head_of(&retry).starts_with("http/1.1 201"),
        "{}",
        head_of(&retry)
    );
    assert!(
        head_of(&retry).contains("idempotent-replayed: true"),
        "{}",
        head_of(&retry)
    );
    assert_eq!(upstream.count("lower-1"), 1, "`post` ran twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_paths_are_refused_on_protected_methods_and_pass_on_others() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, PAY_REQUIRES_A_KEY).await;

    for path in ["/pay/../x", "/pa%2Fy", "/pay/%2e%2e/x"] {
        let keyed = format!(
            "POST {path} HTTP/1.1\r\nhost: gateway\r\nidempotency-key: amb-1\r\n\
             content-length: 2\r\nconnection: close\r\n\r\n{{}}"
        );
        let refused = exchange_lossy(gateway.addr, keyed.as_bytes(), PATIENCE).await;
        assert!(
            head_of(&refused).starts_with("http/1.1 400"),
            "POST {path}: {}",
            head_of(&refused)
        );
        assert_eq!(slug_of(&refused), "ambiguous-path", "POST {path}");

        let get = format!("GET {path} HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\n\r\n");
        let passed = exchange_lossy(gateway.addr, get.as_bytes(), PATIENCE).await;
        assert!(
            head_of(&passed).starts_with("http/1.1 201"),
            "GET {path}: {}",
            head_of(&passed)
        );
        assert_eq!(
            upstream.last().path,
            path,
            "the path was not forwarded as sent"
        );
    }
    assert!(upstream.seen().iter().all(|seen| seen.method == "GET"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ambiguous_path_passes_when_no_policy_protects_the_method() {
    let upstream = Upstream::start().await;
    // Only PATCH is protected, anywhere.
    let gateway = TestGateway::around(&upstream, "[policy]\nmethods = [\"PATCH\"]\n").await;

    let post = exchange_lossy(
        gateway.addr,
        b"POST /a/../b HTTP/1.1\r\nhost: gateway\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
        PATIENCE,
    )
    .await;
    assert!(
        head_of(&post).starts_with("http/1.1 201"),
        "{}",
        head_of(&post)
    );
    let patch = exchange_lossy(
        gateway.addr,
        b"PATCH /a/../b HTTP/1.1\r\nhost: gateway\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
        PATIENCE,
    )
    .await;
    assert_eq!(slug_of(&patch), "ambiguous-path");
}

// ---------------------------------------------------------------------------------------
// Upstream failures after the request was written
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passed_through_request_the_upstream_dropped_is_an_unknown_outcome() {
    let upstream = ClosingUpstream::start().await;
    let config = load_config(
        "",
        Overrides {
            upstream: Some(upstream.url()),
            ..Overrides::default()
        },
    );
    let gateway = TestGateway::start(&config).await;

    let answer = send(
        &client(),
        Request::get(gateway.url("/report"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    let problem = answer.assert_problem(502, "outcome-unknown");
    let detail = problem["detail"].as_str().unwrap();
    assert!(!detail.contains("may be retried"), "{detail}");
    assert_eq!(upstream.received(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_request_the_upstream_dropped_is_never_run_again() {
    let upstream = ClosingUpstream::start().await;
    let config = load_config(
        "",
        Overrides {
            upstream: Some(upstream.url()),
            ..Overrides::default()
        },
    );
    let gateway = TestGateway::start(&config).await;
    let client = client();

    let first = send(&client, keyed(&gateway.url("/pay"), "dropped-1", "{}")).await;
    first.assert_problem(502, "outcome-unknown");
    assert_eq!(upstream.received(), 1);
    let retry = send(&client, keyed(&gateway.url("/pay"), "dropped-1", "{}")).await;
    retry.assert_problem(502, "outcome-unknown");
    assert!(retry.is_replay(), "{retry:?}");
    assert_eq!(upstream.received(), 1, "an unknown outcome ran again");
}

// ---------------------------------------------------------------------------------------
// A store that can no longer serve
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_with_a_fatal_error_stops_the_gateway_with_an_error() {
    let upstream = Upstream::start().await;
    let config = load_config("", upstream_only(&upstream));
    let store = Arc::new(DyingStore::new(MemoryStore::new()));
    let gateway = Gateway::new(&config, Arc::clone(&store) as Arc<dyn Store>);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = tokio::spawn(serve_until(
        listener,
        gateway,
        std::future::pending(),
        Duration::from_secs(2),
    ));

    let served = send(
        &client(),
        keyed(&format!("http://{addr}/pay"), "before-1", "{}"),
    )
    .await;
    assert_eq!(served.status, 201, "{served:?}");

    store.die("the writer thread panicked");
    let ended = tokio::time::timeout(PATIENCE, serving)
        .await
        .expect("the gateway kept serving over a dead store")
        .unwrap();
    match ended {
        Err(ServeError::StoreFailed { reason }) => {
            assert!(reason.contains("writer thread"), "{reason}");
        }
        other => panic!("expected StoreFailed, got {other:?}"),
    }
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still accepting connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_returns_an_error_when_the_store_dies() {
    let upstream = Upstream::start().await;
    let config = load_config(
        "",
        Overrides {
            listen: Some("127.0.0.1:0".to_owned()),
            ..upstream_only(&upstream)
        },
    );
    let store = Arc::new(DyingStore::new(MemoryStore::new()));
    let serving = tokio::spawn(serve_with_store(
        config,
        Arc::clone(&store) as Arc<dyn Store>,
        std::future::pending(),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!serving.is_finished());
    store.die("the writer thread panicked");
    let ended = tokio::time::timeout(PATIENCE, serving)
        .await
        .expect("serve kept running over a dead store")
        .unwrap();
    assert!(
        matches!(ended, Err(ServeError::StoreFailed { .. })),
        "{ended:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ambiguous_path_is_refused_for_a_method_only_some_route_protects() {
    let upstream = Upstream::start().await;
    // PUT is protected under /things only. Matched on its raw text, `/x/%2e%2e/things`
    // would miss that route and pass through unprotected, while the upstream may resolve
    // it to `/things`.
    let gateway = TestGateway::around(
        &upstream,
        "[[route]]\nprefix = \"/things\"\nmethods = [\"PUT\"]\n\
         policy = { methods = [\"PUT\"], key_required = true }\n",
    )
    .await;

    let put = exchange_lossy(
        gateway.addr,
        b"PUT /x/%2e%2e/things HTTP/1.1\r\nhost: gateway\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
        PATIENCE,
    )
    .await;
    assert!(
        head_of(&put).starts_with("http/1.1 400"),
        "{}",
        head_of(&put)
    );
    assert_eq!(slug_of(&put), "ambiguous-path");
    assert_eq!(upstream.total(), 0);
}
