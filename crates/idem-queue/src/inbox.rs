//! The transactional inbox: a message's database effects and its "processed" mark commit
//! together, so they happen exactly once.
//!
//! The inbox is a table of processed message ids. [`Inbox::process`] opens a transaction,
//! inserts the message's id with `INSERT … ON CONFLICT DO NOTHING`, and only if that row
//! is new runs your handler **on the same transaction**; then commits. The id row and the
//! handler's writes commit together or not at all, so:
//!
//! - a redelivery after the commit (the process died between commit and ack, the ack was
//!   lost, the broker redelivered anyway) finds the id and runs nothing:
//!   [`InboxOutcome::Duplicate`];
//! - a crash or error before the commit rolls everything back, id included: the
//!   redelivery runs the handler as if for the first time;
//! - two consumers that receive the same message at once both insert; the second waits on
//!   the first's row lock and then sees a conflict (first committed) or proceeds (first
//!   rolled back). Exactly one transaction commits the effects.
//!
//! This is exactly-once for effects **in this database**. Side effects elsewhere (an
//! e-mail, an HTTP call) are not rolled back with the transaction; use a
//! [`Deduplicator`](crate::Deduplicator) or an outbox for those.
//!
//! Acknowledge the message only after `process` returns `Ok` (either variant); on `Err`
//! let the broker redeliver.
//!
//! Rows are kept until [`Inbox::cleanup`] removes those older than the retention you give
//! it, in bounded batches; like the deduplicator's, that retention must cover the longest
//! redelivery or replay horizon. [`Inbox::spawn_cleanup`] runs it in the background.
//!
//! ```no_run
//! use idem_queue::inbox::{Inbox, InboxOutcome};
//! use sqlx::postgres::PgPoolOptions;
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = PgPoolOptions::new().connect("postgres://postgres@127.0.0.1:5432/test").await?;
//! let inbox = Inbox::new(pool).with_scope("billing");
//! inbox.migrate().await?;
//!
//! let outcome = inbox
//!     .process("order-7", |tx| Box::pin(async move {
//!         sqlx::query("UPDATE accounts SET balance = balance - 100 WHERE id = 1")
//!             .execute(&mut *tx)
//!             .await?;
//!         Ok::<_, sqlx::Error>(())
//!     }))
//!     .await?;
//! match outcome {
//!     InboxOutcome::Processed(()) => println!("charged"),
//!     InboxOutcome::Duplicate => println!("already charged; ack again"),
//! }
//! # Ok(()) }
//! ```

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, PgPool};

/// The inbox table's default name.
pub const DEFAULT_TABLE: &str = "idem_inbox";

/// The default scope: one per consumer group or handler, so two handlers of one message
/// each run once.
pub const DEFAULT_SCOPE: &str = "default";

/// A table name that is not a plain (optionally schema-qualified) SQL identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid inbox table name {name:?}: use letters, digits and `_` (not first), at most 63 \
     characters, optionally `schema.table`"
)]
pub struct TableNameError {
    /// The rejected name.
    pub name: String,
}

/// What the inbox did with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboxOutcome<T> {
    /// The handler ran and its writes committed with the id; here is what it returned.
    Processed(T),
    /// The id was already processed: nothing ran, nothing was written.
    Duplicate,
}

