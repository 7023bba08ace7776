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
//!   rolled back). Exactly one transaction commits the effects. The wait is bounded by the
//!   [lock timeout](Inbox::with_lock_timeout) (default [`DEFAULT_LOCK_TIMEOUT`], 2 s): a
//!   duplicate that arrives while the first delivery's handler runs gives its pool
//!   connection back after that and fails with [`InboxError::InFlight`] (nothing done;
//!   redeliver it later) instead of holding the connection for as long as the handler runs.
//!
//! The claim and the handler run inside a **savepoint**: when the handler fails, the claim
//! and whatever the handler wrote are rolled back to it, so a caller of
//! [`Inbox::process_in`] who commits its own transaction anyway (it had other work in it)
//! does not mark the message processed without its effects; and a handler error that
//! aborted the transaction (a failed statement) leaves it usable again.
//!
//! **Isolation levels.** Under `REPEATABLE READ` or `SERIALIZABLE`, an id committed by a
//! concurrent transaction that your snapshot cannot see makes the claim fail with a
//! serialization failure (SQLSTATE `40001`). The inbox reads that as what it is, a
//! duplicate: it rolls back to its savepoint and returns [`InboxOutcome::Duplicate`] (your
//! transaction stays usable). A serialization failure or deadlock at
//! [`Inbox::process`]'s commit is [`InboxError::Conflict`]: nothing was committed; run
//! the message again (let the broker redeliver it). One raised by your handler's own
//! statements is your handler's error; [`is_serialization_failure`] recognises it.
//! [`InboxError::is_retryable`] says which errors a redelivery may cure.
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
use idem_postgres::{ConnectError, TableName};
use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, PgPool};

/// The inbox table's default name.
pub const DEFAULT_TABLE: &str = "idem_inbox";

/// The default scope: one per consumer group or handler, so two handlers of one message
/// each run once.
pub const DEFAULT_SCOPE: &str = "default";

