//! Test harness for the gateway over real sockets: an upstream on 127.0.0.1:0 that counts
//! executions per key and records what it received, the gateway in-process or as an
//! `idem serve` process, and clients (hyper and raw TCP).

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::{AppendHeaders, IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use idem::{Key, Record, Scope, ScopedKey, Store};
use idem_cli::config::{GatewayConfig, Overrides};
use idem_cli::gateway::{Gateway, serve_on};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tower::ServiceExt;

/// How long any single wait in these tests may take before it counts as a failure.
pub const PATIENCE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// The upstream
// ---------------------------------------------------------------------------------------

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Default)]
struct UpstreamState {
    /// Executions per raw `Idempotency-Key` value (lossy UTF-8; "" when absent).
    counts: Mutex<HashMap<String, u64>>,
    total: AtomicU64,
    seen: Mutex<Vec<Seen>>,
    /// When set, connections are accepted and dropped at once: an upstream that fails.
    refuse: AtomicBool,
}

/// The service behind the gateway: an axum app on its own accept loop.
///
/// Every request is counted (before its body is read), recorded, then answered after
/// `x-sleep-ms` milliseconds with status `x-status` (default 201), a few headers
/// (`set-cookie` twice, `location`, `x-upstream`) and a JSON body describing the execution
/// (or `x-body-size` bytes of `x`).
#[derive(Clone)]
pub struct Upstream {
    addr: SocketAddr,
    state: Arc<UpstreamState>,
}

