//! The transactional inbox against a real Postgres (`DATABASE_URL`); one table per test.
#![cfg(feature = "postgres")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use idem_queue::inbox::{Inbox, InboxError, InboxOutcome};
use idem_queue::sqlx::{self, AssertSqlSafe};

use common::{Cleanup, Effects, database_url, drop_tables_on_drop, pg_pool, suffix};

async fn inbox(name: &str) -> (Inbox, Arc<Effects>, Cleanup) {
    let table = format!("idemq_inbox_{name}");
    let guard = drop_tables_on_drop(vec![table.clone(), format!("idemq_effects_{name}")]);
    let pool = pg_pool().await;
    let effects = Arc::new(Effects::create(&pool, name).await);
    let inbox = Inbox::new(pool).with_table(&table).unwrap();
    inbox.migrate().await.unwrap();
    (inbox, effects, guard)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_deliveries_commit_the_effects_once() {
    let name = suffix();
    let (inbox, effects, _guard) = inbox(&name).await;
    for round in 0..5 {
        let id = format!("hot-{round}");
        let tasks: Vec<_> = (0..12)
            .map(|_| {
                let (inbox, effects, id) = (inbox.clone(), Arc::clone(&effects), id.clone());
                tokio::spawn(async move {
                    inbox
                        .process(&id.clone(), |tx| {
                            Box::pin(async move {
                                effects.record(&mut *tx, &id, "t").await?;
                                // Hold the transaction open so the others really wait on it.
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                Ok::<_, sqlx::Error>(())
                            })
                        })
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut processed = 0;
        for task in tasks {
            if task.await.unwrap() == InboxOutcome::Processed(()) {
                processed += 1;
            }
        }
        assert_eq!(processed, 1, "round {round}");
    }
    assert_eq!(effects.counts().await, (5, 5, 0));
}

#[tokio::test]
async fn a_failed_handler_rolls_back_its_claim_and_effects() {
    let name = suffix();
    let (inbox, effects, _guard) = inbox(&name).await;
    let outcome = inbox
        .process("m", |tx| {
            let effects = Arc::clone(&effects);
            Box::pin(async move {
                effects.record(&mut *tx, "m", "first").await?;
                Err::<(), _>(sqlx::Error::Protocol("the handler gave up".into()))
            })
        })
        .await;
    assert!(matches!(outcome, Err(InboxError::Handler(_))));
    assert!(!inbox.is_processed("m").await.unwrap());
    assert_eq!(effects.counts().await.0, 0, "the effect rolled back too");

    let outcome = inbox
        .process("m", |tx| {
            let effects = Arc::clone(&effects);
            Box::pin(async move {
                effects.record(&mut *tx, "m", "second").await?;
                Ok::<_, sqlx::Error>(7)
            })
        })
        .await
        .unwrap();
    assert_eq!(outcome, InboxOutcome::Processed(7));
    assert!(inbox.is_processed("m").await.unwrap());
    assert!(matches!(
        inbox
            .process("", |_| Box::pin(async { Ok::<_, sqlx::Error>(()) }))
            .await,
        Err(InboxError::EmptyId)
    ));
}

#[tokio::test]
async fn process_in_uses_the_callers_transaction() {
    let name = suffix();
    let (inbox, effects, _guard) = inbox(&name).await;
    async fn run(
        inbox: &Inbox,
        effects: &Arc<Effects>,
        tx: &mut sqlx::PgConnection,
    ) -> InboxOutcome<()> {
        let effects = Arc::clone(effects);
        inbox
            .process_in(tx, "m", |tx| {
                Box::pin(async move { effects.record(&mut *tx, "m", "in").await })
            })
            .await
            .unwrap()
    }

    // Rolled back by the caller: neither the effect nor the claim stays.
    let mut tx = inbox.pool().begin().await.unwrap();
    assert_eq!(
        run(&inbox, &effects, &mut tx).await,
        InboxOutcome::Processed(())
    );
    tx.rollback().await.unwrap();
    assert!(!inbox.is_processed("m").await.unwrap());
    assert_eq!(effects.counts().await.0, 0);

    // Committed by the caller: both stay, and a second pass is a duplicate.
    let mut tx = inbox.pool().begin().await.unwrap();
    assert_eq!(
        run(&inbox, &effects, &mut tx).await,
        InboxOutcome::Processed(())
    );
    tx.commit().await.unwrap();
    let mut tx = inbox.pool().begin().await.unwrap();
    assert_eq!(
        run(&inbox, &effects, &mut tx).await,
        InboxOutcome::Duplicate
    );
    tx.commit().await.unwrap();
    assert_eq!(effects.counts().await, (1, 1, 0));

    // Scopes are independent.
    let other = inbox.clone().with_scope("another-consumer");
    assert!(!other.is_processed("m").await.unwrap());
}

#[tokio::test]
async fn cleanup_removes_old_rows_in_bounded_batches() {
    let name = suffix();
    let (inbox, _effects, _guard) = inbox(&name).await;
    for n in 0..260 {
        inbox
            .process(&format!("m-{n}"), |_| {
                Box::pin(async { Ok::<_, sqlx::Error>(()) })
            })
            .await
            .unwrap();
    }
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {} SET processed_at = now() - interval '2 days' WHERE message_id <> ALL($1)",
        inbox.table()
    )))
    .bind(vec![
        "m-0", "m-1", "m-2", "m-3", "m-4", "m-5", "m-6", "m-7", "m-8", "m-9",
    ])
    .execute(inbox.pool())
    .await
    .unwrap();
    let day = Duration::from_secs(86_400);
    let mut batches = Vec::new();
    loop {
        let removed = inbox.cleanup(day, 100).await.unwrap();
        batches.push(removed);
        if removed < 100 {
            break;
        }
    }
    assert_eq!(batches, vec![100, 100, 50]);
    for n in 0..10 {
        assert!(inbox.is_processed(&format!("m-{n}")).await.unwrap());
    }
    assert!(!inbox.is_processed("m-10").await.unwrap());

    // The background task does the same.
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {} SET processed_at = now() - interval '2 days'",
        inbox.table()
    )))
    .execute(inbox.pool())
    .await
    .unwrap();
    let task = inbox.spawn_cleanup(Duration::from_millis(50), day, 3);
    let emptied = common::eventually(Duration::from_secs(5), || async {
        !inbox.is_processed("m-9").await.unwrap() && !inbox.is_processed("m-0").await.unwrap()
    })
    .await;
    task.abort();
    assert!(emptied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_is_idempotent_concurrent_and_schema_aware() {
    let name = suffix();
    let schema = format!("idemq_schema_{name}");
    let _guard = Cleanup::new({
        let schema = schema.clone();
        move || async move {
            use sqlx::Connection;
            if let Ok(mut conn) = sqlx::PgConnection::connect(&database_url()).await {
                let _ = sqlx::query(AssertSqlSafe(format!(
                    "DROP SCHEMA IF EXISTS {schema} CASCADE"
                )))
                .execute(&mut conn)
                .await;
            }
        }
    });
    let pool = pg_pool().await;
    sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&pool)
        .await
        .unwrap();
    let inbox = Inbox::new(pool)
        .with_table(&format!("{schema}.processed"))
        .unwrap();
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let inbox = inbox.clone();
            tokio::spawn(async move { inbox.migrate().await })
        })
        .collect();
    for run in runs {
        run.await.unwrap().unwrap();
    }
    inbox.migrate().await.unwrap();
    assert_eq!(
        inbox
            .process("x", |_| Box::pin(async { Ok::<_, sqlx::Error>(()) }))
            .await
            .unwrap(),
        InboxOutcome::Processed(())
    );
}

