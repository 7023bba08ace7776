//! What `complete` acknowledged survives the process: a kill, a reopen, a restart; and a
//! store directory has one owner. The shared durability suite, against the fjall store.

use idem_core::testing::durability::Durable;
use idem_fjall::{FjallStore, OpenError};

fn fjall() -> Durable<FjallStore, OpenError> {
    Durable {
        name: "fjall",
        open: |path| FjallStore::open(path),
        is_already_open: |error| matches!(error, OpenError::AlreadyOpen { .. }),
    }
}

idem_core::durability_suite!(fjall);
