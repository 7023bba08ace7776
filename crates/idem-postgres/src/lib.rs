//! # idem-postgres: the Postgres idem store
//!
//! Records live in one Postgres table. Any number of gateways (or consumers) pointed at the
//! same table behave as one: a key completed through one is replayed by all of them.
//!
//! ```no_run
//! use std::time::Duration;
//! use idem_core::{Begin, Fingerprint, Key, Scope, ScopedKey, Store, Stored};
//! use idem_postgres::{PostgresOptions, PostgresStore};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Creates (or upgrades) the table `idem.records` at startup.
//! let options = PostgresOptions::new().table("idem.records").max_connections(16);
//! let store = PostgresStore::connect_with("postgres://idem@db.internal/app", &options).await?;
//! // Expired records are deleted in the background, 1 000 at a time.
//! let _sweeper = store.spawn_sweeper(Duration::from_secs(30), 1_000);
//!
//! let key = ScopedKey::new(Scope::anonymous(), Key::new("pay-1")?);
//! let fingerprint = Fingerprint::builder().part("body", b"{}").finish();
//! match store.begin(&key, &fingerprint, Duration::from_secs(30)).await? {
//!     Begin::Acquired(lease) => {
//!         let outcome = Stored::new(201).with_body("charged");
//!         store.complete(&key, lease.token, &outcome, Duration::from_secs(86_400)).await?;
//!     }
//!     Begin::Completed { stored, .. } => println!("replay: {}", stored.status),
//!     Begin::InFlight { retry_after } => println!("busy, retry in {retry_after:?}"),
//!     Begin::Mismatch => println!("key reused for another request"),
//! }
//! # Ok(()) }
//! ```
//!
//! ## How it works
//!
//! - **One statement per call.** [`Store::begin`] is a single `INSERT … ON CONFLICT … DO
//!   UPDATE … WHERE expires_at <= now() RETURNING` (inside a CTE that also reads the live
//!   record when the claim did not happen), so of any number of concurrent `begin`s of a key
//!   exactly one acquires it. `release` and `renew` are one `UPDATE` each whose `WHERE`
//!   checks the fencing token, the in-flight state and that the lease has not ended; when no
//!   row matches the caller gets [`StoreError::LeaseLost`]. `complete` is one statement too:
//!   it accepts the current token while the in-flight record is kept (its lease may have
//!   ended: see below), and answers a repeat by the token that completed the record with its
//!   retention end; only when neither matched does it read once more, under a fresh snapshot,
//!   in case a concurrent complete of the same token committed meanwhile.
//! - **Round trips** (measured by `tests/round_trips.rs`): once a statement is prepared on
//!   a connection (its first use there costs one more), each call is one round trip, so
//!   `begin` + `complete` cost two, and nothing else is sent (but a ping before using a
//!   connection idle for [`PostgresOptions::ping_idle_after`]): the store's own
//!   connections go back to its pool without the ping sqlx's pool sends on release (see
//!   [Connections](#connections)). Under contention, a `begin` that waited on another
//!   session's claim of the same key runs its statement once more (READ COMMITTED: its
//!   snapshot predates that commit).
//! - **The server's clock.** Every lease and retention is measured with the database's
//!   `now()`, so gateways with skewed clocks agree. Durations are sent as intervals (with
//!   microsecond precision); one past [`idem_core::transition::MAX_SPAN`] (about 100 years) is
//!   refused with [`StoreError::DurationOutOfRange`] before anything is sent.
//! - **Fencing tokens** come from a sequence (`<table>_token_seq`), so they grow per key
//!   across takeovers, releases and expiry: a takeover draws its token while it holds the
//!   row lock, and a released record stays in place (expired) until it is swept. After an
//!   explicit [`Store::delete`] or a sweep, a new claim's token is larger than every token
//!   drawn before its statement started.
//! - **Expired records** read as absent at once. An in-flight record whose lease ended is
//!   kept (column `kept_until`) one more lease length, so its holder's late `complete` still
//!   finds it; a released one is not kept at all. Records no longer kept are deleted by
//!   [`Store::sweep`] in
//!   bounded batches (`FOR UPDATE SKIP LOCKED`, oldest first, using the index on
//!   `expires_at`); a sweep takes a transaction-scoped advisory lock named after the table
//!   (`pg_try_advisory_xact_lock(hashtextextended('idem-postgres sweep <table>', 0))`), so
//!   of many gateways only one sweeps at a time and the others return `Ok(0)` at once. Run
//!   [`PostgresStore::spawn_sweeper`] (or [`idem_core::spawn_sweeper`]) in every gateway.
//!
//! ## The table and its migrations
//!
//! The table name is configurable ([`PostgresOptions::table`], default `idem_records`,
//! optionally `schema.table`); it is validated (lowercase ASCII letters, digits and `_`) and
//! always quoted. Beside it live the sequence `<table>_token_seq`, the index
//! `<table>_expires_at_idx` and, in the same schema, `idem_schema_versions`, which records
//! each records table's schema version. Since the DDL depends on the name, migrations are
//! generated from it rather than read from static files: at startup, inside one
//! transaction holding an advisory lock (so gateways starting together do not race), the
//! store applies the steps past the recorded version; when the table is current it only
//! reads the version and needs no DDL privilege. Users who run their own migrations set
//! [`PostgresOptions::run_migrations`] to `false` and apply
//! [`PostgresOptions::migration_script`]; the store then only checks that the table exists.
//!
//! ## Durability and replication
//!
//! `complete` returns after Postgres committed. That commit survives a crash of the database
//! server only with `synchronous_commit = on` (the default); with it `off` (or `local`
//! towards replicas) a server crash may lose the last acknowledged records, and a retry of
//! such a key runs again. With asynchronous streaming replication, a failover to a replica
//! may lose writes the old primary acknowledged; use synchronous replication
//! (`synchronous_standby_names` with `synchronous_commit = remote_apply` or `on`) if a
//! completed key must survive failover.
//!
//! ## Connections
//!
//! Postgres 11 or newer is needed (tested on 15).
//!
//! The store keeps a pool of its own connections ([`PostgresOptions`]: at most
//! `max_connections`, each call waits at most `acquire_timeout` for one, the most recently
//! used first) or uses a sqlx pool of yours ([`PostgresStore::from_pool`]). Its own pool
//! gives a connection back only once its call has finished, successfully or with an error
//! the server reported for the statement; a call whose future was dropped mid-flight (a
//! caller's timeout), or that met an I/O or protocol error or a session-ending (`FATAL`)
//! one, closes its connection, and a new one is opened when needed. (The abandoned backend
//! ends once its statement has, at most `statement_timeout` later; until then the server
//! may count more than `max_connections` sessions from the store.) So no check is needed
//! when a connection comes back, where sqlx's pool pings each one (a round trip and a
//! spawned task per call, which [`PostgresStore::from_pool`] stores keep paying). A
//! connection idle for [`PostgresOptions::ping_idle_after`] is pinged before use; idle
//! ones beyond `min_connections` are closed after 10 minutes (when the pool is next used),
//! and every connection after 30 minutes, sqlx's defaults.
//!
//! The sessions run at READ COMMITTED (the statements are written for it) with an optional
//! `statement_timeout`; both are sent as startup parameters, which PgBouncer in
//! transaction mode does not forward: behind such a pooler, set them on the role instead.
//!
//! ### TLS
//!
//! TLS is built in (rustls with the `ring` provider) and set in the URL with libpq's
//! parameters:
//!
//! - `sslmode`: `disable`, `allow`, `prefer` (the default: TLS if the server offers it,
//!   **without checking its certificate**), `require` (TLS, certificate not checked),
//!   `verify-ca` (the certificate must chain to a trusted authority) or `verify-full` (and
//!   name the host). Against a managed database use `verify-full`.
//! - `sslrootcert=PATH`: a PEM file of authorities to trust, **in addition to** the system's
//!   (sqlx's rule; libpq trusts only the file).
//! - `sslcert=PATH` and `sslkey=PATH`: a client certificate and its key, both PEM, for
//!   servers that authenticate clients by certificate.
//!
//! ```no_run
//! # async fn f() -> Result<(), idem_postgres::ConnectError> {
//! let store = idem_postgres::PostgresStore::connect(
//!     "postgres://idem@db.internal/idem?sslmode=verify-full&sslrootcert=/etc/idem/db-ca.pem",
//! )
//! .await?;
//! # Ok(()) }
//! ```

