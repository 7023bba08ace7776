//! The layer under a plain hyper server (no axum router), over a real socket.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Body;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use idem_core::MemoryStore;
use idem_http::IdempotencyLayer;
use tower::{Layer, ServiceExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_under_a_hyper_server() {
    let runs = Arc::new(AtomicU64::new(0));
    let handler = tower::service_fn({
        let runs = Arc::clone(&runs);
        move |request: Request<Body>| {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                let body = request.into_body().collect().await?.to_bytes();
                let text = format!("run {n}: {}", String::from_utf8_lossy(&body));
                Ok::<_, axum::Error>(Response::new(Body::from(text)))
            }
        }
    });
    let service = IdempotencyLayer::new(MemoryStore::new()).layer(handler);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let service = service.clone();
            // hyper's `Incoming` becomes a body the layer can rebuild from bytes.
            let hyper_service = hyper::service::service_fn(move |request: Request<Incoming>| {
                service.clone().oneshot(request.map(Body::new))
            });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), hyper_service)
                    .await;
            });
        }
    });

    let client = Client::builder(TokioExecutor::new()).build_http::<Body>();
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let request = Request::post(format!("http://{addr}/orders"))
            .header("idempotency-key", "h-1")
            .body(Body::from("pizza"))
            .unwrap();
        let response = client.request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        bodies.push((
            response.headers().get("idempotent-replayed").cloned(),
            response.into_body().collect().await.unwrap().to_bytes(),
        ));
    }
    assert_eq!(bodies[0].0, None);
    assert_eq!(bodies[1].0.as_ref().unwrap(), "true");
    assert_eq!(bodies[0].1, "run 1: pizza");
    assert_eq!(bodies[1].1, bodies[0].1);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
