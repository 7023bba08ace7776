//! The shared conformance suite and model test, against the fjall store.

use std::sync::atomic::{AtomicUsize, Ordering};

use idem_core::ManualClock;
use idem_core::testing::{Subject, TimeTravel};
use idem_fjall::{FjallOptions, FjallStore};

async fn fjall() -> Subject<FjallStore> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let clock = ManualClock::new();
    let store = FjallStore::open_with(
        dir.path().join("conformance"),
        clock.clone(),
        // Two shards: a key's shard is fixed, and listing and sweeping span shards.
        FjallOptions {
            shards: 2,
            ..FjallOptions::default()
        },
    )
    .expect("open store");
    Subject::with_guard(store, TimeTravel::Manual(clock), dir)
}

idem_core::conformance_suite!(fjall);

#[test]
fn fjall_store_follows_the_model() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let cases = AtomicUsize::new(0);
    idem_core::testing::model::check(|clock| {
        let n = cases.fetch_add(1, Ordering::Relaxed);
        let path = dir.path().join(format!("model-{n}"));
        // One shard: each case opens a store, and every shard is a database with threads.
        let options = FjallOptions {
            shards: 1,
            ..FjallOptions::default()
        };
        FjallStore::open_with(path, clock, options).expect("open store")
    });
}
