//! An unreachable, silent or wrong database, and a statement stuck on a lock: every call
//! returns `StoreError::Backend` with sqlx's error as its source, within the configured
//! timeouts. No panic, no hang.

mod common;

use std::error::Error as _;
use std::time::{Duration, Instant};

use idem_core::{Fingerprint, Key, Scope, ScopedKey, Store, StoreError, Stored, Token};
use idem_postgres::sqlx::{self, Connection, PgConnection};
use idem_postgres::{ConnectError, PostgresOptions, PostgresStore};

use common::{SchemaGuard, database_url};

fn key() -> ScopedKey {
    ScopedKey::new(Scope::new("failures"), Key::new("k").unwrap())
}

fn fingerprint() -> Fingerprint {
    Fingerprint::builder().part("body", b"x").finish()
}

fn quick() -> PostgresOptions {
    PostgresOptions::new().acquire_timeout(Duration::from_secs(1))
}

/// The sqlx error behind a backend failure of `operation`.
fn backend_source<T: std::fmt::Debug>(
    result: Result<T, StoreError>,
    operation: &str,
) -> sqlx::Error {
    match result {
        Err(StoreError::Backend {
            operation: op,
            source,
        }) => {
            assert_eq!(op, operation);
            *source
                .downcast::<sqlx::Error>()
                .expect("the source is sqlx's error, kept whole")
        }
        other => panic!("{operation} should fail with Backend, got {other:?}"),
    }
}

async fn every_call_fails_as_backend(store: &PostgresStore, within: Duration) {
    let started = Instant::now();
    let k = key();
    backend_source(
        store
            .begin(&k, &fingerprint(), Duration::from_secs(5))
            .await,
        "begin",
    );
    backend_source(
        store
            .complete(&k, Token::new(1), &Stored::new(200), Duration::from_secs(5))
            .await,
        "complete",
    );
    backend_source(store.release(&k, Token::new(1)).await, "release");
    backend_source(
        store.renew(&k, Token::new(1), Duration::from_secs(5)).await,
        "renew",
    );
    backend_source(store.get(&k).await, "get");
    backend_source(store.delete(&k).await, "delete");
    backend_source(store.sweep(10).await, "sweep");
    assert!(
        started.elapsed() < within,
        "seven failing calls took {:?}",
        started.elapsed()
    );
}

fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
    // Dropped here: nothing listens on the port any more.
}

#[tokio::test]
async fn a_closed_port_fails_every_call_within_the_acquire_timeout() {
    let url = format!("postgres://postgres@127.0.0.1:{}/test", closed_port());
    let store = PostgresStore::connect_lazy_with(&url, &quick()).unwrap();
    let started = Instant::now();
    let error = backend_source(
        store
            .begin(&key(), &fingerprint(), Duration::from_secs(5))
            .await,
        "begin",
    );
    let took = started.elapsed();
    assert!(
        matches!(error, sqlx::Error::PoolTimedOut),
        "refused connections are retried until the acquire timeout: {error:?}"
    );
    assert!(took < Duration::from_secs(3), "took {took:?}");
    every_call_fails_as_backend(&store, Duration::from_secs(15)).await;

    match PostgresStore::connect_with(&url, &quick()).await {
        Err(ConnectError::Connect(_)) => {}
        other => panic!("connect to a closed port should fail, got {other:?}"),
    }
}

#[tokio::test]
async fn a_silent_server_fails_every_call_within_the_acquire_timeout() {
    // Accepts connections and never answers: the hang a firewall or a stuck server causes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let url = format!("postgres://postgres@127.0.0.1:{port}/test");
    let store = PostgresStore::connect_lazy_with(&url, &quick()).unwrap();
    let started = Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        store.begin(&key(), &fingerprint(), Duration::from_secs(5)),
    )
    .await
    .expect("begin must not hang");
    backend_source(result, "begin");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "took {took:?}");
    silent.abort();
}

