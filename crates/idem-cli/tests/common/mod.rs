//! Test harness for the gateway over real sockets: the gateway in-process or as an
//! `idem serve` process. The upstream that counts executions per key, the clients, the
//! answers and the waits come from `idem-testkit`, re-exported here under the names these
//! tests have always used.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Request;
use idem_cli::config::{GatewayConfig, Overrides};
use idem_cli::gateway::{Gateway, serve_on};
use idem_core::{Key, Record, Scope, ScopedKey, Store};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

#[allow(unused_imports)] // each test binary uses its own part
pub use idem_testkit::{
    Answer, Fault, FaultProxy, HttpClient, PATIENCE, PostgresSchema, RedisPrefix, Seen, Upstream,
    client, database_url, eventually, host_port, keyed, raw_exchange, redis_url, send, unique,
    wait_until,
};

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
    // Tests run side by side: the default admin port would be taken by the first.
    if overrides.admin_listen.is_none() {
        overrides.admin_listen = Some("127.0.0.1:0".to_owned());
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
        let gateway = Gateway::new(config, Arc::clone(&store));
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

/// A JSON `POST` to `url`, with `key` when given.
pub fn post(url: &str, key: Option<&str>) -> http::request::Builder {
    let mut builder = Request::post(url).header("content-type", "application/json");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder
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
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .arg("--upstream")
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
