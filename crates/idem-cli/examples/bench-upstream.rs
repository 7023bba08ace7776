//! A trivial upstream for the HTTP benchmark (`bench/http.sh`): answers every POST (or
//! other method with a body) `201` with a small JSON body, every GET `200`, and counts the
//! POSTs it served so the benchmark can check that replays never reach it.
//!
//! ```sh
//! cargo run --release -p idem-cli --example bench-upstream -- 127.0.0.1:38081 [THREADS]
//! curl -s http://127.0.0.1:38081/__stats   # {"posts":N}
//! ```
//!
//! `THREADS` is the number of tokio worker threads (default: one per core).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const CREATED: &[u8] = br#"{"id":"pay_1","status":"created"}"#;
const OK: &[u8] = br#"{"ok":true}"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:38081".to_owned())
        .parse()?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = args.next() {
        runtime.worker_threads(threads.parse()?);
    }
    runtime.enable_all().build()?.block_on(serve(addr))
}

async fn serve(addr: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let listener = TcpListener::bind(addr).await?;
    let posts = Arc::new(AtomicU64::new(0));
    eprintln!("bench-upstream listening on {addr}");
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let posts = Arc::clone(&posts);
        tokio::spawn(async move {
            let service = service_fn(move |request| answer(request, Arc::clone(&posts)));
            // Errors here are clients that went away; nothing to do about them.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    request: Request<Incoming>,
    posts: Arc<AtomicU64>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    // Read the whole body, as a real handler would.
    let _ = body.collect().await;
    let (status, body) = match parts.method {
        Method::GET if parts.uri.path() == "/__stats" => (
            StatusCode::OK,
            Bytes::from(format!(r#"{{"posts":{}}}"#, posts.load(Ordering::Relaxed))),
        ),
        Method::GET | Method::HEAD => (StatusCode::OK, Bytes::from_static(OK)),
        _ => {
            posts.fetch_add(1, Ordering::Relaxed);
            (StatusCode::CREATED, Bytes::from_static(CREATED))
        }
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}