mod connections;
mod schema;
mod statements;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use idem_core::{
    Begin, Fingerprint, InFlightRecord, Key, Lease, Record, RecordState, Scope, ScopedKey, Store,
    StoreCounters, StoreError, Stored, Token, transition,
};
use sqlx::postgres::types::PgInterval;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{Connection, PgPool, Row};

use crate::connections::{Connections, Lent, OwnPool, OwnPoolOptions};

pub use sqlx;

pub use crate::schema::TableName;
use crate::statements::Statements;

/// The table name used unless [`PostgresOptions::table`] says otherwise.
pub const DEFAULT_TABLE: &str = "idem_records";

/// How many times `begin` runs its statement again when a concurrent commit hid the
/// record from its snapshot (each retry takes a fresh snapshot; one is almost always enough).
const BEGIN_ATTEMPTS: usize = 8;

/// The longest `acquire_timeout` and `statement_timeout` used: Postgres' own limit for
/// `statement_timeout` (`i32::MAX` milliseconds, about 24.8 days). Longer settings are
/// capped to it, which also keeps the pool's deadline arithmetic from overflowing.
pub const MAX_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);

/// Why a store could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The configured table name is not a plain SQL identifier.
    #[error("invalid table name {name:?}: {reason}")]
    InvalidTable {
        /// The name as configured.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The connection URL could not be parsed.
    #[error("invalid Postgres URL")]
    InvalidUrl(#[source] sqlx::Error),
    /// The database could not be reached, or refused the connection.
    #[error("cannot connect to Postgres")]
    Connect(#[source] sqlx::Error),
    /// Creating or upgrading the records table failed.
    #[error("cannot migrate the idem records table {table}")]
    Migrate {
        /// The table, as configured.
        table: String,
        /// The database's error.
        #[source]
        source: sqlx::Error,
    },
    /// Migrations were skipped but the table (or its token sequence) does not exist.
    #[error(
        "the idem records table {table} (or its sequence) does not exist; run the migration \
         script or enable run_migrations"
    )]
    MissingTable {
        /// The table, as configured.
        table: String,
    },
}

