//! [`Upstream`]: the service behind the layer or the gateway, counting executions per key.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::{AppendHeaders, IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::wait::wait_until;

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The method, as sent.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Every header.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

#[derive(Default)]
struct UpstreamState {
    /// Executions per raw `Idempotency-Key` value (lossy UTF-8; "" when absent).
    counts: Mutex<HashMap<String, u64>>,
    total: AtomicU64,
    seen: Mutex<Vec<Seen>>,
    /// When set, connections are accepted and dropped at once.
    refuse: AtomicBool,
}

/// The service behind the layer or the gateway.
///
/// Every request is counted (before its body is read), recorded, then answered after
/// `x-sleep-ms` milliseconds with status `x-status` (default 201), a few headers
/// (`set-cookie` twice, `location: /payments/N` for the N-th execution, `x-upstream`) and
/// a JSON body describing the execution (`execution`, `n` for this key, `key`, `method`,
/// `path`, `authorization`, `body_len`), or `x-body-size` bytes of `x`. On the path
/// `/hop-response` the answer also names `x-private` in `Connection`.
///
/// ```
/// use idem_testkit::{Upstream, client, keyed, send};
///
/// # #[tokio::main] async fn main() {
/// let upstream = Upstream::start().await;
/// let client = client();
/// for _ in 0..2 {
///     send(&client, keyed(&upstream.url_for("/pay"), "k", "{}")).await;
/// }
/// assert_eq!(upstream.count("k"), 2);
/// assert_eq!(upstream.last().path, "/pay");
/// # }
/// ```
#[derive(Clone)]
pub struct Upstream {
    addr: Option<SocketAddr>,
    state: Arc<UpstreamState>,
}

impl Upstream {
    /// Serves on 127.0.0.1:0, on its own accept loop (HTTP/1 and HTTP/2).
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = Self {
            addr: Some(listener.local_addr().unwrap()),
            state: Arc::default(),
        };
        let app = upstream.app();
        let state = Arc::clone(&upstream.state);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                if state.refuse.load(Ordering::SeqCst) {
                    drop(stream);
                    continue;
                }
                let app = app.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        app.clone().oneshot(request.map(Body::new))
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        upstream
    }

    /// The counting state without a listener: serve [`app`](Self::app) yourself (behind a
    /// layer, say). [`addr`](Self::addr) panics on it.
    pub fn unbound() -> Self {
        Self {
            addr: None,
            state: Arc::default(),
        }
    }

    /// The upstream as an axum app, sharing this one's counts.
    pub fn app(&self) -> Router {
        Router::new().fallback(handle).with_state(self.clone())
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
            .expect("this upstream was not started on a socket")
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// `http://ADDR/PATH`.
    pub fn url_for(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    /// Executions of requests whose key header was exactly `raw_key`.
    pub fn count(&self, raw_key: &str) -> u64 {
        let counts = self.state.counts.lock().unwrap();
        counts.get(raw_key).copied().unwrap_or(0)
    }

    /// Executions of every request.
    pub fn total(&self) -> u64 {
        self.state.total.load(Ordering::SeqCst)
    }

    /// Every request received, in order of arrival.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// The last request received.
    pub fn last(&self) -> Seen {
        self.seen().pop().expect("the upstream received no request")
    }

    /// Whether new connections are accepted and dropped at once: the connect succeeds, so
    /// the request may have been written (an unknown outcome, not a refused connect; for
    /// that, put a [`FaultProxy`](crate::FaultProxy) in front).
    pub fn set_refusing(&self, refuse: bool) {
        self.state.refuse.store(refuse, Ordering::SeqCst);
    }

    /// Waits until the upstream has counted `n` executions in all.
    pub async fn wait_total(&self, n: u64) {
        wait_until(&format!("the upstream to see {n} requests"), || {
            self.total() >= n
        })
        .await;
    }
}

/// The upstream's handler (see [`Upstream`]); [`Upstream::app`] routes every request here.
pub async fn handle(State(upstream): State<Upstream>, request: Request<Body>) -> Response {
    let (parts, body) = request.into_parts();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let raw_key = header("idempotency-key").unwrap_or_default();
    let n = {
        let mut counts = upstream.state.counts.lock().unwrap();
        let n = counts.entry(raw_key.clone()).or_default();
        *n += 1;
        *n
    };
    let execution = upstream.state.total.fetch_add(1, Ordering::SeqCst) + 1;
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    upstream.state.seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        path: path.clone(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    if let Some(ms) = header("x-sleep-ms") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
    }
    let status = header("x-status").map_or(201, |s| s.parse().unwrap());
    let payload = match header("x-body-size") {
        Some(size) => "x".repeat(size.parse().unwrap()),
        None => serde_json::json!({
            "execution": execution,
            "n": n,
            "key": raw_key,
            "method": parts.method.as_str(),
            "path": path,
            "authorization": header("authorization"),
            "body_len": body.len(),
        })
        .to_string(),
    };
    let mut response = (
        StatusCode::from_u16(status).unwrap(),
        AppendHeaders([
            ("content-type", "application/json".to_owned()),
            ("x-upstream", "yes".to_owned()),
            ("set-cookie", "a=1".to_owned()),
            ("set-cookie", "b=2".to_owned()),
            ("location", format!("/payments/{execution}")),
        ]),
        payload,
    )
        .into_response();
    if parts.uri.path() == "/hop-response" {
        let headers = response.headers_mut();
        headers.insert("connection", HeaderValue::from_static("x-private"));
        headers.insert("x-private", HeaderValue::from_static("secret"));
        headers.insert("x-public", HeaderValue::from_static("fine"));
    }
    response
}
