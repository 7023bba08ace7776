//! Expired records leave the file by themselves, in bounded steps that let writes through.
//! The shared sweeping suite, against the redb store.

use idem_core::testing::sweeping::Sweeping;
use idem_redb::{RedbOptions, RedbStore};

fn redb() -> Sweeping<RedbStore> {
    Sweeping {
        name: "redb",
        open: |path, clock, sweep| {
            let options = RedbOptions {
                sweep_interval: sweep.interval,
                sweep_batch: sweep.batch,
                ..RedbOptions::default()
            };
            RedbStore::open_with(path, clock, options).expect("open store")
        },
        record_count: |store| store.record_count().expect("count records"),
    }
}

idem_core::sweeping_suite!(redb);
