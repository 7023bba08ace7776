//! New keys per second through one durable store, with what each one cost: CPU time of
//! the whole process and device cache flushes per `begin` + `complete`.
//!
//! ```text
//! cargo run --release -p idem-fjall --example throughput -- STORE CALLERS SECONDS [DIR]
//! ```
//!
//! STORE is `fjall` or `redb` (`SHARDS=N` in the environment sets fjall's shard count); DIR (default: a temporary directory under `target/`) must be
//! on the disk the store will use. Flushes are read from `/proc/diskstats` for the disk
//! holding DIR's file system and count every process's, so on a busy machine they are an
//! upper bound. Where the machine is shared, CPU per operation is the steadier number: the
//! rate is bounded by CPU per operation times operations when cores are scarce, and by
//! callers over sync latency when they are not.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use idem_core::SystemClock;
use idem_core::{Begin, Fingerprint, Key, Scope, ScopedKey, Store, Stored};
use idem_fjall::{FjallOptions, FjallStore};
use idem_redb::RedbStore;

const LEASE: Duration = Duration::from_secs(60);
const RETAIN: Duration = Duration::from_secs(3600);

/// User plus system CPU time of this process, from `/proc/self/stat`, in clock ticks
/// (normally 100 per second).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    field(11) + field(12)
}

/// Completed cache flushes of every disk, from `/proc/diskstats` (Linux 5.5 and later).
fn flushes() -> u64 {
    let stats = std::fs::read_to_string("/proc/diskstats").unwrap_or_default();
    stats
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let whole_disk = fields.get(2).is_some_and(|name| {
                !name.starts_with("loop")
                    && !name.chars().last().is_some_and(|c| c.is_ascii_digit())
            });
            whole_disk.then(|| fields.get(18).and_then(|f| f.parse::<u64>().ok()))?
        })
        .sum()
}

fn key(i: u64) -> ScopedKey {
    ScopedKey::new(
        Scope::new("throughput"),
        Key::new(&format!("key-{i}")).expect("valid key"),
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: throughput fjall|redb CALLERS SECONDS [DIR]";
    let (Some(kind), Some(callers), Some(seconds)) = (args.get(1), args.get(2), args.get(3)) else {
        return Err(usage.into());
    };
    let callers: u64 = callers.parse()?;
    let seconds: u64 = seconds.parse()?;
    let scratch;
    let dir = match args.get(4) {
        Some(dir) => std::path::PathBuf::from(dir),
        None => {
            let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target");
            scratch = tempfile::tempdir_in(target)?;
            scratch.path().to_owned()
        }
    };
    let store: Arc<dyn Store> = match kind.as_str() {
        "fjall" => {
            let mut options = FjallOptions::default();
            if let Ok(shards) = std::env::var("SHARDS") {
                options.shards = shards.parse()?;
            }
            let path = dir.join("throughput.fjall");
            Arc::new(FjallStore::open_with(path, SystemClock, options)?)
        }
        "redb" => Arc::new(RedbStore::open(dir.join("throughput.redb"))?),
        _ => return Err(usage.into()),
    };
    let fingerprint = Fingerprint::builder()
        .part("body", b"{\"cents\":100}")
        .finish();
    let outcome = Stored::new(201)
        .with_header("content-type", "application/json")
        .with_body(r#"{"id":"ch_1","status":"succeeded","cents":100}"#);
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (ticks, flushed, started) = (cpu_ticks(), flushes(), Instant::now());
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let (store, next, done, stop) = (store.clone(), next.clone(), done.clone(), stop.clone());
        let outcome = outcome.clone();
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let key = key(next.fetch_add(1, Ordering::Relaxed));
                let Ok(Begin::Acquired(lease)) = store.begin(&key, &fingerprint, LEASE).await
                else {
                    panic!("a new key was not acquired")
                };
                store
                    .complete(&key, lease.token, &outcome, RETAIN)
                    .await
                    .expect("complete");
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (ticks, flushed) = (cpu_ticks() - ticks, flushes() - flushed);
    let done = done.load(Ordering::Relaxed).max(1) as f64;
    println!(
        "{kind:<6} callers {callers:>3}: {:>8.0} begin+complete/s, {:>6.1} µs CPU each, \
         {:>5.2} device flushes each",
        done / elapsed,
        ticks as f64 * 10_000.0 / done,
        flushed as f64 / done,
    );
    Ok(())
}
