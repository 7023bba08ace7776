//! The conformance suite and the model test against the memory store.

use idem::testing::{Subject, TimeTravel};
use idem::{ManualClock, MemoryStore};

async fn memory() -> Subject<MemoryStore> {
    let clock = ManualClock::new();
    Subject::new(
        MemoryStore::with_clock(clock.clone()),
        TimeTravel::Manual(clock),
    )
}

idem::conformance_suite!(memory);

#[test]
fn memory_store_follows_the_model() {
    idem::testing::model::check(MemoryStore::with_clock);
}