/// How to set up a [`PostgresStore`]; the defaults suit a gateway.
///
/// ```
/// use std::time::Duration;
/// use idem_postgres::PostgresOptions;
///
/// let options = PostgresOptions::new()
///     .table("idem.records")
///     .run_migrations(false)
///     .max_connections(32)
///     .acquire_timeout(Duration::from_secs(2))
///     .statement_timeout(Some(Duration::from_secs(5)));
/// let ddl = options.migration_script().unwrap();
/// assert!(ddl.contains("CREATE TABLE IF NOT EXISTS \"idem\".\"records\""));
/// ```
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    table: String,
    run_migrations: bool,
    max_connections: u32,
    min_connections: u32,
    acquire_timeout: Duration,
    statement_timeout: Option<Duration>,
    ping_idle_after: Option<Duration>,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            table: DEFAULT_TABLE.to_owned(),
            run_migrations: true,
            max_connections: 10,
            min_connections: 0,
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Some(Duration::from_secs(10)),
            ping_idle_after: Some(Duration::from_secs(30)),
        }
    }
}

impl PostgresOptions {
    /// The defaults: table `idem_records`, migrations on, 10 connections, 5 s to get a
    /// connection, 10 s statement timeout.
    pub fn new() -> Self {
        Self::default()
    }

    /// The records table: `name` or `schema.name`, lowercase ASCII letters, digits and `_`,
    /// at most 48 characters for the name. Checked when the store is set up.
    pub fn table(mut self, name: impl Into<String>) -> Self {
        self.table = name.into();
        self
    }

