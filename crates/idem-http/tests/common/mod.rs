//! Test harness: a real upstream on 127.0.0.1:0 that counts executions per key (from
//! `idem-testkit`), a proxy service that forwards to it over the socket, and the layer
//! wrapped around the proxy.

#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use http::{Request, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use idem_core::{BoxError, MemoryStore, Store};
use idem_http::{Idempotency, IdempotencyLayer, IdempotencyPolicy, IdempotencyStats, NotSent};
use tower::{Layer, Service, ServiceExt};

pub use idem_testkit::{Answer, Upstream};

/// Forwards requests to an address over a real socket (what the gateway does). A failed
/// connect is wrapped in [`NotSent`]: nothing left, so the layer may release the key.
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
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

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
        let sent = self.client.request(request);
        Box::pin(async move {
            sent.await.map_err(|error| -> BoxError {
                if error.is_connect() {
                    Box::new(NotSent::new(error))
                } else {
                    Box::new(error)
                }
            })
        })
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

/// An inner service that always fails before sending anything, as a proxy to an
/// unreachable upstream does (its error carries [`NotSent`]).
pub fn unreachable_inner()
-> impl Service<Request<Body>, Response = http::Response<Body>, Error = NotSent, Future: Send>
+ Clone
+ Send
+ 'static {
    tower::service_fn(|_: Request<Body>| async {
        Err::<http::Response<Body>, _>(NotSent::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "upstream refused the connection",
        )))
    })
}

pub type Never = Infallible;
