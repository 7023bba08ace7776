//! Migrations run at startup are idempotent and safe when many gateways start together;
//! users who run the script themselves can skip them.

mod common;

use std::time::Duration;

use idem_core::{Begin, Fingerprint, Key, Scope, ScopedKey, Store, Stored};
use idem_postgres::sqlx::{self, Connection, PgConnection};
use idem_postgres::{ConnectError, PostgresOptions, PostgresStore};

use common::{SchemaGuard, database_url};

fn key(name: &str) -> ScopedKey {
    ScopedKey::new(Scope::new("migrations"), Key::new(name).unwrap())
}

fn fingerprint() -> Fingerprint {
    Fingerprint::builder().part("body", b"x").finish()
}

async fn versions(store: &PostgresStore, schema: &str) -> Vec<(String, i32)> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT table_name, version FROM \"{schema}\".idem_schema_versions ORDER BY table_name"
    )))
    .fetch_all(store.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn connecting_twice_migrates_once_and_shares_the_records() {
    let guard = SchemaGuard::new();
    let options = PostgresOptions::new().table(guard.table("records"));
    let first = PostgresStore::connect_with(&database_url(), &options)
        .await
        .unwrap();
    let Begin::Acquired(lease) = first
        .begin(&key("a"), &fingerprint(), Duration::from_secs(60))
        .await
        .unwrap()
    else {
        panic!("not acquired")
    };
    let second = PostgresStore::connect_with(&database_url(), &options)
        .await
        .unwrap();
    assert_eq!(second.table(), guard.table("records"));
    let record = second.get(&key("a")).await.unwrap().expect("record kept");
    assert_eq!(record.token, lease.token);
    second.migrate().await.unwrap();
    // The store's sessions run at READ COMMITTED, under its statement timeout, and say who
    // they are.
    let (isolation, timeout, application): (String, String, String) = sqlx::query_as(
        "SELECT current_setting('default_transaction_isolation'), \
         current_setting('statement_timeout'), current_setting('application_name')",
    )
    .fetch_one(second.pool())
    .await
    .unwrap();
    assert_eq!(
        (isolation.as_str(), timeout.as_str(), application.as_str()),
        ("read committed", "10s", "idem-postgres")
    );
    assert_eq!(
        versions(&second, &guard.schema).await,
        [("records".to_owned(), 3)]
    );
}

#[tokio::test]
async fn a_version_1_table_is_upgraded_and_its_records_keep_working() {
    let guard = SchemaGuard::new();
    let options = PostgresOptions::new().table(guard.table("records"));
    let store = PostgresStore::connect_with(&database_url(), &options)
        .await
        .unwrap();
    let lease = Duration::from_secs(60);
    let Begin::Acquired(done) = store
        .begin(&key("done"), &fingerprint(), lease)
        .await
        .unwrap()
    else {
        panic!("not acquired")
    };
    let outcome = Stored::new(201).with_body("kept");
    store
        .complete(&key("done"), done.token, &outcome, lease)
        .await
        .unwrap();
    let Begin::Acquired(running) = store
        .begin(&key("running"), &fingerprint(), lease)
        .await
        .unwrap()
    else {
        panic!("not acquired")
    };
    store.close().await;
    // Back to what version 1 left: no kept_until column.
    let mut conn = PgConnection::connect(&database_url()).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE \"{schema}\".records DROP COLUMN kept_until;\n\
         UPDATE \"{schema}\".idem_schema_versions SET version = 1;",
        schema = guard.schema
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();

    let upgraded = PostgresStore::connect_with(&database_url(), &options)
        .await
        .unwrap();
    assert_eq!(
        versions(&upgraded, &guard.schema).await,
        [("records".to_owned(), 3)]
    );
    match upgraded
        .begin(&key("done"), &fingerprint(), lease)
        .await
        .unwrap()
    {
        Begin::Completed { stored, .. } => assert_eq!(*stored, outcome),
        other => panic!("expected a replay, got {other:?}"),
    }
    // A claim made before the upgrade (kept_until NULL) is still held and completes.
    assert!(matches!(
        upgraded
            .begin(&key("running"), &fingerprint(), lease)
            .await
            .unwrap(),
        Begin::InFlight { .. }
    ));
    upgraded
        .complete(&key("running"), running.token, &Stored::new(200), lease)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateways_starting_together_do_not_trip_over_each_other() {
    let guard = SchemaGuard::new();
    let options = PostgresOptions::new()
        .table(guard.table("records"))
        .max_connections(2);
    let mut starting = Vec::new();
    for _ in 0..6 {
        let options = options.clone();
        starting.push(tokio::spawn(async move {
            PostgresStore::connect_with(&database_url(), &options).await
        }));
    }
    let mut stores = Vec::new();
    for start in starting {
        stores.push(start.await.unwrap().expect("every gateway starts"));
    }
    // Two tables in one schema share its version table.
    let other = PostgresStore::connect_with(
        &database_url(),
        &PostgresOptions::new().table(guard.table("records_b")),
    )
    .await
    .unwrap();
    assert_eq!(
        versions(&other, &guard.schema).await,
        [("records".to_owned(), 3), ("records_b".to_owned(), 3)]
    );
}

#[tokio::test]
async fn skipping_migrations_needs_the_table_and_works_with_the_script() {
    let guard = SchemaGuard::new();
    let options = PostgresOptions::new()
        .table(guard.table("records"))
        .run_migrations(false);
    match PostgresStore::connect_with(&database_url(), &options).await {
        Err(ConnectError::MissingTable { table }) => assert_eq!(table, guard.table("records")),
        other => panic!("a missing table should be reported, got {other:?}"),
    }

    // The operator applies the script with their own tooling.
    let mut conn = PgConnection::connect(&database_url()).await.unwrap();
    let script = options.migration_script().unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(script.clone()))
        .execute(&mut conn)
        .await
        .unwrap();
    // Applying it twice is harmless.
    sqlx::raw_sql(sqlx::AssertSqlSafe(script))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();

    let store = PostgresStore::connect_with(&database_url(), &options)
        .await
        .expect("the table exists now");
    assert!(matches!(
        store
            .begin(&key("a"), &fingerprint(), Duration::from_secs(60))
            .await
            .unwrap(),
        Begin::Acquired(_)
    ));
    // A store that does run migrations finds the script's version and changes nothing.
    let migrating = PostgresStore::connect_with(&database_url(), &options.run_migrations(true))
        .await
        .unwrap();
    assert_eq!(
        versions(&migrating, &guard.schema).await,
        [("records".to_owned(), 3)]
    );
    assert!(migrating.get(&key("a")).await.unwrap().is_some());
}

#[tokio::test]
async fn the_default_table_lives_on_the_search_path() {
    let guard = SchemaGuard::new();
    // Create the schema, then point the session's search_path at it.
    let mut conn = PgConnection::connect(&database_url()).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE SCHEMA \"{}\"",
        guard.schema
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    let options: sqlx::postgres::PgConnectOptions = database_url().parse().unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options.options([("search_path", guard.schema.as_str())]))
        .await
        .unwrap();
    let store = PostgresStore::from_pool(pool, &PostgresOptions::new())
        .await
        .unwrap();
    assert_eq!(store.table(), idem_postgres::DEFAULT_TABLE);
    assert!(matches!(
        store
            .begin(&key("a"), &fingerprint(), Duration::from_secs(60))
            .await
            .unwrap(),
        Begin::Acquired(_)
    ));
    let found: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(format!("\"{}\".idem_records", guard.schema))
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert!(found, "the table was created in the search path's schema");
}
