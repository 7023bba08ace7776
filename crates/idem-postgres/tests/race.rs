//! Real races beyond the suite's: 64 tasks over 16 connections, so many `begin`s are truly
//! concurrent transactions on the server, on new keys, on expired keys (with sweeps running
//! alongside) and against a concurrent `release`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use idem_core::{Begin, Fingerprint, Key, Scope, ScopedKey, Store, Token};
use idem_postgres::{PostgresOptions, PostgresStore};
use tokio::sync::Barrier;

use common::{SchemaGuard, database_url};

const TASKS: usize = 64;
const CONNECTIONS: u32 = 16;

fn key(name: &str) -> ScopedKey {
    ScopedKey::new(Scope::new("race"), Key::new(name).unwrap())
}

fn fingerprint() -> Fingerprint {
    Fingerprint::builder().part("body", b"race").finish()
}

async fn store(guard: &SchemaGuard) -> Arc<PostgresStore> {
    let options = PostgresOptions::new()
        .table(guard.table("idem_records"))
        .max_connections(CONNECTIONS)
        .min_connections(CONNECTIONS);
    let store = PostgresStore::connect_with(&database_url(), &options)
        .await
        .expect("connect");
    // Open every connection and prepare `begin` on it, so the race is between statements.
    let mut warm = Vec::new();
    for i in 0..CONNECTIONS * 2 {
        let store = store.clone();
        warm.push(tokio::spawn(async move {
            store
                .begin(
                    &key(&format!("warm-{i}")),
                    &fingerprint(),
                    Duration::from_secs(1),
                )
                .await
                .unwrap()
        }));
    }
    for task in warm {
        task.await.unwrap();
    }
    Arc::new(store)
}

/// Races `TASKS` `begin`s of `key`, all released at once by a barrier.
async fn race(store: &Arc<PostgresStore>, key: &ScopedKey, lease: Duration) -> Vec<Begin> {
    let barrier = Arc::new(Barrier::new(TASKS));
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (store, key, barrier) = (store.clone(), key.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            store.begin(&key, &fingerprint(), lease).await
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(
            task.await
                .unwrap()
                .expect("begin must not fail under contention"),
        );
    }
    answers
}