#[tokio::test]
async fn a_missing_database_fails_every_call_at_once() {
    let mut url = database_url();
    let slash = url.rfind('/').unwrap();
    url.replace_range(slash + 1.., "idem_no_such_database");
    let store = PostgresStore::connect_lazy_with(&url, &quick()).unwrap();
    let error = backend_source(
        store
            .begin(&key(), &fingerprint(), Duration::from_secs(5))
            .await,
        "begin",
    );
    match &error {
        sqlx::Error::Database(db) => assert_eq!(db.code().as_deref(), Some("3D000")),
        other => panic!("expected 'database does not exist', got {other:?}"),
    }
    every_call_fails_as_backend(&store, Duration::from_secs(5)).await;
    // The whole chain reads well in a log line.
    let wrapped = StoreError::backend("begin", error);
    assert!(
        wrapped
            .source()
            .unwrap()
            .to_string()
            .contains("idem_no_such_database")
    );

    match PostgresStore::connect_with(&url, &quick()).await {
        Err(ConnectError::Connect(sqlx::Error::Database(_))) => {}
        other => panic!("connect to a missing database should fail, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_stuck_on_a_lock_ends_at_the_statement_timeout() {
    let guard = SchemaGuard::new();
    let table = guard.table("idem_records");
    let options = PostgresOptions::new()
        .table(&table)
        .statement_timeout(Some(Duration::from_millis(500)));
    let store = PostgresStore::connect_with(&database_url(), &options)
        .await
        .unwrap();
    store
        .begin(&key(), &fingerprint(), Duration::from_secs(30))
        .await
        .unwrap();
    // Another session holds the record's row lock and does not let go.
    let mut other = PgConnection::connect(&database_url()).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "BEGIN; SELECT * FROM {table} FOR UPDATE"
    )))
    .execute(&mut other)
    .await
    .unwrap();
    let started = Instant::now();
    let error = backend_source(
        store
            .begin(&key(), &fingerprint(), Duration::from_secs(30))
            .await,
        "begin",
    );
    let took = started.elapsed();
    match &error {
        // 57014: query_canceled (statement timeout).
        sqlx::Error::Database(db) => assert_eq!(db.code().as_deref(), Some("57014")),
        other => panic!("expected a statement timeout, got {other:?}"),
    }
    assert!(took < Duration::from_secs(3), "took {took:?}");
    sqlx::raw_sql("ROLLBACK").execute(&mut other).await.unwrap();
    other.close().await.unwrap();
    store.close().await;
}

#[tokio::test]
async fn bad_configuration_is_refused_before_connecting() {
    let url = format!("postgres://postgres@127.0.0.1:{}/test", closed_port());
    for bad in ["Records", "a.b.c", "x; DROP TABLE y", ""] {
        match PostgresStore::connect_lazy_with(&url, &quick().table(bad)) {
            Err(ConnectError::InvalidTable { name, .. }) => assert_eq!(name, bad),
            other => panic!("table {bad:?} should be refused, got {other:?}"),
        }
        assert!(quick().table(bad).migration_script().is_err());
    }
    match PostgresStore::connect_lazy_with("mysql://nope", &quick()) {
        Err(ConnectError::InvalidUrl(_)) => {}
        other => panic!("a non-Postgres URL should be refused, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_timeouts_are_capped_rather_than_overflowing() {
    let guard = SchemaGuard::new();
    let options = PostgresOptions::new()
        .table(guard.table("idem_records"))
        .acquire_timeout(Duration::MAX)
        .statement_timeout(Some(Duration::MAX));
    let store = PostgresStore::connect_with(&database_url(), &options)
        .await
        .expect("huge timeouts are capped, not a panic nor a refused session");
    let timeout: String = sqlx::query_scalar("SELECT current_setting('statement_timeout')")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(
        timeout,
        format!("{}ms", idem_postgres::MAX_TIMEOUT.as_millis())
    );
    store
        .begin(&key(), &fingerprint(), Duration::from_secs(60))
        .await
        .expect("the store serves");
}