/// A table name the Postgres store would refuse for its own table
/// ([`idem_postgres::TableName`]): `name` or `schema.name`, lowercase ASCII letters, digits
/// and `_`, not starting with a digit or `pg_`, the table part at most 48 characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid inbox table name {name:?}: {reason}")]
pub struct TableNameError {
    /// The rejected name.
    pub name: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// How long a claim waits for another transaction holding the same id
/// ([`Inbox::with_lock_timeout`]).
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest lock timeout Postgres takes (`lock_timeout` is an `int` of milliseconds).
const MAX_LOCK_TIMEOUT_MS: u64 = i32::MAX as u64;

/// The savepoint the claim and the handler run in.
const SAVEPOINT: &str = "SAVEPOINT idem_inbox";
const ROLLBACK_TO_SAVEPOINT: &str = "ROLLBACK TO SAVEPOINT idem_inbox";
const RELEASE_SAVEPOINT: &str = "RELEASE SAVEPOINT idem_inbox";

/// Whether `error` is a serialization failure (SQLSTATE `40001`) or a deadlock (`40P01`):
/// the transaction was aborted and running it again may succeed.
///
/// ```
/// assert!(!idem_queue::inbox::is_serialization_failure(&sqlx::Error::PoolTimedOut));
/// ```
pub fn is_serialization_failure(error: &sqlx::Error) -> bool {
    sqlstate(error).is_some_and(|code| code == "40001" || code == "40P01")
}

/// Whether `error` is a lock timeout (SQLSTATE `55P03`, `lock_not_available`).
fn is_lock_timeout(error: &sqlx::Error) -> bool {
    sqlstate(error).is_some_and(|code| code == "55P03")
}

fn sqlstate(error: &sqlx::Error) -> Option<String> {
    match error {
        sqlx::Error::Database(db) => db.code().map(|code| code.into_owned()),
        _ => None,
    }
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
    /// The handler failed; the claim and the handler's writes were rolled back (to the
    /// inbox's savepoint, or with the whole transaction in [`Inbox::process`]).
    #[error("message handler failed; its writes and the claim were rolled back")]
    Handler(#[source] E),
    /// Another transaction holds this id (its handler is running) and did not end within
    /// the [lock timeout](Inbox::with_lock_timeout). Nothing was done (and the caller's
    /// transaction is usable); redeliver the message later: it is then a duplicate, or new
    /// if the other transaction rolled back.
    #[error("the message is being processed by another transaction (lock timeout)")]
    InFlight,
    /// A serialization failure or deadlock (SQLSTATE `40001` / `40P01`) at commit: nothing
    /// was committed. Run the message again (let the broker redeliver it).
    #[error("the inbox transaction conflicted with a concurrent one; nothing was committed")]
    Conflict(#[source] sqlx::Error),
}

impl<E> InboxError<E> {
    /// Whether handling the message again may succeed: [`InboxError::InFlight`],
    /// [`InboxError::Conflict`], [`InboxError::Database`]. A handler error is the
    /// handler's to judge; an empty id never gets better.
    ///
    /// ```
    /// use idem_queue::inbox::InboxError;
    ///
    /// assert!(InboxError::<()>::InFlight.is_retryable());
    /// assert!(!InboxError::<()>::EmptyId.is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::InFlight | Self::Conflict(_) | Self::Database(_))
    }
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
        // The Postgres store's rules, so that one naming policy covers both tables.
        let name = TableName::parse(table).map_err(|error| TableNameError {
            name: table.to_owned(),
            reason: match error {
                ConnectError::InvalidTable { reason, .. } => reason,
                _ => "not a valid table name",
            },
        })?;
        let quoted = name.table();
        let index = format!("\"{}_processed_at_idx\"", truncate(name.name(), 63 - 17));
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

/// `timeout` as Postgres's `lock_timeout`: whole milliseconds, rounded up, at least 1 (0
/// would mean "no timeout") and at most Postgres's limit.
fn lock_timeout_ms(timeout: Duration) -> u64 {
    let ms = timeout.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms)
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_LOCK_TIMEOUT_MS)
}

fn truncate(text: &str, max: usize) -> &str {
    &text[..text.len().min(max)]
}

/// What to tell the broker about a message processed through the inbox, under `policy`:
/// how the consumer runners settle inbox-backed messages
/// ([`runner::jetstream::run_inbox`](crate::runner::jetstream::run_inbox),
/// [`runner::rabbitmq::run_inbox`](crate::runner::rabbitmq::run_inbox)), after the
/// transaction has committed or rolled back.
///
/// | result | settlement |
/// |---|---|
/// | processed (committed), duplicate | ack |
/// | [`InboxError::InFlight`] | defer by [`RetryPolicy::in_flight_delay`](crate::RetryPolicy::in_flight_delay) of the lock timeout |
/// | [`InboxError::Database`] | defer by [`RetryPolicy::backoff`](crate::RetryPolicy::backoff) |
/// | [`InboxError::Conflict`], a transient handler error | retry after the backoff; dead letter on the last delivery |
/// | a permanent handler error, [`InboxError::EmptyId`] | dead letter |
///
/// `attempt` is the broker's delivery number (the inbox counts no runs: JetStream's
/// `delivered`, RabbitMQ's `x-delivery-count`), so on a RabbitMQ classic queue, which
/// counts nothing, the last delivery is never reached: a message that keeps failing
/// transiently is retried until it succeeds or fails permanently. A dead letter here is
/// the broker's (JetStream `+TERM`, RabbitMQ `basic.reject` to the queue's dead-letter
/// exchange): the inbox keeps no dead-letter record.
///
/// ```
/// use idem_queue::inbox::{InboxError, InboxOutcome, settlement};
/// use idem_queue::{DeliveryAttempt, HandlerError, RetryPolicy, Settlement};
///
/// let policy = RetryPolicy::default();
/// let done: Result<InboxOutcome<()>, InboxError<HandlerError>> = Ok(InboxOutcome::Duplicate);
/// let first = DeliveryAttempt::new(1, policy.max_attempts);
/// assert_eq!(settlement(&policy, first, &done), Settlement::Ack);
/// let failed: Result<InboxOutcome<()>, _> =
///     Err(InboxError::Handler(HandlerError::transient("timeout")));
/// assert!(matches!(settlement(&policy, first, &failed), Settlement::Retry { .. }));
/// let last = DeliveryAttempt::new(5, policy.max_attempts);
/// assert!(matches!(settlement(&policy, last, &failed), Settlement::DeadLetter { .. }));
/// ```
#[cfg(any(feature = "jetstream", feature = "rabbitmq"))]
pub fn settlement<T>(
    policy: &crate::RetryPolicy,
    attempt: crate::DeliveryAttempt,
    result: &Result<InboxOutcome<T>, InboxError<crate::HandlerError>>,
) -> crate::Settlement {
    use crate::{DeadLetterReason, Settlement};
    let delay = policy.backoff(attempt.delivered);
    match result {
        Ok(_) => Settlement::Ack,
        Err(InboxError::InFlight) => Settlement::Defer {
            delay: policy.in_flight_delay(DEFAULT_LOCK_TIMEOUT),
        },
        Err(InboxError::Handler(error)) if error.is_permanent() => Settlement::DeadLetter {
            reason: DeadLetterReason::Permanent,
        },
        Err(InboxError::Handler(_) | InboxError::Conflict(_)) if attempt.is_final() => {
            Settlement::DeadLetter {
                reason: DeadLetterReason::MaxDeliveries,
            }
        }
        Err(InboxError::Handler(_) | InboxError::Conflict(_)) => Settlement::Retry { delay },
        Err(InboxError::EmptyId) => Settlement::DeadLetter {
            reason: DeadLetterReason::Permanent,
        },
        Err(_) => Settlement::Defer { delay },
    }
}

/// A transactional inbox over one table. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct Inbox {
    pool: PgPool,
    scope: Arc<str>,
    sql: Arc<Statements>,
    /// `lock_timeout` in milliseconds for the claim; `None`: wait as long as it takes.
    lock_timeout_ms: Option<u64>,
}