fn acquired(answers: &[Begin]) -> Vec<Token> {
    answers
        .iter()
        .filter_map(|answer| match answer {
            Begin::Acquired(lease) => Some(lease.token),
            Begin::InFlight { retry_after } => {
                assert!(*retry_after > Duration::ZERO);
                None
            }
            other => panic!("a racing begin answered {other:?}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_keys_have_exactly_one_winner() {
    let guard = SchemaGuard::new();
    let store = store(&guard).await;
    for round in 0..20 {
        let answers = race(
            &store,
            &key(&format!("new-{round}")),
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(acquired(&answers).len(), 1, "round {round}: {answers:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_keys_are_taken_over_once_even_while_sweeping() {
    let guard = SchemaGuard::new();
    let store = store(&guard).await;
    let short = Duration::from_millis(50);
    let mut old = Vec::new();
    for round in 0..10 {
        let Begin::Acquired(lease) = store
            .begin(&key(&format!("old-{round}")), &fingerprint(), short)
            .await
            .unwrap()
        else {
            panic!("fresh key not acquired")
        };
        old.push(lease.token);
    }
    tokio::time::sleep(short * 3).await;
    // Sweeps delete the expired rows while the racers try to take them over.
    let sweeping = {
        let store = store.clone();
        tokio::spawn(async move {
            loop {
                store.sweep(3).await.unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    for (round, old) in old.into_iter().enumerate() {
        let answers = race(
            &store,
            &key(&format!("old-{round}")),
            Duration::from_secs(30),
        )
        .await;
        let winners = acquired(&answers);
        assert_eq!(winners.len(), 1, "round {round}: {answers:?}");
        assert!(
            winners[0] > old,
            "the taker-over must outrank the old holder"
        );
    }
    sweeping.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_release_lets_at_most_one_racer_in() {
    let guard = SchemaGuard::new();
    let store = store(&guard).await;
    for round in 0..10 {
        let key = key(&format!("released-{round}"));
        let Begin::Acquired(holder) = store
            .begin(&key, &fingerprint(), Duration::from_secs(30))
            .await
            .unwrap()
        else {
            panic!("fresh key not acquired")
        };
        let releasing = {
            let (store, key) = (store.clone(), key.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                store.release(&key, holder.token).await
            })
        };
        let answers = race(&store, &key, Duration::from_secs(30)).await;
        releasing.await.unwrap().expect("the holder's release");
        let mut winners = acquired(&answers);
        if winners.is_empty() {
            // Every racer came before the release; the key is free now.
            match store
                .begin(&key, &fingerprint(), Duration::from_secs(30))
                .await
                .unwrap()
            {
                Begin::Acquired(lease) => winners.push(lease.token),
                other => panic!("released key answered {other:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {answers:?}");
        assert!(winners[0] > holder.token);
    }
}

/// Under READ COMMITTED, a `begin` that waited on another session's uncommitted claim of
/// the key sees, once that commits, a live row it may not take over, but its snapshot
/// predates the row (or shows the released version before it): the statement returns no
/// row. The store must run it again and report the record, never answer wrongly or fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_committed_while_begin_waits_on_it_is_reported() {
    use idem_postgres::sqlx::{self, Connection, PgConnection};

    let guard = SchemaGuard::new();
    let options = PostgresOptions::new().table(guard.table("idem_records"));
    let store = Arc::new(
        PostgresStore::connect_with(&database_url(), &options)
            .await
            .unwrap(),
    );
    let table = store.table();
    let outcome = idem_core::Stored::new(201).with_body("done elsewhere");
    // (key, record the other session writes in its open transaction, what begin must say)
    type Case = (&'static str, &'static str, fn(&Begin) -> bool);
    let cases: [Case; 3] = [
        ("absent-then-in-flight", "in_flight", |answer| {
            matches!(answer, Begin::InFlight { .. })
        }),
        ("absent-then-completed", "completed", |answer| {
            matches!(answer, Begin::Completed { stored, .. }
                if stored.body.as_deref() == Some(&b"done elsewhere"[..]))
        }),
        ("released-then-in-flight", "in_flight", |answer| {
            matches!(answer, Begin::InFlight { .. })
        }),
    ];
    for (name, state, expected) in cases {
        let key = key(name);
        if name.starts_with("released") {
            let Begin::Acquired(lease) = store
                .begin(&key, &fingerprint(), Duration::from_secs(30))
                .await
                .unwrap()
            else {
                panic!("not acquired")
            };
            store.release(&key, lease.token).await.unwrap();
        }
        let mut other = PgConnection::connect(&database_url()).await.unwrap();
        sqlx::raw_sql("BEGIN").execute(&mut other).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {table} (id, scope, key, fingerprint, token, state, expires_at, outcome) \
             VALUES ($1, $2, $3, $4, nextval('{table}_token_seq'), $5, now() + interval '1 minute', $6) \
             ON CONFLICT (id) DO UPDATE SET token = excluded.token, state = excluded.state, \
             expires_at = excluded.expires_at, outcome = excluded.outcome"
        )))
        .bind(key.digest().as_slice())
        .bind(key.scope().as_str())
        .bind(key.key().as_str())
        .bind(fingerprint().as_bytes().as_slice())
        .bind(state)
        .bind((state == "completed").then(|| outcome.encode()))
        .execute(&mut other)
        .await
        .unwrap();
        let waiting = {
            let (store, key) = (store.clone(), key.clone());
            tokio::spawn(async move {
                store
                    .begin(&key, &fingerprint(), Duration::from_secs(30))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !waiting.is_finished(),
            "{name}: begin should wait on the row"
        );
        sqlx::raw_sql("COMMIT").execute(&mut other).await.unwrap();
        let answer = waiting.await.unwrap().expect("begin after the commit");
        assert!(expected(&answer), "{name}: got {answer:?}");
        other.close().await.unwrap();
    }
}

/// A `complete` whose first attempt is still committing (its answer lost to a client-side
/// deadline) is retried with the same token: the retry waits on the row, and once the first
/// commits it must answer the stored expiry, not `LeaseLost`, though its snapshot predates
/// that commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_complete_behind_its_committing_first_attempt_succeeds() {
    use idem_core::Stored;
    use idem_postgres::sqlx::{self, Connection, PgConnection};

    let guard = SchemaGuard::new();
    let store = store(&guard).await;
    let key = key("retried");
    let Begin::Acquired(lease) = store
        .begin(&key, &fingerprint(), Duration::from_secs(60))
        .await
        .unwrap()
    else {
        panic!("a new key is acquired")
    };
    // The first attempt: the store's own UPDATE, left uncommitted for a while.
    let mut first = PgConnection::connect(&database_url()).await.unwrap();
    let mut tx = first.begin().await.unwrap();
    let stored = Stored::new(201).with_body("first attempt");
    let expires_us: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "UPDATE {} SET state = 'completed', outcome = $1, \
         expires_at = now() + interval '60 seconds', kept_until = NULL \
         WHERE id = $2 AND token = $3 \
         RETURNING (extract(epoch FROM expires_at) * 1000000)::int8",
        store.table()
    )))
    .bind(stored.encode())
    .bind(key.digest().as_slice())
    .bind(i64::try_from(lease.token.get()).unwrap())
    .fetch_one(&mut *tx)
    .await
    .unwrap();

    let retry = {
        let (store, key, stored) = (Arc::clone(&store), key.clone(), stored.clone());
        tokio::spawn(async move {
            store
                .complete(&key, lease.token, &stored, Duration::from_secs(60))
                .await
        })
    };
    // Let the retry start and block on the row lock, then commit the first attempt.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !retry.is_finished(),
        "the retry waits for the first attempt"
    );
    tx.commit().await.unwrap();
    first.close().await.unwrap();

    let expires_at = retry
        .await
        .unwrap()
        .expect("the retry is answered, not lost");
    assert_eq!(
        idem_core::unix_millis(expires_at),
        u64::try_from(expires_us / 1000).unwrap()
    );
    match store
        .begin(&key, &fingerprint(), Duration::from_secs(60))
        .await
        .unwrap()
    {
        Begin::Completed {
            stored: replayed, ..
        } => assert_eq!(*replayed, stored),
        other => panic!("expected the first attempt's outcome, got {other:?}"),
    }
}
