//! The conformance suite and the model test against the memory store.

use idem_core::testing::{Subject, TimeTravel};
use idem_core::{ManualClock, MemoryStore};

async fn memory() -> Subject<MemoryStore> {
    let clock = ManualClock::new();
    Subject::new(
        MemoryStore::with_clock(clock.clone()),
        TimeTravel::Manual(clock),
    )
}

idem_core::conformance_suite!(memory);

#[test]
fn memory_store_follows_the_model() {
    idem_core::testing::model::check(MemoryStore::with_clock);
}
