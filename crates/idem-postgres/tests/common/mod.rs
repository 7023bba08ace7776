//! Shared helpers: the database URL, and a fresh schema per test that is dropped afterwards.

#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use idem_postgres::sqlx::{self, Connection, PgConnection};

/// `DATABASE_URL`, else the local test database.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A schema name no other test (in this run or a concurrent one) uses.
pub fn unique_schema() -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "idem_test_{}_{}_{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Drops its schema (and so every table, sequence and index in it) when dropped.
///
/// `Drop` cannot await, and it may run inside a Tokio runtime, so the cleanup runs on its
/// own thread with its own small runtime, and the drop waits for it.
#[derive(Debug)]
pub struct SchemaGuard {
    pub schema: String,
}

impl SchemaGuard {
    pub fn new() -> Self {
        Self {
            schema: unique_schema(),
        }
    }

    /// `schema.table` for a records table in this schema.
    pub fn table(&self, name: &str) -> String {
        format!("{}.{name}", self.schema)
    }
}

impl Drop for SchemaGuard {
    fn drop(&mut self) {
        let schema = self.schema.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let mut conn = PgConnection::connect(&database_url()).await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
                )))
                .execute(&mut conn)
                .await?;
                conn.close().await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
        });
        match cleanup.join() {
            Ok(Ok(())) => {}
            Ok(Err(error)) => eprintln!("could not drop test schema {}: {error}", self.schema),
            Err(_) => eprintln!("dropping test schema {} panicked", self.schema),
        }
    }
}