/// Why processing failed; nothing was committed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InboxError<E> {
    /// The message id is empty.
    #[error("message id is empty")]
    EmptyId,
    /// The database failed.
    #[error("inbox database operation failed")]
    Database(#[source] sqlx::Error),
    /// The handler failed; the transaction was rolled back, id included.
    #[error("message handler failed; its transaction was rolled back")]
    Handler(#[source] E),
}

impl<E> From<sqlx::Error> for InboxError<E> {
    fn from(error: sqlx::Error) -> Self {
        Self::Database(error)
    }
}

#[derive(Debug)]
struct Statements {
    table: String,
    claim: String,
    exists: String,
    cleanup: String,
    create: Vec<String>,
}

impl Statements {
    fn new(table: &str) -> Result<Self, TableNameError> {
        let bad = || TableNameError {
            name: table.to_owned(),
        };
        let parts: Vec<&str> = table.split('.').collect();
        if parts.len() > 2 || !parts.iter().all(|part| is_identifier(part)) {
            return Err(bad());
        }
        let quoted = parts
            .iter()
            .map(|part| format!("\"{part}\""))
            .collect::<Vec<_>>()
            .join(".");
        let bare = parts[parts.len() - 1];
        let index = format!("\"{}_processed_at_idx\"", truncate(bare, 63 - 17));
        Ok(Self {
            table: table.to_owned(),
            claim: format!(
                "INSERT INTO {quoted} (scope, message_id) VALUES ($1, $2) \
                 ON CONFLICT (scope, message_id) DO NOTHING"
            ),
            exists: format!(
                "SELECT EXISTS (SELECT 1 FROM {quoted} WHERE scope = $1 AND message_id = $2)"
            ),
            cleanup: format!(
                "DELETE FROM {quoted} WHERE ctid = ANY(ARRAY(\
                   SELECT ctid FROM {quoted} \
                   WHERE processed_at < now() - make_interval(secs => $1) \
                   LIMIT $2 FOR UPDATE SKIP LOCKED))"
            ),
            create: vec![
                format!(
                    "CREATE TABLE IF NOT EXISTS {quoted} (\
                       scope text NOT NULL, \
                       message_id text NOT NULL, \
                       processed_at timestamptz NOT NULL DEFAULT now(), \
                       PRIMARY KEY (scope, message_id))"
                ),
                format!("CREATE INDEX IF NOT EXISTS {index} ON {quoted} (processed_at)"),
            ],
        })
    }
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 63
}

fn truncate(text: &str, max: usize) -> &str {
    &text[..text.len().min(max)]
}

/// A transactional inbox over one table. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct Inbox {
    pool: PgPool,
    scope: Arc<str>,
    sql: Arc<Statements>,
}

