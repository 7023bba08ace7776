//! Shared by the broker test binaries: unique names, Postgres effect tables, service URLs.
#![allow(dead_code)] // Each test binary uses its own part of this module.

use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use idem_queue::sqlx::postgres::PgPoolOptions;
use idem_queue::sqlx::{self, AssertSqlSafe, PgPool};

/// Postgres under test: `DATABASE_URL`, else the local default.
pub(crate) fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// NATS under test: `NATS_URL`, else the local default.
pub(crate) fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".to_owned())
}

/// RabbitMQ under test: `AMQP_URL`, else the local default.
pub(crate) fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// Redis under test: `REDIS_URL`, else the local default.
pub(crate) fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A random suffix no other test (or run) uses: lowercase hex.
pub(crate) fn suffix() -> String {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    hasher.write_u32(std::process::id());
    format!("{:012x}", hasher.finish() & 0xffff_ffff_ffff)
}

pub(crate) async fn pg_pool() -> PgPool {
    let url = database_url();
    PgPoolOptions::new()
        .max_connections(20)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&url)
        .await
        .unwrap_or_else(|error| panic!("cannot connect to Postgres at {url}: {error}"))
}

/// A table that records one row per effect, with no uniqueness: duplicates would show.
pub(crate) struct Effects {
    pub(crate) pool: PgPool,
    pub(crate) table: String,
}

impl Effects {
    pub(crate) async fn create(pool: &PgPool, name: &str) -> Self {
        let table = format!("idemq_effects_{name}");
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE {table} (message_id text NOT NULL, consumer text NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )))
        .execute(pool)
        .await
        .expect("create the effects table");
        Self {
            pool: pool.clone(),
            table,
        }
    }

    pub(crate) fn insert_sql(&self) -> String {
        format!(
            "INSERT INTO {} (message_id, consumer) VALUES ($1, $2)",
            self.table
        )
    }

    /// Records one effect on `executor`.
    pub(crate) async fn record<'e, E>(
        &self,
        executor: E,
        id: &str,
        consumer: &str,
    ) -> Result<(), sqlx::Error>
    where
        E: sqlx::Executor<'e, Database = sqlx::Postgres>,
    {
        sqlx::query(AssertSqlSafe(self.insert_sql()))
            .bind(id)
            .bind(consumer)
            .execute(executor)
            .await
            .map(|_| ())
    }

    /// (rows, distinct ids, ids with more than one row).
    pub(crate) async fn counts(&self) -> (i64, i64, i64) {
        sqlx::query_as(AssertSqlSafe(format!(
            "SELECT count(*), count(DISTINCT message_id), \
               (SELECT count(*) FROM (SELECT message_id FROM {t} GROUP BY message_id HAVING count(*) > 1) d) \
             FROM {t}",
            t = self.table
        )))
        .fetch_one(&self.pool)
        .await
        .expect("count effects")
    }

    pub(crate) async fn drop_table(&self) {
        sqlx::query(AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS {}",
            self.table
        )))
        .execute(&self.pool)
        .await
        .expect("drop the effects table");
    }
}

/// Drops an inbox table.
pub(crate) async fn drop_table(pool: &PgPool, table: &str) {
    sqlx::query(AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}")))
        .execute(pool)
        .await
        .expect("drop table");
}

/// Polls `done` every 100 ms until it holds or `limit` passes; says whether it held.
pub(crate) async fn eventually<F, Fut>(limit: Duration, mut done: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if done().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Deletes every Redis key starting with `prefix:`.
pub(crate) async fn delete_redis_prefix(prefix: &str) {
    use idem_redis::fred::interfaces::{ClientLike, KeysInterface};
    use idem_redis::fred::prelude::{Builder, Config};

    let Ok(config) = Config::from_url(&redis_url()) else {
        return;
    };
    let Ok(client) = Builder::from_config(config).build() else {
        return;
    };
    if client.init().await.is_err() {
        return;
    }
    let mut cursor = "0".to_owned();
    loop {
        let Ok((next, keys)): Result<(String, Vec<String>), _> = client
            .scan_page(cursor.clone(), format!("{prefix}:*"), Some(1000), None)
            .await
        else {
            break;
        };
        if !keys.is_empty() {
            let _ = client.del::<i64, _>(keys).await;
        }
        if next == "0" {
            break;
        }
        cursor = next;
    }
    let _ = client.quit().await;
}

/// Runs an async clean-up when dropped (also when the test panics), on a runtime of its own:
/// the closure must open its own connections.
pub(crate) struct Cleanup(
    Option<Box<dyn FnOnce() -> futures_util::future::BoxFuture<'static, ()> + Send>>,
);

impl Cleanup {
    pub(crate) fn new<F, Fut>(clean: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Self(Some(Box::new(move || Box::pin(clean()))))
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Some(clean) = self.0.take() else { return };
        let done = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("clean-up runtime");
            runtime.block_on(async {
                if tokio::time::timeout(Duration::from_secs(10), clean())
                    .await
                    .is_err()
                {
                    eprintln!("clean-up timed out");
                }
            });
        })
        .join();
        if done.is_err() {
            eprintln!("clean-up panicked");
        }
    }
}

/// Drops `tables` when dropped.
pub(crate) fn drop_tables_on_drop(tables: Vec<String>) -> Cleanup {
    Cleanup::new(move || async move {
        use sqlx::Connection;
        let Ok(mut conn) = sqlx::PgConnection::connect(&database_url()).await else {
            return;
        };
        for table in tables {
            let _ = sqlx::query(AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}")))
                .execute(&mut conn)
                .await;
        }
    })
}
