//! Test harness: a real upstream on 127.0.0.1:0 that counts executions per key, a proxy
//! service that forwards to it over the socket, and the layer wrapped around the proxy.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::{AppendHeaders, IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use idem::{MemoryStore, Store};
use idem_http::{Idempotency, IdempotencyLayer, IdempotencyPolicy, IdempotencyStats};
use tower::{Layer, Service, ServiceExt};

/// The upstream: counts every execution, per value of the `Idempotency-Key` it received.
#[derive(Clone, Default)]
pub struct Upstream {
    pub addr: Option<SocketAddr>,
    counts: Arc<Mutex<HashMap<String, u64>>>,
    total: Arc<AtomicU64>,
}

impl Upstream {
    pub async fn start() -> Self {
        let mut upstream = Upstream::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        upstream.addr = Some(listener.local_addr().unwrap());
        let app = Router::new().fallback(handle).with_state(upstream.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        upstream
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr.unwrap()
    }

    /// Executions of requests that carried this key header value.
    pub fn count(&self, raw_key: &str) -> u64 {
        self.counts
            .lock()
            .unwrap()
            .get(raw_key)
            .copied()
            .unwrap_or(0)
    }

    /// Executions of every request.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::SeqCst)
    }
}

/// Answers `x-status` (default 201) after `x-sleep-ms`, with a JSON body describing the
/// execution, or `x-body-size` bytes of `x`.
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
        let mut counts = upstream.counts.lock().unwrap();
        let n = counts.entry(raw_key.clone()).or_default();
        *n += 1;
        *n
    };
    upstream.total.fetch_add(1, Ordering::SeqCst);
    let body = body.collect().await.unwrap().to_bytes();
    if let Some(ms) = header("x-sleep-ms") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
    }
    let status = header("x-status").map_or(201, |s| s.parse().unwrap());
    let status = StatusCode::from_u16(status).unwrap();
    let payload = match header("x-body-size") {
        Some(size) => "x".repeat(size.parse().unwrap()),
        None => serde_json::json!({
            "n": n,
            "key": raw_key,
            "method": parts.method.as_str(),
            "uri": parts.uri.to_string(),
            "body": String::from_utf8_lossy(&body),
        })
        .to_string(),
    };
    (
        status,
        AppendHeaders([
            ("content-type", "application/json"),
            ("x-upstream", "yes"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
            ("location", "/payments/1"),
        ]),
        payload,
    )
        .into_response()
}

/// Forwards requests to an address over a real socket (what the gateway does).
#[derive(Clone)]
pub struct Proxy {
    client: Client<HttpConnector, Body>,
    addr: SocketAddr,
}

impl Proxy {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            addr,
        }
    }
}

impl Service<Request<Body>> for Proxy {
    type Response = http::Response<Incoming>;
    type Error = hyper_util::client::legacy::Error;
    type Future = hyper_util::client::legacy::ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        *request.uri_mut() = Uri::try_from(format!("http://{}{}", self.addr, path)).unwrap();
        self.client.request(request)
    }
}

/// The layer around a proxy to the upstream, driven in process.
pub struct Harness<St: Store = Arc<MemoryStore>> {
    pub upstream: Upstream,
    pub store: St,
    pub service: Idempotency<Proxy, St>,
}

impl Harness {
    pub async fn new(policy: IdempotencyPolicy) -> Self {
        let upstream = Upstream::start().await;
        let store = Arc::new(MemoryStore::new());
        Self::around(upstream, store, policy)
    }
}

impl<St: Store + Clone> Harness<St> {
    pub fn around(upstream: Upstream, store: St, policy: IdempotencyPolicy) -> Self {
        let layer = IdempotencyLayer::with_policy(store.clone(), policy).unwrap();
        let service = layer.layer(Proxy::new(upstream.addr()));
        Self {
            upstream,
            store,
            service,
        }
    }

    pub fn stats(&self) -> &Arc<IdempotencyStats> {
        self.service.stats()
    }

    pub async fn send(&self, request: Request<Body>) -> Answer {
        let response = self.service.clone().oneshot(request).await.unwrap();
        Answer::read(response).await
    }
}

/// A response, read whole.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub async fn read<B>(response: http::Response<B>) -> Self
    where
        B: http_body::Body,
        B::Error: std::fmt::Debug,
    {
        let (parts, body) = response.into_parts();
        Self {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    pub fn is_replay(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }

    /// Asserts a problem+json answer of this status and type slug.
    pub fn assert_problem(&self, status: u16, slug: &str) -> serde_json::Value {
        assert_eq!(self.status.as_u16(), status, "{self:?}");
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{self:?}"
        );
        let problem = self.json();
        assert_eq!(problem["type"], format!("https://idem.dev/problems/{slug}"));
        assert_eq!(problem["status"], status);
        assert!(problem["title"].is_string());
        assert!(problem["detail"].is_string());
        problem
    }

    /// The `Idempotency-Key-Expires` header, checked to be an IMF-fixdate in the future.
    pub fn expires(&self) -> &str {
        let value = self
            .header("idempotency-key-expires")
            .unwrap_or_else(|| panic!("no Idempotency-Key-Expires: {self:?}"));
        assert!(value.ends_with(" GMT") && value.len() == 29, "{value}");
        value
    }
}

/// A JSON `POST` with a key.
pub fn post(path: &str, key: &str, body: &str) -> http::request::Builder {
    Request::post(path)
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .header("content-length", body.len())
}

pub fn with_body(builder: http::request::Builder, body: &str) -> Request<Body> {
    builder.body(Body::from(body.to_owned())).unwrap()
}

/// An inner service that always fails, as a proxy to an unreachable upstream does.
pub fn unreachable_inner()
-> impl Service<Request<Body>, Response = http::Response<Body>, Error = std::io::Error, Future: Send>
+ Clone
+ Send
+ 'static {
    tower::service_fn(|_: Request<Body>| async {
        Err::<http::Response<Body>, _>(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "upstream refused the connection",
        ))
    })
}

pub type Never = Infallible;
