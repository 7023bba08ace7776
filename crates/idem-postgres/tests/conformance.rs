//! The shared conformance suite, against a real Postgres (`DATABASE_URL`, else
//! `postgres://postgres@127.0.0.1:5432/test`). Each case gets its own schema, dropped after.

mod common;

use idem_core::testing::{Subject, TimeTravel};
use idem_postgres::{PostgresOptions, PostgresStore};

use common::{SchemaGuard, database_url};

async fn postgres() -> Subject<PostgresStore> {
    let guard = SchemaGuard::new();
    let options = PostgresOptions::new()
        .table(guard.table("idem_records"))
        .max_connections(8);
    let store = PostgresStore::connect_with(&database_url(), &options)
        .await
        .expect("connect to the test database");
    Subject::with_guard(store, TimeTravel::Real, guard)
}

idem_core::conformance_suite!(postgres);