impl Upstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = Self {
            addr: listener.local_addr().unwrap(),
            state: Arc::default(),
        };
        let app = Router::new().fallback(handle).with_state(upstream.clone());
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

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
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

    /// Whether new connections are dropped at once (an upstream that fails every request).
    pub fn set_refusing(&self, refuse: bool) {
        self.state.refuse.store(refuse, Ordering::SeqCst);
    }

    /// Waits until the upstream has counted `n` executions in all.
    pub async fn wait_total(&self, n: u64) {
        let deadline = Instant::now() + PATIENCE;
        while self.total() < n {
            assert!(
                Instant::now() < deadline,
                "the upstream saw {} requests, expected {n}",
                self.total()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn handle(State(upstream): State<Upstream>, request: Request<Body>) -> Response {
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
        None => describe(execution, n, &raw_key, &parts, &path, body.len()),
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

/// The JSON body describing one execution.
fn describe(
    execution: u64,
    n: u64,
    raw_key: &str,
    parts: &http::request::Parts,
    path: &str,
    body_len: usize,
) -> String {
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    serde_json::json!({
        "execution": execution,
        "n": n,
        "key": raw_key,
        "method": parts.method.as_str(),
        "path": path,
        "authorization": header("authorization"),
        "body_len": body_len,
    })
    .to_string()
}

// ---------------------------------------------------------------------------------------
// The gateway, in process
// ---------------------------------------------------------------------------------------

/// A gateway served by `serve_on` on 127.0.0.1:0 in this process.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub gateway: Gateway,
    pub store: Arc<dyn Store>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Loads a configuration as `idem serve` does: `file` is the TOML text of `--config` (empty
/// for none), `overrides` the flags. The store defaults to `memory:`.
pub fn load_config(file: &str, mut overrides: Overrides) -> GatewayConfig {
    if overrides.store.is_none() {
        overrides.store = Some("memory:".to_owned());
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.toml");
    std::fs::write(&path, file).unwrap();
    GatewayConfig::load(Some(&path), &overrides).unwrap_or_else(|e| panic!("config: {e}"))
}

/// Overrides with only `--upstream` set.
pub fn upstream_only(upstream: &Upstream) -> Overrides {
    Overrides {
        upstream: Some(upstream.url()),
        ..Overrides::default()
    }
}

impl TestGateway {
    /// The gateway for `config` over the store it names.
    pub async fn start(config: &GatewayConfig) -> Self {
        let store = config.store.open().await.unwrap();
        Self::with_store(config, store).await
    }

    /// The gateway for `config` over `store`.
    pub async fn with_store(config: &GatewayConfig, store: Arc<dyn Store>) -> Self {
        let gateway = Gateway::new(config, Arc::clone(&store)).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_on(
            listener,
            gateway.clone(),
            async move {
                let _ = stop.await;
            },
            Duration::from_secs(5),
        ));
        Self {
            addr,
            gateway,
            store,
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    /// Shortcut: `--upstream` plus the TOML `file`.
    pub async fn around(upstream: &Upstream, file: &str) -> Self {
        Self::start(&load_config(file, upstream_only(upstream))).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops accepting, and waits for `serve_on` to return.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("serve_on did not return after shutdown")
                .unwrap();
        }
    }

    /// Keyed requests executed by every route's layer.
    pub fn executed(&self) -> u64 {
        self.gateway.stats().iter().map(|s| s.executed()).sum()
    }

    /// The record of `key` in the anonymous scope.
    pub async fn record(&self, key: &str) -> Option<Record> {
        let key = ScopedKey::new(Scope::anonymous(), Key::new(key).unwrap());
        self.store.get(&key).await.unwrap()
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

pub type HttpClient = Client<HttpConnector, Body>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A response, read whole.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
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
        assert_eq!(
            problem["type"],
            format!("https://idem.dev/problems/{slug}"),
            "{problem}"
        );
        assert_eq!(problem["status"], status, "{problem}");
        assert!(problem["title"].is_string(), "{problem}");
        assert!(problem["detail"].is_string(), "{problem}");
        problem
    }

    /// `Retry-After`, as whole seconds.
    pub fn retry_after(&self) -> u64 {
        self.header("retry-after")
            .unwrap_or_else(|| panic!("no Retry-After: {self:?}"))
            .parse()
            .unwrap()
    }

    /// `Idempotency-Key-Expires`, checked to be an IMF-fixdate.
    pub fn expires(&self) -> &str {
        let value = self
            .header("idempotency-key-expires")
            .unwrap_or_else(|| panic!("no Idempotency-Key-Expires: {self:?}"));
        assert!(value.ends_with(" GMT") && value.len() == 29, "{value}");
        value
    }

    /// The headers, minus the ones a replay may legitimately change or add.
    pub fn replayable_headers(&self) -> Vec<(String, Vec<u8>)> {
        let mut headers: Vec<(String, Vec<u8>)> = self
            .headers
            .iter()
            .filter(|(name, _)| !matches!(name.as_str(), "date" | "idempotent-replayed"))
            .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
            .collect();
        headers.sort();
        headers
    }
}

pub async fn send(client: &HttpClient, request: Request<Body>) -> Answer {
    let response = tokio::time::timeout(PATIENCE, client.request(request))
        .await
        .expect("no answer in time")
        .expect("the request failed");
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// A JSON `POST` to `url`, with `key` when given.
pub fn post(url: &str, key: Option<&str>) -> http::request::Builder {
    let mut builder = Request::post(url).header("content-type", "application/json");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder
}

/// A JSON `POST` with `key` and `body`, ready to send.
pub fn keyed(url: &str, key: &str, body: &str) -> Request<Body> {
    post(url, Some(key))
        .body(Body::from(body.to_owned()))
        .unwrap()
}

/// Sends `request` (raw bytes) on a fresh connection and reads until the server closes it.
/// Returns the head (status line and headers) and the body bytes.
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

/// Polls `f` until it returns `Some`, for at most [`PATIENCE`].
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = f().await {
            return value;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// The gateway as a process
// ---------------------------------------------------------------------------------------

/// The `idem` binary built for these tests.
pub fn idem_bin() -> &'static str {
    env!("CARGO_BIN_EXE_idem")
}

/// Runs `idem ARGS` to completion; returns its status, stdout and stderr.
pub fn run_idem(args: &[&str]) -> (ExitStatus, String, String) {
    let output = Command::new(idem_bin())
        .args(args)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !stderr.contains("panicked"),
        "idem {args:?} panicked: {stderr}"
    );
    (output.status, stdout, stderr)
}

/// A running `idem serve` on 127.0.0.1:0; killed (SIGKILL) when dropped if still running.
pub struct ServeProcess {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl ServeProcess {
    /// Starts `idem serve --listen 127.0.0.1:0 --upstream URL --store redb:PATH ARGS` and
    /// waits for its ready line, which carries the bound address.
    pub fn start(upstream: &Upstream, redb: &Path, args: &[&str]) -> Self {
        Self::start_on(upstream, &format!("redb:{}", redb.display()), args)
    }

    /// Like [`start`](Self::start), on any store URL.
    pub fn start_on(upstream: &Upstream, store: &str, args: &[&str]) -> Self {
        let mut child = Command::new(idem_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--upstream"])
            .arg(upstream.url())
            .args(["--store", store])
            .args(args)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ready, addr) = std::sync::mpsc::channel();
        {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut ready = Some(ready);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let line = strip_ansi(&line);
                    if line.contains("idem serve is ready")
                        && let Some(addr) = field(&line, "listen")
                        && let Some(ready) = ready.take()
                    {
                        let _ = ready.send(addr.parse::<SocketAddr>().unwrap());
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        match addr.recv_timeout(PATIENCE) {
            Ok(addr) => Self { child, addr, log },
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "idem serve did not become ready:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// SIGKILL, and reaps it.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Sends SIGTERM (with the `kill` command: no signal crate needed).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for it to exit, for at most [`PATIENCE`].
    pub async fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader thread take the last lines.
                tokio::time::sleep(Duration::from_millis(20)).await;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "idem serve did not exit in time:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Removes ANSI escape sequences (colours), should any be there.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The value of `name=value` in a log line.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!("{name}="))? + name.len() + 1;
    line[start..].split_whitespace().next()
}
