//! The store's own connections skip sqlx's ping on release, so they must be given back
//! only when sound: a call cancelled mid-flight, or a connection whose backend the server
//! killed, costs that connection and nothing more; the next call gets a sound one, with its
//! own answer.

mod common;

use std::time::{Duration, Instant};

use idem_core::{
    Begin, Fingerprint, Key, RecordState, Scope, ScopedKey, Store, StoreError, Stored,
};
use idem_postgres::sqlx::{self, Connection, PgConnection};
use idem_postgres::{PostgresOptions, PostgresStore};

use common::{SchemaGuard, database_url};

const LEASE: Duration = Duration::from_secs(60);

fn key(name: &str) -> ScopedKey {
    ScopedKey::new(Scope::new("connections"), Key::new(name).unwrap())
}

fn fingerprint(body: &str) -> Fingerprint {
    Fingerprint::builder()
        .part("body", body.as_bytes())
        .finish()
}

/// The test database's URL with an application name of its own, to find the store's
/// backends in `pg_stat_activity`.
fn named(application: &str) -> String {
    let url = database_url();
    let joint = if url.contains('?') { '&' } else { '?' };
    format!("{url}{joint}application_name={application}")
}

fn application(test: &str) -> String {
    format!("idem_{test}_{}", std::process::id())
}

/// The pids of the backends serving `application`.
async fn backends(monitor: &mut PgConnection, application: &str) -> Vec<i32> {
    sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE application_name = $1 ORDER BY pid")
        .bind(application)
        .fetch_all(monitor)
        .await
        .unwrap()
}

/// Waits (up to 10 s) until `application` has exactly `count` backends; returns them.
async fn await_backends(monitor: &mut PgConnection, application: &str, count: usize) -> Vec<i32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = backends(monitor, application).await;
        if pids.len() == count || Instant::now() > deadline {
            return pids;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn replays(answer: &Begin, body: &'static str) -> bool {
    matches!(answer, Begin::Completed { stored, .. }
        if stored.body.as_deref() == Some(body.as_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_cancelled_mid_flight_does_not_poison_the_next_one() {
    let guard = SchemaGuard::new();
    let table = guard.table("idem_records");
    let application = application("cancelled");
    let options = PostgresOptions::new()
        .table(&table)
        .max_connections(1)
        .min_connections(1);
    let store = PostgresStore::connect_with(&named(&application), &options)
        .await
        .unwrap();
    // Two records, so that an answer read off the wrong statement would show.
    let Begin::Acquired(a) = store
        .begin(&key("a"), &fingerprint("a"), LEASE)
        .await
        .unwrap()
    else {
        panic!("a not acquired")
    };
    store
        .complete(&key("a"), a.token, &Stored::new(201).with_body("a"), LEASE)
        .await
        .unwrap();
    let Begin::Acquired(b) = store
        .begin(&key("b"), &fingerprint("b"), LEASE)
        .await
        .unwrap()
    else {
        panic!("b not acquired")
    };

    // Another session holds b's row lock, so a begin of b waits on the server.
    let mut other = PgConnection::connect(&database_url()).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "BEGIN; SELECT * FROM {table} WHERE key = 'b' FOR UPDATE"
    )))
    .execute(&mut other)
    .await
    .unwrap();
    let cancelled = tokio::time::timeout(
        Duration::from_millis(300),
        store.begin(&key("b"), &fingerprint("b"), LEASE),
    )
    .await;
    assert!(cancelled.is_err(), "the begin of b waits on the lock");

    // The one-connection pool serves the next call at once, while the abandoned statement
    // still waits on the server: its connection was dropped, not handed on.
    let started = Instant::now();
    let replay = tokio::time::timeout(
        Duration::from_secs(5),
        store.begin(&key("a"), &fingerprint("a"), LEASE),
    )
    .await
    .expect("the next call does not wait for the cancelled one")
    .unwrap();
    assert!(replays(&replay, "a"), "a's own answer: {replay:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );

    // Once the lock is gone the abandoned statement ends, its answer unread, and its
    // backend with it: the pool holds one connection.
    sqlx::raw_sql("ROLLBACK").execute(&mut other).await.unwrap();
    let mut monitor = PgConnection::connect(&database_url()).await.unwrap();
    assert_eq!(
        await_backends(&mut monitor, &application, 1).await.len(),
        1,
        "the cancelled call's connection was closed"
    );
    for _ in 0..10 {
        let replay = store
            .begin(&key("a"), &fingerprint("a"), LEASE)
            .await
            .unwrap();
        assert!(replays(&replay, "a"), "a's own answer: {replay:?}");
        let record = store.get(&key("b")).await.unwrap().expect("b is in flight");
        assert_eq!(record.token, b.token);
        assert_eq!(record.fingerprint, fingerprint("b"));
        assert!(matches!(record.state, RecordState::InFlight { .. }));
    }
    other.close().await.unwrap();
    monitor.close().await.unwrap();
    store.close().await;
}

/// Without a ping before use, the call that meets a killed backend fails (nothing can tell
/// beforehand); the connection is then closed, not reused, and the next call is served by a
/// new backend. With `ping_idle_after(Some(ZERO))` the ping finds the dead connection first
/// and no call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backend_is_replaced_not_reused() {
    let guard = SchemaGuard::new();
    let mut monitor = PgConnection::connect(&database_url()).await.unwrap();
    for (n, ping) in [None, Some(Duration::ZERO)].into_iter().enumerate() {
        let application = application(&format!("killed_{n}"));
        let options = PostgresOptions::new()
            .table(guard.table("idem_records"))
            .max_connections(1)
            .min_connections(1)
            .ping_idle_after(ping);
        let store = PostgresStore::connect_with(&named(&application), &options)
            .await
            .unwrap();
        store.get(&key("k")).await.unwrap();
        let killed = backends(&mut monitor, &application).await;
        assert_eq!(killed.len(), 1);
        let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(killed[0])
            .fetch_one(&mut monitor)
            .await
            .unwrap();
        assert!(terminated);
        assert!(
            await_backends(&mut monitor, &application, 0)
                .await
                .is_empty()
        );

        let first = store.get(&key("k")).await;
        match ping {
            None => assert!(
                matches!(first, Err(StoreError::Backend { .. })),
                "the dead connection fails one call: {first:?}"
            ),
            Some(_) => assert!(first.is_ok(), "the ping found it dead first: {first:?}"),
        }
        for _ in 0..3 {
            store
                .get(&key("k"))
                .await
                .expect("a new connection serves the next calls");
        }
        let now = backends(&mut monitor, &application).await;
        assert_eq!(now.len(), 1, "one connection: {now:?}");
        assert_ne!(now, killed, "a new backend");
        store.close().await;
    }
    monitor.close().await.unwrap();
}