impl Inbox {
    /// An inbox in table [`DEFAULT_TABLE`], scope [`DEFAULT_SCOPE`].
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            scope: DEFAULT_SCOPE.into(),
            // The default name is a valid identifier.
            sql: Arc::new(Statements::new(DEFAULT_TABLE).unwrap_or_else(|_| unreachable!())),
        }
    }

    /// The same inbox in table `table` (`name` or `schema.name`).
    ///
    /// ```
    /// # fn pool() -> sqlx::PgPool { unimplemented!() }
    /// # fn main() {
    /// # if false {
    /// use idem_queue::inbox::Inbox;
    ///
    /// let inbox = Inbox::new(pool()).with_table("billing.processed_messages").unwrap();
    /// assert!(Inbox::new(pool()).with_table("x; DROP TABLE y").is_err());
    /// # let _ = inbox;
    /// # }
    /// # }
    /// ```
    pub fn with_table(mut self, table: &str) -> Result<Self, TableNameError> {
        self.sql = Arc::new(Statements::new(table)?);
        Ok(self)
    }

    /// The same inbox under another scope: ids are unique per scope.
    pub fn with_scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = scope.into().into();
        self
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.sql.table
    }

    /// The scope.
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// Creates the table and its index if they do not exist. Safe to run from many
    /// processes at once (it takes a transaction-scoped advisory lock).
    pub async fn migrate(&self) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let lock = i64::from_le_bytes(
            blake3::hash(format!("idem-queue inbox {}", self.sql.table).as_bytes()).as_bytes()[..8]
                .try_into()
                .unwrap_or_default(),
        );
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(lock)
            .execute(&mut *tx)
            .await?;
        for statement in &self.sql.create {
            sqlx::query(AssertSqlSafe(statement.clone()))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await
    }

    /// Marks `message_id` processed on `conn` (inside the caller's transaction) and says
    /// whether it was new. When it was not, the caller must not apply the message's
    /// effects; when it was, they must commit on the same transaction.
    ///
    /// If another transaction inserted the same id and has not ended, this waits for it.
    pub async fn claim(
        &self,
        conn: &mut PgConnection,
        message_id: &str,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(AssertSqlSafe(self.sql.claim.clone()))
            .bind(&*self.scope)
            .bind(message_id)
            .execute(conn)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Whether `message_id` is recorded as processed (committed).
    pub async fn is_processed(&self, message_id: &str) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(AssertSqlSafe(self.sql.exists.clone()))
            .bind(&*self.scope)
            .bind(message_id)
            .fetch_one(&self.pool)
            .await
    }

    /// Processes `message_id` in a new transaction: claims it, runs `handler` on the same
    /// transaction, commits. See the [module docs](self).
    pub async fn process<F, T, E>(
        &self,
        message_id: &str,
        handler: F,
    ) -> Result<InboxOutcome<T>, InboxError<E>>
    where
        F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<T, E>>,
    {
        let mut tx = self.pool.begin().await?;
        match self.process_in(&mut tx, message_id, handler).await? {
            InboxOutcome::Processed(value) => {
                tx.commit().await?;
                Ok(InboxOutcome::Processed(value))
            }
            InboxOutcome::Duplicate => {
                tx.rollback().await?;
                Ok(InboxOutcome::Duplicate)
            }
        }
    }

    /// Processes `message_id` inside the caller's own transaction `conn`: claims it and, if
    /// new, runs `handler` on it. The caller commits (effects and claim together) or, on
    /// any error, rolls back.
    ///
    /// ```no_run
    /// use idem_queue::inbox::{Inbox, InboxOutcome};
    ///
    /// # async fn f(inbox: Inbox) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut tx = inbox.pool().begin().await?;
    /// sqlx::query("INSERT INTO audit (what) VALUES ('received')").execute(&mut *tx).await?;
    /// let outcome = inbox
    ///     .process_in(&mut tx, "order-7", |tx| Box::pin(async move {
    ///         sqlx::query("INSERT INTO shipments (order_id) VALUES (7)").execute(&mut *tx).await?;
    ///         Ok::<_, sqlx::Error>(())
    ///     }))
    ///     .await?;
    /// tx.commit().await?;
    /// # let _ = outcome; Ok(()) }
    /// ```
    pub async fn process_in<F, T, E>(
        &self,
        conn: &mut PgConnection,
        message_id: &str,
        handler: F,
    ) -> Result<InboxOutcome<T>, InboxError<E>>
    where
        F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<T, E>>,
    {
        if message_id.is_empty() {
            return Err(InboxError::EmptyId);
        }
        if !self.claim(conn, message_id).await? {
            return Ok(InboxOutcome::Duplicate);
        }
        handler(conn)
            .await
            .map(InboxOutcome::Processed)
            .map_err(InboxError::Handler)
    }

    /// Deletes up to `batch` rows (of any scope) processed more than `retention` ago;
    /// returns how many. Rows locked by running transactions are skipped, so cleanup never
    /// waits on consumers.
    pub async fn cleanup(&self, retention: Duration, batch: u32) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(AssertSqlSafe(self.sql.cleanup.clone()))
            .bind(retention.as_secs_f64())
            .bind(i64::from(batch))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Runs [`Inbox::cleanup`] every `every` in batches of `batch` until the backlog is
    /// gone, in the background, until the handle is aborted.
    pub fn spawn_cleanup(
        &self,
        every: Duration,
        retention: Duration,
        batch: u32,
    ) -> tokio::task::JoinHandle<()> {
        let inbox = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                loop {
                    match inbox.cleanup(retention, batch).await {
                        Ok(removed) if removed >= u64::from(batch) => {
                            tokio::task::yield_now().await
                        }
                        Ok(_) => break,
                        Err(error) => {
                            let error: &dyn StdError = &error;
                            tracing::warn!(error, table = inbox.table(), "inbox cleanup failed");
                            break;
                        }
                    }
                }
            }
        })
    }
}