    /// Whether to create or upgrade the table at startup (default `true`). When `false`, the
    /// store only checks that the table exists; apply [`Self::migration_script`] yourself.
    pub fn run_migrations(mut self, run: bool) -> Self {
        self.run_migrations = run;
        self
    }

    /// The most connections the store's pool opens (default 10).
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// Connections [`PostgresStore::connect_with`] opens at once and the pool never closes
    /// for being idle (default 0).
    pub fn min_connections(mut self, min: u32) -> Self {
        self.min_connections = min;
        self
    }

    /// How long a call may wait for a pooled connection, including opening one (default
    /// 5 s, capped at [`MAX_TIMEOUT`]). When the database is unreachable, calls fail with
    /// [`StoreError::Backend`] after at most this long.
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout.min(MAX_TIMEOUT);
        self
    }

    /// Postgres' `statement_timeout` for the store's sessions (default 10 s, capped at
    /// [`MAX_TIMEOUT`]; `None` leaves the server's setting).
    pub fn statement_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.statement_timeout = timeout.map(|timeout| timeout.min(MAX_TIMEOUT));
        self
    }

    /// Pings a pooled connection before use when it has been idle this long (default
    /// 30 s; `None` never pings). A ping costs a round trip; without it a connection the
    /// server dropped fails one call.
    pub fn ping_idle_after(mut self, idle: Option<Duration>) -> Self {
        self.ping_idle_after = idle;
        self
    }

    /// The SQL that creates the table at the current schema version, in one transaction,
    /// for those who run migrations themselves.
    pub fn migration_script(&self) -> Result<String, ConnectError> {
        Ok(TableName::parse(&self.table)?.script())
    }

    fn own_pool_options(&self) -> OwnPoolOptions {
        OwnPoolOptions {
            max_connections: self.max_connections,
            min_connections: self.min_connections,
            acquire_timeout: self.acquire_timeout,
            ping_idle_after: self.ping_idle_after,
        }
    }

    /// The sqlx pool behind [`PostgresStore::pool`] for stores with their own connections:
    /// the same limits but no `min_connections`, so that it opens nothing until used.
    fn pool_options(&self) -> PgPoolOptions {
        let mut pool = PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.acquire_timeout)
            .test_before_acquire(false);
        if let Some(idle) = self.ping_idle_after {
            pool = pool.before_acquire(move |conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= idle {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            });
        }
        pool
    }

    fn connect_options(&self, url: &str) -> Result<PgConnectOptions, ConnectError> {
        let scheme = url.split_once("://").map(|(scheme, _)| scheme);
        if !matches!(scheme, Some(s) if s.eq_ignore_ascii_case("postgres") || s.eq_ignore_ascii_case("postgresql"))
        {
            return Err(ConnectError::InvalidUrl(sqlx::Error::Configuration(
                "the URL must start with postgres:// or postgresql://".into(),
            )));
        }
        let mut options: PgConnectOptions = url.parse().map_err(ConnectError::InvalidUrl)?;
        if options.get_application_name().is_none() {
            options = options.application_name("idem-postgres");
        }
        options = options.options([("default_transaction_isolation", "read committed")]);
        if let Some(timeout) = self.statement_timeout {
            options = options.options([(
                "statement_timeout",
                u64::try_from(timeout.min(MAX_TIMEOUT).as_millis()).unwrap_or(u64::MAX),
            )]);
        }
        Ok(options)
    }
}

