//! Store throughput, side by side in one run: memory, redb and fjall, with 1, 32 and 64
//! concurrent callers. redb and fjall have the same durability: every write is synced
//! (`fsync` of redb's commit, `fdatasync` of fjall's journal) before its caller is answered.
//!
//! `cargo bench -p idem-fjall --bench store`
//!
//! - `begin_complete`: claim a new key and store its outcome (two writes; on redb and
//!   fjall, two synced groups unless callers share them).
//! - `replay`: `begin` on a completed key (a read).
//!
//! Stores are benchmarked one after another within each group, so a busy machine disturbs
//! them alike; compare ratios within one run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use idem_core::{Begin, Fingerprint, Key, MemoryStore, Scope, ScopedKey, Store, Stored};
use idem_fjall::FjallStore;
use idem_redb::RedbStore;

const LEASE: Duration = Duration::from_secs(60);
const RETAIN: Duration = Duration::from_secs(3600);
const REPLAY_KEYS: u64 = 1024;

fn key(i: u64) -> ScopedKey {
    ScopedKey::new(
        Scope::new("bench"),
        Key::new(&format!("key-{i}")).expect("valid key"),
    )
}

fn fingerprint() -> Fingerprint {
    Fingerprint::builder()
        .part("body", b"{\"cents\":100}")
        .finish()
}

fn outcome() -> Stored {
    Stored::new(201)
        .with_header("content-type", "application/json")
        .with_body(r#"{"id":"ch_1","status":"succeeded","cents":100}"#)
}

async fn begin_complete(store: &dyn Store, i: u64) {
    let Ok(Begin::Acquired(lease)) = store.begin(&key(i), &fingerprint(), LEASE).await else {
        panic!("new key {i} not acquired")
    };
    store
        .complete(&key(i), lease.token, &outcome(), RETAIN)
        .await
        .expect("complete");
}

async fn replay(store: &dyn Store, i: u64) {
    let Ok(Begin::Completed { .. }) = store
        .begin(&key(i % REPLAY_KEYS), &fingerprint(), LEASE)
        .await
    else {
        panic!("completed key not replayed")
    };
}

/// Runs `iters` operations split over `callers` concurrent tasks and times them.
async fn drive<F, Fut>(
    store: Arc<dyn Store>,
    callers: u64,
    iters: u64,
    next: &AtomicU64,
    op: F,
) -> Duration
where
    F: Fn(Arc<dyn Store>, u64) -> Fut + Copy + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let start = Instant::now();
    let first = next.fetch_add(iters, Ordering::Relaxed);
    let mut tasks = Vec::new();
    for caller in 0..callers {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let mut i = caller;
            while i < iters {
                op(Arc::clone(&store), first + i).await;
                i += callers;
            }
        }));
    }
    for task in tasks {
        task.await.expect("caller task");
    }
    start.elapsed()
}

fn stores(dir: &std::path::Path) -> Vec<(&'static str, Arc<dyn Store>)> {
    vec![
        ("memory", Arc::new(MemoryStore::new())),
        (
            "redb",
            Arc::new(RedbStore::open(dir.join("bench.redb")).expect("open redb")),
        ),
        (
            "fjall",
            Arc::new(FjallStore::open(dir.join("bench.fjall")).expect("open fjall")),
        ),
    ]
}

fn benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // On the project's disk, not a tmpfs, so fsync costs what it costs in production.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("bench directory");
    let stores = stores(dir.path());
    for (_, store) in &stores {
        runtime.block_on(async {
            for i in 0..REPLAY_KEYS {
                begin_complete(&**store, i).await;
            }
        });
    }
    let next = AtomicU64::new(REPLAY_KEYS);

    let mut group = c.benchmark_group("begin_complete");
    group.throughput(Throughput::Elements(1));
    for callers in [1u64, 32, 64] {
        for (name, store) in &stores {
            group.bench_function(format!("{name}/{callers}"), |b| {
                b.to_async(&runtime).iter_custom(|iters| {
                    drive(
                        Arc::clone(store),
                        callers,
                        iters,
                        &next,
                        |s, i| async move { begin_complete(&*s, i).await },
                    )
                })
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group("replay");
    group.throughput(Throughput::Elements(1));
    for callers in [1u64, 32, 64] {
        for (name, store) in &stores {
            group.bench_function(format!("{name}/{callers}"), |b| {
                b.to_async(&runtime).iter_custom(|iters| {
                    drive(
                        Arc::clone(store),
                        callers,
                        iters,
                        &next,
                        |s, i| async move { replay(&*s, i).await },
                    )
                })
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = store;
    config = Criterion::default().measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(store);
