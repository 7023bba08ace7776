//! Store throughput: memory versus redb, one caller versus 32 concurrent callers.
//!
//! `cargo bench -p idem-redb --bench store`
//!
//! - `begin_complete`: claim a new key and store its outcome (two writes; on redb, two
//!   fsynced commits unless callers share them).
//! - `replay`: `begin` on a completed key (a read).

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use idem_core::testing::bench::{Driver, Op, seed};
use idem_core::{MemoryStore, Store};
use idem_redb::RedbStore;

fn stores(dir: &std::path::Path) -> Vec<(&'static str, Arc<dyn Store>)> {
    vec![
        ("memory", Arc::new(MemoryStore::new())),
        (
            "redb",
            Arc::new(RedbStore::open(dir.join("bench.redb")).expect("open redb")),
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
        runtime.block_on(seed(&**store));
    }
    let driver = Driver::new();

    for op in Op::ALL {
        let mut group = c.benchmark_group(op.name());
        group.throughput(Throughput::Elements(1));
        for (name, store) in &stores {
            for callers in [1u64, 32] {
                group.bench_function(format!("{name}/{callers}"), |b| {
                    b.to_async(&runtime)
                        .iter_custom(|iters| driver.time(op, store, callers, iters))
                });
            }
        }
        group.finish();
    }
}

criterion_group! {
    name = store;
    config = Criterion::default().measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(store);