#[tokio::test]
async fn table_names_must_be_plain_identifiers() {
    let pool = sqlx::PgPool::connect_lazy(&database_url()).unwrap();
    let inbox = Inbox::new(pool);
    assert_eq!(inbox.table(), "idem_inbox");
    for good in ["inbox", "_x1", "app.inbox_2", &"t".repeat(48)] {
        assert!(inbox.clone().with_table(good).is_ok(), "{good}");
    }
    for bad in [
        "",
        "1abc",
        "a-b",
        "a.b.c",
        "x; DROP TABLE y",
        "\"quoted\"",
        ".x",
        // The Postgres store's rules: lowercase, no `pg_`, a table part of at most 48.
        "Inbox",
        "pg_inbox",
        &"t".repeat(49),
    ] {
        assert!(inbox.clone().with_table(bad).is_err(), "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_waits_for_the_running_handler_at_most_the_lock_timeout() {
    let name = suffix();
    let (inbox, effects, _guard) = inbox(&name).await;
    let inbox = inbox.with_lock_timeout(Some(Duration::from_millis(200)));
    assert_eq!(inbox.lock_timeout(), Some(Duration::from_millis(200)));
    let (started, running) = tokio::sync::oneshot::channel();
    let first = tokio::spawn({
        let (inbox, effects) = (inbox.clone(), Arc::clone(&effects));
        async move {
            inbox
                .process("m", |tx| {
                    Box::pin(async move {
                        // The handler runs under the caller's lock timeout, not the claim's.
                        let own: String = sqlx::query_scalar("SHOW lock_timeout")
                            .fetch_one(&mut *tx)
                            .await?;
                        effects.record(&mut *tx, "m", "first").await?;
                        let _ = started.send(());
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        Ok::<_, sqlx::Error>(own)
                    })
                })
                .await
                .unwrap()
        }
    });
    running.await.unwrap();
    let began = std::time::Instant::now();
    let second = inbox
        .process("m", |_| {
            Box::pin(async { Ok::<_, sqlx::Error>("ran".to_owned()) })
        })
        .await;
    let waited = began.elapsed();
    assert!(
        matches!(second, Err(InboxError::InFlight)),
        "{second:?} after {waited:?}"
    );
    assert!(second.as_ref().unwrap_err().is_retryable());
    assert!(waited < Duration::from_millis(1_500), "waited {waited:?}");
    assert_eq!(
        first.await.unwrap(),
        InboxOutcome::Processed("0".to_owned()),
        "the handler saw the default lock_timeout"
    );
    // The redelivery after the first committed is a duplicate.
    let again = inbox
        .process("m", |_| {
            Box::pin(async { Ok::<_, sqlx::Error>(String::new()) })
        })
        .await
        .unwrap();
    assert_eq!(again, InboxOutcome::Duplicate);
    assert_eq!(effects.counts().await, (1, 1, 0));
}

#[tokio::test]
async fn a_caller_who_commits_after_a_handler_error_keeps_none_of_the_message() {
    let name = suffix();
    let (inbox, effects, _guard) = inbox(&name).await;

    // The handler wrote, then failed: the caller commits its own work anyway.
    let mut tx = inbox.pool().begin().await.unwrap();
    effects.record(&mut *tx, "audit-1", "caller").await.unwrap();
    let outcome = inbox
        .process_in(&mut tx, "m", |tx| {
            let effects = Arc::clone(&effects);
            Box::pin(async move {
                effects.record(&mut *tx, "m", "handler").await?;
                Err::<(), _>(sqlx::Error::Protocol("the handler gave up".into()))
            })
        })
        .await;
    assert!(matches!(outcome, Err(InboxError::Handler(_))));
    tx.commit().await.unwrap();
    assert!(
        !inbox.is_processed("m").await.unwrap(),
        "not processed without its effects"
    );
    assert_eq!(
        effects.counts().await,
        (1, 1, 0),
        "only the caller's own row"
    );

    // A handler whose statement failed (aborting the transaction): the caller's own
    // writes still commit, and the message is still unprocessed.
    let mut tx = inbox.pool().begin().await.unwrap();
    effects.record(&mut *tx, "audit-2", "caller").await.unwrap();
    let outcome = inbox
        .process_in(&mut tx, "m", |tx| {
            Box::pin(async move {
                sqlx::query("SELECT 1 / 0").execute(&mut *tx).await?;
                Ok::<_, sqlx::Error>(())
            })
        })
        .await;
    assert!(matches!(outcome, Err(InboxError::Handler(_))));
    effects.record(&mut *tx, "audit-3", "caller").await.unwrap();
    tx.commit().await.unwrap();
    assert!(!inbox.is_processed("m").await.unwrap());
    assert_eq!(effects.counts().await, (3, 3, 0));

    // And it runs on its redelivery.
    let outcome = inbox
        .process("m", |tx| {
            let effects = Arc::clone(&effects);
            Box::pin(async move { effects.record(&mut *tx, "m", "handler").await })
        })
        .await
        .unwrap();
    assert_eq!(outcome, InboxOutcome::Processed(()));
    assert_eq!(effects.counts().await, (4, 4, 0));
}

#[tokio::test]
async fn under_repeatable_read_an_id_committed_after_the_snapshot_is_a_duplicate() {
    let name = suffix();
    let (inbox, effects, _guard) = inbox(&name).await;
    let mut tx = inbox.pool().begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await
        .unwrap();
    effects.record(&mut *tx, "audit", "caller").await.unwrap(); // takes the snapshot

    // Another consumer processes the message and commits after that snapshot.
    inbox
        .process("m", |tx| {
            let effects = Arc::clone(&effects);
            Box::pin(async move { effects.record(&mut *tx, "m", "other").await })
        })
        .await
        .unwrap();

    let outcome = inbox
        .process_in(&mut tx, "m", |tx| {
            let effects = Arc::clone(&effects);
            Box::pin(async move { effects.record(&mut *tx, "m", "again").await })
        })
        .await;
    assert!(
        matches!(outcome, Ok(InboxOutcome::Duplicate)),
        "a duplicate, not a database error: {outcome:?}"
    );
    tx.commit().await.unwrap();
    assert_eq!(
        effects.counts().await,
        (2, 2, 0),
        "the caller's row and one effect"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_serialization_failure_at_commit_is_a_conflict_to_retry() {
    use idem_queue::sqlx::Executor;
    use idem_queue::sqlx::postgres::PgPoolOptions;

    let name = suffix();
    let (inbox, effects, _guard) = inbox(&name).await;
    let serializable = PgPoolOptions::new()
        .max_connections(4)
        .after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute("SET default_transaction_isolation = 'serializable'")
                    .await
                    .map(|_| ())
            })
        })
        .connect(&database_url())
        .await
        .unwrap();
    let inbox = Inbox::new(serializable).with_table(inbox.table()).unwrap();
    let count = format!(
        "SELECT count(*) FROM {} WHERE message_id = $1",
        effects.table
    );

    // Write skew: each handler reads what the other writes.
    let read = Arc::new(tokio::sync::Barrier::new(2));
    let written = Arc::new(tokio::sync::Barrier::new(2));
    let (first_done, first_committed) = tokio::sync::oneshot::channel::<()>();
    let run = |id: &'static str,
               reads: &'static str,
               writes: &'static str,
               wait: Option<tokio::sync::oneshot::Receiver<()>>| {
        let (inbox, effects, count) = (inbox.clone(), Arc::clone(&effects), count.clone());
        let (read, written) = (Arc::clone(&read), Arc::clone(&written));
        tokio::spawn(async move {
            inbox
                .process(id, |tx| {
                    Box::pin(async move {
                        let _: i64 = sqlx::query_scalar(AssertSqlSafe(count))
                            .bind(reads)
                            .fetch_one(&mut *tx)
                            .await?;
                        read.wait().await;
                        effects.record(&mut *tx, writes, id).await?;
                        written.wait().await;
                        if let Some(wait) = wait {
                            let _ = wait.await;
                        }
                        Ok::<_, sqlx::Error>(())
                    })
                })
                .await
        })
    };
    let first = run("a", "x", "y", None);
    let second = run("b", "y", "x", Some(first_committed));
    let first = first.await.unwrap();
    assert!(
        matches!(first, Ok(InboxOutcome::Processed(()))),
        "{first:?}"
    );
    first_done.send(()).unwrap();
    let second = second.await.unwrap();
    assert!(
        matches!(second, Err(InboxError::Conflict(_))),
        "a typed conflict: {second:?}"
    );
    assert!(second.unwrap_err().is_retryable());
    assert!(!inbox.is_processed("b").await.unwrap(), "nothing committed");
}
