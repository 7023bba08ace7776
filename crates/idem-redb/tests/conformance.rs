//! The shared conformance suite and model test, against the redb store.

use std::sync::atomic::{AtomicUsize, Ordering};

use idem_core::ManualClock;
use idem_core::testing::{Subject, TimeTravel};
use idem_redb::{RedbOptions, RedbStore};

async fn redb() -> Subject<RedbStore> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let clock = ManualClock::new();
    let store = RedbStore::open_with(
        dir.path().join("conformance.redb"),
        clock.clone(),
        RedbOptions::default(),
    )
    .expect("open store");
    Subject::with_guard(store, TimeTravel::Manual(clock), dir)
}

idem_core::conformance_suite!(redb);

#[test]
fn redb_store_follows_the_model() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let cases = AtomicUsize::new(0);
    idem_core::testing::model::check(|clock| {
        let n = cases.fetch_add(1, Ordering::Relaxed);
        let path = dir.path().join(format!("model-{n}.redb"));
        RedbStore::open_with(path, clock, RedbOptions::default()).expect("open store")
    });
}
