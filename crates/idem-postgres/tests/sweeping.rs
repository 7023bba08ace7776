//! Expired records are deleted in bounded batches, by one sweeper at a time.

mod common;

use std::time::{Duration, Instant};

use idem_core::{Begin, Fingerprint, Key, Scope, ScopedKey, Store, Stored};
use idem_postgres::sqlx::{self, Connection, PgConnection};
use idem_postgres::{PostgresOptions, PostgresStore};

use common::{SchemaGuard, database_url};

fn key(i: usize) -> ScopedKey {
    ScopedKey::new(Scope::new("sweep"), Key::new(&format!("k-{i}")).unwrap())
}

fn fingerprint() -> Fingerprint {
    Fingerprint::builder().part("body", b"x").finish()
}

async fn store(guard: &SchemaGuard) -> PostgresStore {
    let options = PostgresOptions::new()
        .table(guard.table("idem_records"))
        .max_connections(4);
    PostgresStore::connect_with(&database_url(), &options)
        .await
        .expect("connect")
}

async fn rows(store: &PostgresStore) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {}",
        store.table()
    )))
    .fetch_one(store.pool())
    .await
    .unwrap()
}

/// `count` records that expire `lifetime` from now (roughly): odd ones in flight with that
/// lease, even ones completed with that retention.
async fn fill(store: &PostgresStore, from: usize, count: usize, lifetime: Duration) {
    for i in from..from + count {
        let lease = if i % 2 == 0 {
            Duration::from_secs(60)
        } else {
            lifetime
        };
        let Begin::Acquired(claim) = store.begin(&key(i), &fingerprint(), lease).await.unwrap()
        else {
            panic!("fresh key {i} not acquired")
        };
        if i % 2 == 0 {
            store
                .complete(&key(i), claim.token, &Stored::new(200), lifetime)
                .await
                .unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeps_are_bounded_and_spare_live_records() {
    let guard = SchemaGuard::new();
    let store = store(&guard).await;
    fill(&store, 0, 24, Duration::from_millis(100)).await;
    fill(&store, 1_000, 3, Duration::from_secs(3600)).await;
    // A released record expires at once.
    let Begin::Acquired(claim) = store
        .begin(&key(1_003), &fingerprint(), Duration::from_secs(3600))
        .await
        .unwrap()
    else {
        panic!("not acquired")
    };
    store.release(&key(1_003), claim.token).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rows(&store).await, 28);
    let mut steps = Vec::new();
    loop {
        let removed = store.sweep(10).await.unwrap();
        steps.push(removed);
        if removed == 0 {
            break;
        }
    }
    assert_eq!(steps, [10, 10, 5, 0]);
    assert_eq!(rows(&store).await, 3, "the live records stay");
    assert!(store.get(&key(1_001)).await.unwrap().is_some());
    assert_eq!(store.sweep(0).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_gives_way_while_another_holds_the_table() {
    let guard = SchemaGuard::new();
    let store = store(&guard).await;
    fill(&store, 0, 20, Duration::from_millis(50)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Another gateway's sweep, frozen mid-transaction: it holds the table's sweep lock.
    let mut other = PgConnection::connect(&database_url()).await.unwrap();
    sqlx::raw_sql("BEGIN").execute(&mut other).await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("idem-postgres sweep {}", store.table()))
        .execute(&mut other)
        .await
        .unwrap();
    let started = Instant::now();
    assert_eq!(
        store.sweep(100).await.unwrap(),
        0,
        "gives way, does not wait"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(rows(&store).await, 20);
    // Another table's sweep is not held up.
    let neighbour = SchemaGuard::new();
    let neighbour_store = self::store(&neighbour).await;
    fill(&neighbour_store, 0, 3, Duration::from_millis(10)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(neighbour_store.sweep(100).await.unwrap(), 3);

    sqlx::raw_sql("COMMIT").execute(&mut other).await.unwrap();
    assert_eq!(store.sweep(100).await.unwrap(), 20);
    other.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_two_concurrent_sweepers_one_works_and_one_returns_at_once() {
    let guard = SchemaGuard::new();
    let first = store(&guard).await;
    // A second gateway: its own pool, same table.
    let second = store(&guard).await;
    fill(&first, 0, 30, Duration::from_millis(50)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Make deleting slow (20 ms a row), so the first sweep is surely still running when the
    // second starts.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE FUNCTION {schema}.slow() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_sleep(0.02); RETURN OLD; END $$; \
         CREATE TRIGGER slow BEFORE DELETE ON {table} FOR EACH ROW EXECUTE FUNCTION {schema}.slow();",
        schema = guard.schema,
        table = first.table()
    )))
    .execute(first.pool())
    .await
    .unwrap();

    let working = {
        let first = first.clone();
        tokio::spawn(async move { first.sweep(20).await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    assert_eq!(second.sweep(20).await.unwrap(), 0);
    assert!(started.elapsed() < Duration::from_millis(200));
    assert!(
        !working.is_finished(),
        "the first sweep should still be at work"
    );
    assert_eq!(working.await.unwrap(), 20);
    assert_eq!(second.sweep(20).await.unwrap(), 10);
    assert_eq!(rows(&first).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_sweeper_empties_a_backlog_while_claims_go_on() {
    let guard = SchemaGuard::new();
    let store = store(&guard).await;
    fill(&store, 0, 1_000, Duration::from_millis(200)).await;
    fill(&store, 1_000_000, 1, Duration::from_secs(3600)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sweeper = store.spawn_sweeper(Duration::from_millis(20), 100);
    let mut fresh = 2_000_000;
    let deadline = Instant::now() + Duration::from_secs(20);
    while rows(&store).await > (fresh - 2_000_000) as i64 + 1 {
        assert!(
            Instant::now() < deadline,
            "the sweeper did not empty the backlog"
        );
        assert!(matches!(
            store
                .begin(&key(fresh), &fingerprint(), Duration::from_secs(3600))
                .await
                .unwrap(),
            Begin::Acquired(_)
        ));
        fresh += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sweeper.abort();
    assert!(store.get(&key(1_000_000)).await.unwrap().is_some());
}
