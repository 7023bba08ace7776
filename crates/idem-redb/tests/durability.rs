//! What `complete` acknowledged survives the process: a kill, a reopen, a restart; and a
//! redb file has one owner. The shared durability suite, against the redb store.

use idem_core::testing::durability::Durable;
use idem_redb::{OpenError, RedbStore};

fn redb() -> Durable<RedbStore, OpenError> {
    Durable {
        name: "redb",
        open: |path| RedbStore::open(path),
        is_already_open: |error| matches!(error, OpenError::AlreadyOpen { .. }),
    }
}

idem_core::durability_suite!(redb);
