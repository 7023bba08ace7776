//! Expired records leave the store by themselves, in bounded steps that let writes through.
//! The shared sweeping suite, against the fjall store.

use idem_core::testing::sweeping::Sweeping;
use idem_fjall::{FjallOptions, FjallStore};

fn fjall() -> Sweeping<FjallStore> {
    Sweeping {
        name: "fjall",
        open: |path, clock, sweep| {
            let options = FjallOptions {
                sweep_interval: sweep.interval,
                sweep_batch: sweep.batch,
                ..FjallOptions::default()
            };
            FjallStore::open_with(path, clock, options).expect("open store")
        },
        record_count: |store| store.record_count().expect("count records"),
    }
}

idem_core::sweeping_suite!(fjall);
