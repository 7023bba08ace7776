//! The lossy hop: the network between clients and the service, losing a share of the
//! answers after the work was done.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::header;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

use super::fleet::pooled_client;
use super::payments::json;
use super::rng::{splitmix64, unit};

/// The relay returns this to hyper to drop an answer: hyper then closes the connection
/// without writing a response.
#[derive(Debug)]
pub(super) struct Lost;

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("answer lost on purpose by the demo's lossy hop")
    }
}

impl std::error::Error for Lost {}

/// An HTTP relay that forwards every request, waits for the whole answer, and loses a share
/// of the answers by closing the client's connection instead.
#[derive(Clone)]
pub(super) struct LossyHop {
    target: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
    drop_rate: f64,
    seed: u64,
    forwarded: Arc<AtomicU64>,
    pub(super) lost: Arc<AtomicU64>,
}

impl LossyHop {
    pub(super) fn new(target: SocketAddr, drop_rate: f64, seed: u64) -> Self {
        Self {
            target,
            client: pooled_client(),
            drop_rate,
            seed,
            forwarded: Arc::new(AtomicU64::new(0)),
            lost: Arc::new(AtomicU64::new(0)),
        }
    }

    pub(super) async fn relay(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Lost> {
        let (parts, body) = request.into_parts();
        let Ok(body) = body.collect().await.map(|body| body.to_bytes()) else {
            // The client went away mid-request: nothing to answer.
            return Err(Lost);
        };
        let path = parts.uri.path_and_query().map_or("/", |path| path.as_str());
        let mut forward = Request::new(Full::new(body));
        *forward.method_mut() = parts.method;
        *forward.uri_mut() = match format!("http://{}{path}", self.target).parse() {
            Ok(uri) => uri,
            Err(_) => return Ok(json(StatusCode::BAD_REQUEST, "{}".into())),
        };
        *forward.headers_mut() = parts.headers;
        forward.headers_mut().remove(header::HOST);
        forward.headers_mut().remove(header::CONNECTION);

        let answer = match self.client.request(forward).await {
            Ok(answer) => answer,
            Err(_) => return Ok(json(StatusCode::BAD_GATEWAY, r#"{"error":"hop"}"#.into())),
        };
        let (mut parts, body) = answer.into_parts();
        let Ok(body) = body.collect().await.map(|body| body.to_bytes()) else {
            return Ok(json(StatusCode::BAD_GATEWAY, r#"{"error":"hop"}"#.into()));
        };
        // The work is done and its answer is here. Now lose it, or pass it on.
        let n = self.forwarded.fetch_add(1, Ordering::Relaxed);
        if unit(splitmix64(
            self.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        )) < self.drop_rate
        {
            self.lost.fetch_add(1, Ordering::Relaxed);
            return Err(Lost);
        }
        for name in [
            header::CONNECTION,
            header::TRANSFER_ENCODING,
            header::CONTENT_LENGTH,
        ] {
            parts.headers.remove(name);
        }
        Ok(Response::from_parts(parts, Full::new(body)))
    }
}
