//! The shared conformance suite against a 3-primary Redis Cluster that this test starts
//! itself, on loopback ports, from the `redis-server` and `redis-cli` on `PATH`.
//!
//! One `#[test]` owns the cluster: it starts the nodes, runs every conformance case against a
//! fresh store (its own key prefix) one after the other, and kills the nodes when it ends,
//! passing or panicking, so no `redis-server` outlives the test binary.

mod common;

use std::fs::File;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use idem_core::testing::{Subject, TimeTravel, fingerprint, scoped};
use idem_core::{Begin, Store, Stored};
use idem_redis::RedisStore;
use idem_redis::fred::interfaces::LuaInterface;

use common::{random, test_options, unique_prefix};

/// Three cluster primaries, killed when dropped.
struct Cluster {
    nodes: Vec<Child>,
    ports: Vec<u16>,
    // Dropped after the nodes are killed (Drop runs before fields are dropped).
    dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Self {
        let mut failures = Vec::new();
        for _ in 0..5 {
            match Self::try_start() {
                Ok(cluster) => return cluster,
                // Most likely a port taken between our check and the node's bind: try others.
                Err(failure) => failures.push(failure),
            }
        }
        panic!(
            "could not start a Redis Cluster:\n{}",
            failures.join("\n---\n")
        );
    }

    fn try_start() -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
        let ports = free_ports(3);
        let mut cluster = Cluster {
            nodes: Vec::new(),
            ports: ports.clone(),
            dir,
        };
        for &port in &ports {
            let child = spawn_node(cluster.dir.path(), port)?;
            cluster.nodes.push(child);
        }
        for &port in &ports {
            wait_for(Duration::from_secs(10), || {
                cli(port, &["ping"]).is_ok_and(|out| out.trim() == "PONG")
            })
            .map_err(|_| {
                format!(
                    "node {port} did not answer PING; its log:\n{}",
                    cluster.log(port)
                )
            })?;
        }
        let addresses: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut create = Command::new("redis-cli");
        create
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"]);
        let output = create
            .output()
            .map_err(|e| format!("cannot run redis-cli: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        wait_for(Duration::from_secs(30), || {
            ports.iter().all(|&port| {
                cli(port, &["cluster", "info"]).is_ok_and(|out| out.contains("cluster_state:ok"))
            })
        })
        .map_err(|_| "the cluster did not reach cluster_state:ok".to_owned())?;
        Ok(cluster)
    }

    fn url(&self) -> String {
        let nodes: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", nodes.join(","))
    }

    fn log(&self, port: u16) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node-{port}.log")))
            .unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.kill();
            let _ = node.wait();
        }
    }
}

fn spawn_node(dir: &Path, port: u16) -> Result<Child, String> {
    let log =
        File::create(dir.join(format!("node-{port}.log"))).map_err(|e| format!("node log: {e}"))?;
    let log_err = log.try_clone().map_err(|e| format!("node log: {e}"))?;
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--cluster-enabled", "yes"])
        .arg("--cluster-config-file")
        .arg(dir.join(format!("nodes-{port}.conf")))
        .args(["--cluster-node-timeout", "5000"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|e| format!("cannot start redis-server (is it on PATH?): {e}"))
}

/// `count` distinct ports in 20000..30000 that are free, with their cluster bus ports
/// (port + 10000) free too.
fn free_ports(count: usize) -> Vec<u16> {
    let mut ports = Vec::new();
    while ports.len() < count {
        let port = 20_000 + u16::try_from(random() % 10_000).unwrap_or(0);
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if !ports.contains(&port) && free(port) && free(port + 10_000) {
            ports.push(port);
        }
    }
    ports
}

fn cli(port: u16, args: &[&str]) -> Result<String, String> {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
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

async fn subject(url: &str) -> Subject<RedisStore> {
    let store = RedisStore::connect_with(url, test_options(&unique_prefix()))
        .await
        .unwrap_or_else(|error| panic!("cannot connect to the cluster at {url}: {error:?}"));
    // The cluster is thrown away at the end; nothing to clean up per subject.
    Subject::new(store, TimeTravel::Real)
}

#[test]
fn redis_cluster_passes_the_conformance_suite() {
    let cluster = Cluster::start();
    let url = cluster.url();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        idem_core::conformance_sequence!(|| subject(&url)).await;
        records_spread_over_every_primary(&cluster, &url).await;
        scripts_are_loaded_again_on_every_primary(&url).await;
    });
    drop(runtime);
    drop(cluster);
}

/// Records land on all three primaries: the hash tag is the digest, not the prefix.
async fn records_spread_over_every_primary(cluster: &Cluster, url: &str) {
    let prefix = unique_prefix();
    let store = RedisStore::connect_with(url, test_options(&prefix))
        .await
        .expect("connect");
    for i in 0..60 {
        let key = scoped(&format!("spread-{i}"));
        let answer = store
            .begin(&key, &fingerprint("a"), Duration::from_secs(60))
            .await
            .unwrap();
        assert!(matches!(answer, Begin::Acquired(_)), "{answer:?}");
    }
    for &port in &cluster.ports {
        let keys = cli(port, &["--scan", "--pattern", &format!("{prefix}:*")]).unwrap();
        let count = keys.lines().filter(|line| !line.is_empty()).count();
        assert!(count > 0, "no record landed on the primary at {port}");
    }
}

/// After every primary forgot the scripts, each call loads its script again where it runs.
async fn scripts_are_loaded_again_on_every_primary(url: &str) {
    let store = RedisStore::connect_with(url, test_options(&unique_prefix()))
        .await
        .expect("connect");
    for i in 0..30 {
        store
            .pool()
            .script_flush_cluster(false)
            .await
            .expect("SCRIPT FLUSH on every primary");
        let key = scoped(&format!("noscript-{i}"));
        let Begin::Acquired(lease) = store
            .begin(&key, &fingerprint("a"), Duration::from_secs(60))
            .await
            .unwrap()
        else {
            panic!("a new key is acquired")
        };
        store
            .complete(
                &key,
                lease.token,
                &Stored::new(200),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
    }
}
