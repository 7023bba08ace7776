//! What the TLS tests share: a throwaway certificate authority (rcgen), an HTTPS front for
//! the testkit upstream, and TLS-only Redis and Postgres servers started from the test, on
//! loopback, killed when dropped.

#![allow(dead_code, unreachable_pub)] // each test binary uses its own part

use std::fs::File;
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use idem_testkit::Upstream;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig, crypto};
use tower::ServiceExt;

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A throwaway certificate authority whose files live in a temporary directory.
pub struct Pki {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: tempfile::TempDir,
    /// The authority's certificate, PEM: what a client is told to trust.
    pub ca_file: PathBuf,
}

impl Pki {
    /// A new authority named `name`.
    pub fn new(name: &str) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        // Servers started as another user (Postgres) must read the files.
        world_readable(dir.path());
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, issuer.pem()).unwrap();
        world_readable(&ca_file);
        Self {
            issuer,
            dir,
            ca_file,
        }
    }

    /// A server certificate for 127.0.0.1 and localhost. It is good for client
    /// authentication too: Redis Cluster nodes present it to each other on the cluster bus.
    pub fn server(&self, name: &str) -> Pair {
        self.issue(
            name,
            &["127.0.0.1", "localhost"],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    /// A client certificate whose common name is `name` (Postgres maps it to a user).
    pub fn client(&self, name: &str) -> Pair {
        self.issue(name, &[], vec![ExtendedKeyUsagePurpose::ClientAuth])
    }

    fn issue(&self, name: &str, names: &[&str], purposes: Vec<ExtendedKeyUsagePurpose>) -> Pair {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = purposes;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let pair = Pair {
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}.key")),
        };
        std::fs::write(&pair.cert, cert.pem()).unwrap();
        std::fs::write(&pair.key, key.serialize_pem()).unwrap();
        world_readable(&pair.cert);
        world_readable(&pair.key);
        pair
    }

    /// A rustls server presenting `pair`; with `clients_must_present`, it refuses clients
    /// without a certificate from this authority.
    pub fn server_config(&self, pair: &Pair, clients_must_present: bool) -> ServerConfig {
        let provider = Arc::new(crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if clients_must_present {
            let mut roots = RootCertStore::empty();
            roots.add(self.issuer.der().clone()).unwrap();
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let chain = CertificateDer::pem_file_iter(&pair.cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&pair.key).unwrap();
        builder.with_single_cert(chain, key).unwrap()
    }

    /// The directory the files are in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn world_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = if path.is_dir() { 0o755 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Serves `upstream`'s app (make it [`Upstream::unbound`]) over TLS on 127.0.0.1, as
/// `https://127.0.0.1:PORT`; the task stops with the runtime.
pub async fn https_front(upstream: &Upstream, config: ServerConfig) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let app = upstream.app();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                // A refused handshake (the test's point, sometimes) just ends the connection.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    app.clone().oneshot(request.map(Body::new))
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

/// The error and every cause, on one line.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        text.push_str(": ");
        text.push_str(&error.to_string());
        cause = error.source();
    }
    text
}

// ---------------------------------------------------------------------------------------
// Redis over TLS
// ---------------------------------------------------------------------------------------

/// `redis-server` processes listening for TLS only, killed when dropped.
pub struct TlsRedis {
    nodes: Vec<Child>,
    pub ports: Vec<u16>,
    client: Pair,
    ca_file: PathBuf,
    dir: tempfile::TempDir,
}

impl TlsRedis {
    /// One node, which asks clients for a certificate (`tls-auth-clients yes`, Redis'
    /// default).
    pub fn single(pki: &Pki) -> Self {
        Self::start(pki, 1)
    }

    /// A Redis Cluster of three primaries, over TLS between the nodes too.
    pub fn cluster(pki: &Pki) -> Self {
        Self::start(pki, 3)
    }

    fn start(pki: &Pki, nodes: usize) -> Self {
        let mut failures = Vec::new();
        for _ in 0..5 {
            match Self::try_start(pki, nodes) {
                Ok(redis) => return redis,
                // Most likely a port taken between our check and the node's bind.
                Err(failure) => failures.push(failure),
            }
        }
        panic!(
            "could not start a TLS Redis ({nodes} node(s)):\n{}",
            failures.join("\n---\n")
        );
    }

    fn try_start(pki: &Pki, count: usize) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let server = pki.server("redis");
        let mut redis = Self {
            nodes: Vec::new(),
            ports: free_ports(count),
            client: pki.client("idem"),
            ca_file: pki.ca_file.clone(),
            dir,
        };
        for port in redis.ports.clone() {
            let log = File::create(redis.dir.path().join(format!("{port}.log")))
                .map_err(|e| e.to_string())?;
            let mut command = Command::new("redis-server");
            command
                .args(["--port", "0", "--tls-port", &port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .arg("--tls-cert-file")
                .arg(&server.cert)
                .arg("--tls-key-file")
                .arg(&server.key)
                .arg("--tls-ca-cert-file")
                .arg(&pki.ca_file)
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--dir")
                .arg(redis.dir.path());
            if count > 1 {
                command
                    .args(["--cluster-enabled", "yes", "--tls-cluster", "yes"])
                    .arg("--cluster-config-file")
                    .arg(redis.dir.path().join(format!("nodes-{port}.conf")))
                    .args(["--cluster-node-timeout", "5000"]);
            }
            let child = command
                .stdin(Stdio::null())
                .stdout(log.try_clone().map_err(|e| e.to_string())?)
                .stderr(log)
                .spawn()
                .map_err(|e| format!("cannot start redis-server (is it on PATH?): {e}"))?;
            redis.nodes.push(child);
        }
        for port in redis.ports.clone() {
            wait_for(Duration::from_secs(10), || {
                redis
                    .cli(port, &["ping"])
                    .is_ok_and(|out| out.trim() == "PONG")
            })
            .map_err(|()| format!("node {port} did not answer; its log:\n{}", redis.log(port)))?;
        }
        if count > 1 {
            let addresses: Vec<String> = redis
                .ports
                .iter()
                .map(|p| format!("127.0.0.1:{p}"))
                .collect();
            let mut create = redis.cli_command(redis.ports[0]);
            create.args(["--cluster", "create"]).args(&addresses).args([
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ]);
            let output = output_within(create, Duration::from_secs(60))?;
            if !output.status.success() {
                return Err(format!(
                    "redis-cli --cluster create failed: {}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                ));
            }
            let ports = redis.ports.clone();
            wait_for(Duration::from_secs(30), || {
                ports.iter().all(|&port| {
                    redis
                        .cli(port, &["cluster", "info"])
                        .is_ok_and(|out| out.contains("cluster_state:ok"))
                })
            })
            .map_err(|()| "the cluster did not reach cluster_state:ok".to_owned())?;
        }
        Ok(redis)
    }

    /// The store URL, `rediss://` or `rediss+cluster://`, with `prefix` and the TLS files:
    /// `ca_file` trusting `trust`, and the client certificate unless `present_cert` is false.
    pub fn url(&self, prefix: &str, trust: &Path, present_cert: bool) -> String {
        let nodes: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let scheme = if self.ports.len() > 1 {
            "rediss+cluster"
        } else {
            "rediss"
        };
        let mut url = format!(
            "{scheme}://{}?prefix={prefix}&ca_file={}",
            nodes.join(","),
            trust.display()
        );
        if present_cert {
            url.push_str(&format!(
                "&cert_file={}&key_file={}",
                self.client.cert.display(),
                self.client.key.display()
            ));
        }
        url
    }

    fn cli_command(&self, port: u16) -> Command {
        let mut command = Command::new("redis-cli");
        command
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--tls"])
            .arg("--cacert")
            .arg(&self.ca_file)
            .arg("--cert")
            .arg(&self.client.cert)
            .arg("--key")
            .arg(&self.client.key);
        command
    }

    /// `redis-cli ARGS` against the node at `port`, over TLS.
    pub fn cli(&self, port: u16, args: &[&str]) -> Result<String, String> {
        let output = self
            .cli_command(port)
            .args(args)
            .stderr(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn log(&self, port: u16) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{port}.log"))).unwrap_or_default()
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.kill();
            let _ = node.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Postgres over TLS
// ---------------------------------------------------------------------------------------

/// A throwaway Postgres cluster that accepts only TLS connections from clients presenting a
/// certificate from the test's authority whose common name is the user (`postgres`).
/// Killed when dropped.
pub struct TlsPostgres {
    server: Child,
    pub port: u16,
    /// The client certificate of user `postgres`.
    pub client: Pair,
    dir: tempfile::TempDir,
}

impl TlsPostgres {
    pub fn start(pki: &Pki) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        world_readable(dir.path());
        let data = dir.path().join("data");
        let run_as = postgres_user();
        if let Some(user) = &run_as {
            let status = Command::new("chown")
                .arg(user)
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(
                status.success(),
                "chown {user} of the data directory failed"
            );
        }
        let bin = postgres_bin_dir();
        let output = as_user(&run_as, &bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "--no-instructions",
            ])
            .output()
            .expect("cannot run initdb");
        assert!(
            output.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        // Postgres wants its private key readable by its own user only.
        let server = pki.server("postgres-server");
        let key = dir.path().join("server.key");
        std::fs::copy(&server.key, &key).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        if let Some(user) = &run_as {
            let _ = Command::new("chown").arg(user).arg(&key).status();
        }
        // TLS with a client certificate naming the user, or nothing.
        std::fs::write(
            data.join("pg_hba.conf"),
            "hostssl all all 127.0.0.1/32 trust clientcert=verify-full\n\
             host all all 0.0.0.0/0 reject\n",
        )
        .unwrap();
        let port = free_ports(1)[0];
        let log = File::create(dir.path().join("postgres.log")).unwrap();
        let server_process = as_user(&run_as, &bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.path().display()))
            .args(["-c", "ssl=on", "-c", "fsync=off"])
            .arg("-c")
            .arg(format!("ssl_cert_file={}", server.cert.display()))
            .arg("-c")
            .arg(format!("ssl_key_file={}", key.display()))
            .arg("-c")
            .arg(format!("ssl_ca_file={}", pki.ca_file.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start postgres");
        let postgres = Self {
            server: server_process,
            port,
            client: pki.client("postgres"),
            dir,
        };
        wait_for(Duration::from_secs(30), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .unwrap_or_else(|()| panic!("postgres did not listen; its log:\n{}", postgres.log()));
        postgres
    }

    /// The store URL with `sslmode`, trusting `trust`, presenting the client certificate
    /// unless `present_cert` is false.
    pub fn url(&self, sslmode: &str, trust: &Path, present_cert: bool) -> String {
        let mut url = format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode={sslmode}&sslrootcert={}",
            self.port,
            trust.display()
        );
        if present_cert {
            url.push_str(&format!(
                "&sslcert={}&sslkey={}",
                self.client.cert.display(),
                self.client.key.display()
            ));
        }
        url
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// Postgres refuses to run as root: then run it as `postgres`.
fn postgres_user() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    (String::from_utf8_lossy(&uid.stdout).trim() == "0").then(|| "postgres".to_owned())
}

fn as_user(user: &Option<String>, program: &Path) -> Command {
    match user {
        Some(user) => {
            let mut command = Command::new("runuser");
            command.args(["-u", user, "--"]).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// Where `initdb` and `postgres` are: `pg_config --bindir`, else Debian's newest.
fn postgres_bin_dir() -> PathBuf {
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output()
        && output.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| {
            dirs.filter_map(|d| d.ok())
                .map(|d| d.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .pop()
        .filter(|dir| dir.join("initdb").exists())
        .expect("no Postgres server binaries (initdb): install postgresql")
}

// ---------------------------------------------------------------------------------------
// Ports and waits
// ---------------------------------------------------------------------------------------

/// `count` distinct free ports in 20000..30000, each with port + 10000 free too (a Redis
/// Cluster node's bus).
pub fn free_ports(count: usize) -> Vec<u16> {
    let mut ports = Vec::new();
    let mut seed = idem_testkit::unique();
    while ports.len() < count {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let port = 20_000 + (seed % 10_000) as u16;
        let free = |p: u16| StdListener::bind(("127.0.0.1", p)).is_ok();
        if !ports.contains(&port) && free(port) && free(port + 10_000) {
            ports.push(port);
        }
    }
    ports
}

/// Runs `command` to its end, or kills it after `limit`: a test must not hang on a tool.
fn output_within(mut command: Command, limit: Duration) -> Result<std::process::Output, String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let output = child.wait_with_output().map_err(|e| e.to_string())?;
            return Err(format!(
                "{command:?} did not finish within {limit:?}: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().map_err(|e| e.to_string())
}

fn wait_for(limit: Duration, mut ready: impl FnMut() -> bool) -> Result<(), ()> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(())
}
