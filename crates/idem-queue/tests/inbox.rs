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
    for good in ["inbox", "_x1", "app.inbox_2", &"t".repeat(63)] {
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
        &"t".repeat(64),
    ] {
        assert!(inbox.clone().with_table(bad).is_err(), "{bad}");
    }
}
