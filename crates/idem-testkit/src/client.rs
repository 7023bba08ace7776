//! A plain HTTP client for tests: [`client`], [`send`], [`keyed`], [`raw_exchange`].

use std::net::SocketAddr;

use axum::body::Body;
use http::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::answer::Answer;
use crate::wait::PATIENCE;

/// A pooled HTTP/1 client.
pub type HttpClient = Client<HttpConnector, Body>;

/// A new pooled HTTP/1 client.
///
/// ```
/// let client = idem_testkit::client();
/// # drop(client);
/// ```
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends `request` and reads the answer whole; panics when there is none within
/// [`PATIENCE`] or the request fails.
///
/// ```
/// use idem_testkit::{Upstream, client, keyed, send};
///
/// # #[tokio::main] async fn main() {
/// let upstream = Upstream::start().await;
/// let answer = send(&client(), keyed(&upstream.url_for("/"), "k", "{}")).await;
/// assert_eq!(answer.json()["key"], "k");
/// # }
/// ```
pub async fn send(client: &HttpClient, request: Request<Body>) -> Answer {
    let response = tokio::time::timeout(PATIENCE, client.request(request))
        .await
        .expect("no answer in time")
        .expect("the request failed");
    Answer::read(response).await
}

/// A JSON `POST` to `url` with `Idempotency-Key: key` and `body`, ready to send.
///
/// ```
/// let request = idem_testkit::keyed("http://127.0.0.1:1/pay", "k-1", "{}");
/// assert_eq!(request.headers()["idempotency-key"], "k-1");
/// ```
pub fn keyed(url: &str, key: &str, body: &str) -> Request<Body> {
    Request::post(url)
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(Body::from(body.to_owned()))
        .unwrap()
}

/// Sends `request` (raw bytes) on a fresh connection and reads until the server closes it.
/// Returns the head (status line and headers) and the body bytes.
///
/// ```
/// use idem_testkit::{Upstream, raw_exchange};
///
/// # #[tokio::main] async fn main() {
/// let upstream = Upstream::start().await;
/// let (head, _body) =
///     raw_exchange(upstream.addr(), b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
///         .await;
/// assert!(head.starts_with("HTTP/1.1 201"), "{head}");
/// # }
/// ```
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> (String, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response))
        .await
        .expect("the server did not close the connection in time")
        .unwrap();
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head: {:?}", String::from_utf8_lossy(&response)));
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    (head, response[split + 4..].to_vec())
}