/// The Postgres store. See the [crate docs](crate). Clones share one pool.
#[derive(Clone)]
pub struct PostgresStore {
    /// What the store's calls use.
    connections: Connections,
    /// What [`Self::pool`] hands out.
    pool: PgPool,
    table: Arc<TableName>,
    sql: Arc<Statements>,
    /// Records this process's sweeps removed (every clone shares it).
    swept: Arc<AtomicU64>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.table.display())
            .field("connections", &self.connections)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects with default [`PostgresOptions`] and creates or upgrades the table
    /// `idem_records`.
    pub async fn connect(url: &str) -> Result<Self, ConnectError> {
        Self::connect_with(url, &PostgresOptions::default()).await
    }

    /// Connects (opening [`PostgresOptions::min_connections`], at least one), then runs
    /// migrations (or, with them off, checks that the table exists).
    pub async fn connect_with(url: &str, options: &PostgresOptions) -> Result<Self, ConnectError> {
        let table = TableName::parse(&options.table)?;
        let own = OwnPool::new(options.connect_options(url)?, &options.own_pool_options());
        own.open_min().await.map_err(ConnectError::Connect)?;
        let store = Self::own(own, options, url, table)?;
        store.setup(options.run_migrations).await?;
        Ok(store)
    }

    /// Builds the store without connecting: nothing is checked or migrated, and the first
    /// call opens the first connection. For services that must start while the database is
    /// down; calls then fail with [`StoreError::Backend`] until it is up.
    pub fn connect_lazy_with(url: &str, options: &PostgresOptions) -> Result<Self, ConnectError> {
        let table = TableName::parse(&options.table)?;
        let own = OwnPool::new(options.connect_options(url)?, &options.own_pool_options());
        Self::own(own, options, url, table)
    }

    /// Uses a pool you built (for socket settings sqlx has and the URL does not, or to
    /// share connections). Only the table and migration settings of `options` apply. The
    /// pool's sessions should run at READ COMMITTED, Postgres' default. The store's calls
    /// then go through sqlx's pool as it is, so each costs the extra round trip sqlx's
    /// pool spends checking a connection it takes back (see the [crate docs](crate)).
    pub async fn from_pool(pool: PgPool, options: &PostgresOptions) -> Result<Self, ConnectError> {
        let table = TableName::parse(&options.table)?;
        let store = Self::assemble(Connections::Shared(pool.clone()), pool, table);
        store.setup(options.run_migrations).await?;
        Ok(store)
    }

    fn own(
        own: Arc<OwnPool>,
        options: &PostgresOptions,
        url: &str,
        table: TableName,
    ) -> Result<Self, ConnectError> {
        let pool = options
            .pool_options()
            .connect_lazy_with(options.connect_options(url)?);
        Ok(Self::assemble(Connections::Own(own), pool, table))
    }

    fn assemble(connections: Connections, pool: PgPool, table: TableName) -> Self {
        Self {
            sql: Arc::new(Statements::new(&table)),
            swept: Arc::default(),
            table: Arc::new(table),
            connections,
            pool,
        }
    }

    async fn setup(&self, migrate: bool) -> Result<(), ConnectError> {
        if migrate {
            return self.migrate().await;
        }
        let mut conn = self
            .connections
            .acquire()
            .await
            .map_err(ConnectError::Connect)?;
        let present = schema::exists(&mut conn, &self.table).await;
        if conn.finish(present).map_err(ConnectError::Connect)? {
            Ok(())
        } else {
            Err(ConnectError::MissingTable {
                table: self.table.display(),
            })
        }
    }

    /// Creates or upgrades the table now (what setup does unless migrations are off).
    pub async fn migrate(&self) -> Result<(), ConnectError> {
        let failed = |source| ConnectError::Migrate {
            table: self.table.display(),
            source,
        };
        let mut conn = self.connections.acquire().await.map_err(failed)?;
        // A failed migration drops its connection (see `Lent::finish`).
        schema::migrate(&mut conn, &self.table)
            .await
            .map_err(failed)?;
        conn.finish(Ok(())).map_err(failed)
    }

    /// A sqlx pool on the store's database, for queries of your own (the tests read the
    /// table through it). A store built with [`Self::from_pool`] returns that pool, which
    /// its calls use too. Any other store's calls use connections of their own (they skip
    /// sqlx's check on release, see the [crate docs](crate)); this pool then has the same
    /// URL, session settings, `max_connections` and `acquire_timeout`, opens connections
    /// only when you use it (`min_connections` does not apply to it), and they count apart
    /// from the store's.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The records table, as configured (`name` or `schema.name`).
    pub fn table(&self) -> String {
        self.table.display()
    }

    /// Sweeps expired records every `every`, `batch` at a time, until the handle is aborted
    /// (see [`idem_core::spawn_sweeper`]). Safe to run in every gateway: only one sweeps at a time.
    /// Must be called within a Tokio runtime.
    pub fn spawn_sweeper(&self, every: Duration, batch: usize) -> tokio::task::JoinHandle<()> {
        idem_core::spawn_sweeper(self.clone(), every, batch)
    }

    /// Closes the store's connections (and [`Self::pool`]'s), waiting for calls in
    /// progress; later calls fail with [`StoreError::Backend`].
    pub async fn close(&self) {
        self.connections.close().await;
        self.pool.close().await;
    }

    /// A connection for one call of `operation`.
    async fn lend(&self, operation: &'static str) -> Result<Lent, StoreError> {
        self.connections
            .acquire()
            .await
            .map_err(|e| StoreError::backend(operation, e))
    }

    /// Runs one statement of `operation` on a connection of its own and gives the
    /// connection back (see `Lent::finish`); returns the answer's first row, if any.
    async fn fetch_optional(
        &self,
        operation: &'static str,
        statement: Statement,
    ) -> Result<Option<PgRow>, StoreError> {
        let mut conn = self.lend(operation).await?;
        let row = statement.fetch_optional(&mut *conn).await;
        conn.finish(row)
            .map_err(|e| StoreError::backend(operation, e))
    }

    /// [`Self::fetch_optional`] for a statement answering one unnamed column.
    async fn fetch_scalar<T>(
        &self,
        operation: &'static str,
        statement: Statement,
    ) -> Result<Option<T>, StoreError>
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
    {
        let row = self.fetch_optional(operation, statement).await?;
        row.map(|row| column(&row, 0)).transpose()
    }

    /// [`Self::fetch_optional`], returning every row.
    async fn fetch_all(
        &self,
        operation: &'static str,
        statement: Statement,
    ) -> Result<Vec<PgRow>, StoreError> {
        let mut conn = self.lend(operation).await?;
        let rows = statement.fetch_all(&mut *conn).await;
        conn.finish(rows)
            .map_err(|e| StoreError::backend(operation, e))
    }
}