impl Inbox {
    /// An inbox in table [`DEFAULT_TABLE`], scope [`DEFAULT_SCOPE`].
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            scope: DEFAULT_SCOPE.into(),
            // The default name is a valid identifier.
            sql: Arc::new(Statements::new(DEFAULT_TABLE).unwrap_or_else(|_| unreachable!())),
            lock_timeout_ms: Some(lock_timeout_ms(DEFAULT_LOCK_TIMEOUT)),
        }
    }

    /// The same inbox with another bound on how long [`Inbox::process`] and
    /// [`Inbox::process_in`] wait for a concurrent transaction that holds the same id
    /// (default [`DEFAULT_LOCK_TIMEOUT`], 2 s). After it they fail with
    /// [`InboxError::InFlight`] and give their connection back, so duplicates delivered
    /// while a handler runs do not hold pool connections for as long as it does. Keep it
    /// short: the redelivery finds the outcome. `None` waits as long as the other
    /// transaction runs. It applies to the claim only; your handler's statements run under
    /// your own `lock_timeout`. Rounded up to whole milliseconds, at most
    /// `i32::MAX` ms (Postgres's limit, about 24 days).
    ///
    /// ```
    /// # fn pool() -> sqlx::PgPool { unimplemented!() }
    /// # fn main() { if false {
    /// use std::time::Duration;
    /// use idem_queue::inbox::Inbox;
    ///
    /// let inbox = Inbox::new(pool()).with_lock_timeout(Some(Duration::from_millis(500)));
    /// assert_eq!(inbox.lock_timeout(), Some(Duration::from_millis(500)));
    /// # } }
    /// ```
    pub fn with_lock_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.lock_timeout_ms = timeout.map(lock_timeout_ms);
        self
    }

    /// The claim's lock timeout ([`Inbox::with_lock_timeout`]).
    pub fn lock_timeout(&self) -> Option<Duration> {
        self.lock_timeout_ms.map(Duration::from_millis)
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
                tx.commit().await.map_err(|error| {
                    if is_serialization_failure(&error) {
                        InboxError::Conflict(error)
                    } else {
                        InboxError::Database(error)
                    }
                })?;
                Ok(InboxOutcome::Processed(value))
            }
            InboxOutcome::Duplicate => {
                tx.rollback().await?;
                Ok(InboxOutcome::Duplicate)
            }
        }
    }

    /// Processes `message_id` inside the caller's own transaction `conn`: claims it and, if
    /// new, runs `handler` on it, both inside a savepoint. The caller commits (effects and
    /// claim together). On an error the claim and the handler's writes are already rolled
    /// back to the savepoint and the transaction is usable: the caller may roll back or
    /// commit its own other writes; the message stays unprocessed either way.
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
        sqlx::raw_sql(SAVEPOINT).execute(&mut *conn).await?;
        match self.claim_bounded(conn, message_id).await {
            Ok(true) => {}
            Ok(false) => {
                sqlx::raw_sql(RELEASE_SAVEPOINT).execute(&mut *conn).await?;
                return Ok(InboxOutcome::Duplicate);
            }
            Err(error) => {
                // The failed statement aborted the transaction; back to the savepoint it
                // is usable again (and any `lock_timeout` set for the claim is undone).
                sqlx::raw_sql(ROLLBACK_TO_SAVEPOINT)
                    .execute(&mut *conn)
                    .await?;
                return if is_lock_timeout(&error) {
                    Err(InboxError::InFlight)
                } else if sqlstate(&error).as_deref() == Some("40001") {
                    // ON CONFLICT under REPEATABLE READ/SERIALIZABLE: the conflicting row
                    // was committed by a transaction this snapshot cannot see. The id is
                    // processed: a duplicate.
                    Ok(InboxOutcome::Duplicate)
                } else {
                    Err(InboxError::Database(error))
                };
            }
        }
        match handler(&mut *conn).await {
            Ok(value) => {
                sqlx::raw_sql(RELEASE_SAVEPOINT).execute(&mut *conn).await?;
                Ok(InboxOutcome::Processed(value))
            }
            Err(error) => {
                // Undo the claim with the handler's writes, so a caller who commits anyway
                // does not mark the message processed without its effects.
                if let Err(rollback) = sqlx::raw_sql(ROLLBACK_TO_SAVEPOINT)
                    .execute(&mut *conn)
                    .await
                {
                    // The claim may still be in the transaction: report the database
                    // failure (the caller must not commit), not the handler's.
                    tracing::warn!(
                        message_id,
                        "rolling back to the inbox savepoint after a handler error failed"
                    );
                    return Err(InboxError::Database(rollback));
                }
                Err(InboxError::Handler(error))
            }
        }
    }

    /// [`Inbox::claim`] under the inbox's lock timeout, restored afterwards so the
    /// handler runs under the caller's own. Must run inside the inbox's savepoint: on an
    /// error the caller rolls back to it, which also undoes the `SET LOCAL`.
    async fn claim_bounded(
        &self,
        conn: &mut PgConnection,
        message_id: &str,
    ) -> Result<bool, sqlx::Error> {
        let Some(timeout_ms) = self.lock_timeout_ms else {
            return self.claim(conn, message_id).await;
        };
        let previous: String = sqlx::query_scalar("SELECT current_setting('lock_timeout')")
            .fetch_one(&mut *conn)
            .await?;
        sqlx::query("SELECT set_config('lock_timeout', $1, true)")
            .bind(format!("{timeout_ms}ms"))
            .execute(&mut *conn)
            .await?;
        let new = self.claim(conn, message_id).await?;
        sqlx::query("SELECT set_config('lock_timeout', $1, true)")
            .bind(previous)
            .execute(&mut *conn)
            .await?;
        Ok(new)
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
