//! What idem-client's tests stand on: `idem serve`'s gateway in this process, an upstream
//! that answers from a script, and settings that retry quickly.

#![allow(dead_code, unreachable_pub)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
use idem_cli::config::{GatewayConfig, Overrides};
use idem_cli::gateway::{Gateway, serve_on};
use idem_client::RetrySettings;
use idem_testkit::Upstream;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// `idem serve` in this process, over `memory:`, in front of an upstream.
pub struct TestGateway {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
}

impl TestGateway {
    /// The gateway in front of `upstream`, with `toml` as its `--config` file.
    pub async fn around(upstream: &Upstream, toml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idem.toml");
        std::fs::write(&path, toml).unwrap();
        let overrides = Overrides {
            upstream: Some(upstream.url()),
            store: Some("memory:".to_owned()),
            ..Overrides::default()
        };
        let config = GatewayConfig::load(Some(&path), &overrides).unwrap();
        let store = config.store.open().await.unwrap();
        let gateway = Gateway::new(&config, store);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, stop) = oneshot::channel::<()>();
        let stopped = async move {
            let _ = stop.await;
        };
        tokio::spawn(serve_on(listener, gateway, stopped, Duration::from_secs(5)));
        Self {
            addr,
            shutdown: Some(shutdown),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

/// Retries quickly, so tests do not wait on backoff: 8 attempts, 10 ms to 100 ms apart,
/// within 30 s.
pub fn quick() -> RetrySettings {
    RetrySettings {
        max_attempts: 8,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(100),
        deadline: Duration::from_secs(30),
        ..RetrySettings::default()
    }
}

/// One scripted answer: a status and headers.
#[derive(Debug, Clone)]
pub struct Scene {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
}

/// `status` with `headers`.
pub fn scene(status: u16, headers: &[(&'static str, &str)]) -> Scene {
    Scene {
        status,
        headers: headers.iter().map(|(n, v)| (*n, (*v).to_owned())).collect(),
    }
}

#[derive(Default)]
struct Script {
    scenes: Mutex<VecDeque<Scene>>,
    seen: Mutex<Vec<HeaderMap>>,
    bodies: Mutex<Vec<Bytes>>,
}

/// An upstream that answers its requests from a script, in order, then `201` forever, and
/// records what it received.
#[derive(Clone)]
pub struct Scripted {
    pub addr: SocketAddr,
    script: Arc<Script>,
}

impl Scripted {
    pub async fn start(scenes: Vec<Scene>) -> Self {
        let script = Arc::new(Script {
            scenes: Mutex::new(scenes.into()),
            ..Script::default()
        });
        let app = Router::new()
            .fallback(answer)
            .with_state(Arc::clone(&script));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, script }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The headers of every request received, in order.
    pub fn seen(&self) -> Vec<HeaderMap> {
        self.script.seen.lock().unwrap().clone()
    }

    /// The bodies of every request received, in order.
    pub fn bodies(&self) -> Vec<Bytes> {
        self.script.bodies.lock().unwrap().clone()
    }

    /// The value of `header` in every request received, in order ("" when absent).
    pub fn header_of_each(&self, header: &str) -> Vec<String> {
        self.seen()
            .iter()
            .map(|h| {
                h.get(header)
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default()
            })
            .collect()
    }
}

async fn answer(State(script): State<Arc<Script>>, headers: HeaderMap, body: Bytes) -> Response {
    script.seen.lock().unwrap().push(headers);
    script.bodies.lock().unwrap().push(body);
    let scene = script
        .scenes
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or_else(|| scene(201, &[]));
    let mut response = (StatusCode::from_u16(scene.status).unwrap(), "scripted").into_response();
    for (name, value) in scene.headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    response
}