/// A lease or retention as an interval; refused past [`transition::MAX_SPAN`], so that
/// `now() + 2 * interval` stays far inside timestamptz's range.
fn interval(operation: &'static str, duration: Duration) -> Result<PgInterval, StoreError> {
    let duration = transition::span(operation, duration)?;
    let microseconds =
        i64::try_from(duration.as_micros()).map_err(|_| StoreError::DurationOutOfRange {
            operation,
            duration,
        })?;
    Ok(PgInterval {
        months: 0,
        days: 0,
        microseconds,
    })
}

fn token_param(token: Token) -> i64 {
    // Tokens come from a bigint sequence; one that does not fit matches no row.
    i64::try_from(token.get()).unwrap_or(-1)
}

fn time_of(micros: i64) -> SystemTime {
    let offset = Duration::from_micros(micros.unsigned_abs());
    let time = if micros >= 0 {
        UNIX_EPOCH.checked_add(offset)
    } else {
        UNIX_EPOCH.checked_sub(offset)
    };
    // Only reachable on a platform whose clock cannot hold ±292 000 years.
    time.unwrap_or(UNIX_EPOCH)
}

fn token_of(value: i64) -> Result<Token, StoreError> {
    u64::try_from(value)
        .map(Token::new)
        .map_err(|_| StoreError::corrupt(format!("negative token {value}")))
}

fn fingerprint_of(bytes: &[u8]) -> Result<Fingerprint, StoreError> {
    <[u8; 32]>::try_from(bytes)
        .map(Fingerprint::from_bytes)
        .map_err(|_| StoreError::corrupt(format!("fingerprint of {} bytes", bytes.len())))
}

/// Column `index` (a name, or a position for a statement's one unnamed column) of `row`.
fn column<'r, T>(row: &'r PgRow, index: impl sqlx::ColumnIndex<PgRow>) -> Result<T, StoreError>
where
    T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    row.try_get(index).map_err(StoreError::corrupt)
}

/// One of the store's statements, with its parameters bound.
type Statement = sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments>;

fn outcome_of(row: &PgRow) -> Result<Arc<Stored>, StoreError> {
    let bytes: Option<&[u8]> = column(row, "outcome")?;
    let bytes = bytes.ok_or_else(|| StoreError::corrupt("completed record without outcome"))?;
    Ok(Arc::new(Stored::decode(bytes)?))
}

impl PostgresStore {
    async fn begin_once(
        &self,
        id: &[u8],
        key: &ScopedKey,
        fingerprint: &Fingerprint,
        lease: PgInterval,
    ) -> Result<Option<Begin>, StoreError> {
        let row = self
            .fetch_optional(
                "begin",
                sqlx::query(self.sql.begin.clone())
                    .bind(id)
                    .bind(key.scope().as_str())
                    .bind(key.key().as_str())
                    .bind(fingerprint.as_bytes().as_slice())
                    .bind(lease),
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let expires_at = time_of(column(&row, "expires_us")?);
        if column(&row, "acquired")? {
            return Ok(Some(Begin::Acquired(Lease {
                token: token_of(column(&row, "token")?)?,
                expires_at,
            })));
        }
        if !column::<bool>(&row, "same_fingerprint")? {
            return Ok(Some(Begin::Mismatch));
        }
        if column(&row, "completed")? {
            return Ok(Some(Begin::Completed {
                stored: outcome_of(&row)?,
                expires_at,
            }));
        }
        let now = time_of(column(&row, "now_us")?);
        let left = expires_at.duration_since(now).unwrap_or_default();
        Ok(Some(Begin::InFlight {
            retry_after: left.max(Duration::from_millis(1)),
        }))
    }
}

/// `begin` kept finding the record hidden from its snapshot.
#[derive(Debug, thiserror::Error)]
#[error("begin found no claimable and no visible record after {BEGIN_ATTEMPTS} attempts")]
struct BeginContended;

#[async_trait]
impl Store for PostgresStore {
    async fn begin(
        &self,
        key: &ScopedKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let id = key.digest();
        let lease = interval("begin", lease)?;
        for attempt in 1..=BEGIN_ATTEMPTS {
            if let Some(answer) = self.begin_once(&id, key, fingerprint, lease).await? {
                return Ok(answer);
            }
            tracing::debug!(key = %key.log_id(), attempt, "begin raced a concurrent commit; retrying");
        }
        Err(StoreError::backend("begin", BeginContended))
    }

    async fn complete(
        &self,
        key: &ScopedKey,
        token: Token,
        stored: &Stored,
        retain: Duration,
    ) -> Result<SystemTime, StoreError> {
        let retain = interval("complete", retain)?;
        let id = key.digest();
        let expires_us: Option<i64> = self
            .fetch_scalar(
                "complete",
                sqlx::query(self.sql.complete.clone())
                    .bind(id.as_slice())
                    .bind(token_param(token))
                    .bind(stored.encode())
                    .bind(retain),
            )
            .await?;
        if let Some(expires_us) = expires_us {
            return Ok(time_of(expires_us));
        }
        // A concurrent complete of this token may have committed while the statement waited
        // on the row, after its snapshot was taken: look again before saying lost.
        let expires_us: Option<i64> = self
            .fetch_scalar(
                "complete",
                sqlx::query(self.sql.completed_by.clone())
                    .bind(id.as_slice())
                    .bind(token_param(token)),
            )
            .await?;
        expires_us.map(time_of).ok_or(StoreError::LeaseLost)
    }

    async fn release(&self, key: &ScopedKey, token: Token) -> Result<(), StoreError> {
        let done = self
            .fetch_optional(
                "release",
                sqlx::query(self.sql.release.clone())
                    .bind(key.digest().as_slice())
                    .bind(token_param(token)),
            )
            .await?;
        done.map(drop).ok_or(StoreError::LeaseLost)
    }

    async fn renew(
        &self,
        key: &ScopedKey,
        token: Token,
        lease: Duration,
    ) -> Result<Lease, StoreError> {
        let lease = interval("renew", lease)?;
        let expires_us: Option<i64> = self
            .fetch_scalar(
                "renew",
                sqlx::query(self.sql.renew.clone())
                    .bind(key.digest().as_slice())
                    .bind(token_param(token))
                    .bind(lease),
            )
            .await?;
        let expires_at = expires_us.map(time_of).ok_or(StoreError::LeaseLost)?;
        Ok(Lease { token, expires_at })
    }

    async fn get(&self, key: &ScopedKey) -> Result<Option<Record>, StoreError> {
        let row = self
            .fetch_optional(
                "get",
                sqlx::query(self.sql.get.clone()).bind(key.digest().as_slice()),
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let expires_at = time_of(column(&row, "expires_us")?);
        let state = if column(&row, "completed")? {
            RecordState::Completed {
                stored: outcome_of(&row)?,
                expires_at,
            }
        } else {
            RecordState::InFlight {
                lease_expires_at: expires_at,
            }
        };
        Ok(Some(Record {
            fingerprint: fingerprint_of(column(&row, "fingerprint")?)?,
            token: token_of(column(&row, "token")?)?,
            state,
        }))
    }

    async fn delete(&self, key: &ScopedKey) -> Result<bool, StoreError> {
        let live: Option<bool> = self
            .fetch_scalar(
                "delete",
                sqlx::query(self.sql.delete.clone()).bind(key.digest().as_slice()),
            )
            .await?;
        Ok(live.unwrap_or(false))
    }

    async fn in_flight(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> Result<Vec<InFlightRecord>, StoreError> {
        const OPERATION: &str = "list in-flight records";
        let older_than = interval(OPERATION, older_than)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .fetch_all(
                OPERATION,
                sqlx::query(self.sql.in_flight.clone())
                    .bind(older_than)
                    .bind(limit),
            )
            .await?;
        rows.iter()
            .map(|row| {
                let key =
                    Key::from_stored(column::<&str>(row, "key")?).map_err(StoreError::corrupt)?;
                let scope = Scope::new(column::<String>(row, "scope")?);
                Ok(InFlightRecord {
                    key: ScopedKey::new(scope, key),
                    token: token_of(column(row, "token")?)?,
                    claimed_at: time_of(column(row, "claimed_us")?),
                    lease_expires_at: time_of(column(row, "expires_us")?),
                })
            })
            .collect()
    }

    async fn sweep(&self, limit: usize) -> Result<usize, StoreError> {
        if limit == 0 {
            return Ok(0);
        }
        let failed = |e| StoreError::backend("sweep", e);
        let mut conn = self.lend("sweep").await?;
        // On failure the connection is dropped, not given back (see `Lent::finish`).
        let mut tx = Connection::begin(&mut *conn).await.map_err(failed)?;
        let locked: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))")
                .bind(self.table.sweep_lock())
                .fetch_one(&mut *tx)
                .await
                .map_err(failed)?;
        // When not locked, another gateway is sweeping this table right now.
        let removed = if locked {
            sqlx::query(self.sql.sweep.clone())
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await
                .map_err(failed)?
                .rows_affected()
        } else {
            0
        };
        tx.commit().await.map_err(failed)?;
        conn.finish(Ok(())).map_err(failed)?;
        if removed > 0 {
            tracing::debug!(table = %self.table.display(), removed, "swept expired records");
        }
        self.swept.fetch_add(removed, Ordering::Relaxed);
        Ok(usize::try_from(removed).unwrap_or(usize::MAX))
    }

    // Counting the table's rows is a scan in Postgres: too much for every scrape.
    fn counters(&self) -> StoreCounters {
        StoreCounters {
            swept: Some(self.swept.load(Ordering::Relaxed)),
            ..StoreCounters::default()
        }
    }
}
