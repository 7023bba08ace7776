//! Where the store's calls get their connection: a pool of the store's own (no round trip
//! when a connection is given back), or a sqlx [`PgPool`] the user passed in.
//!
//! sqlx's pool pings every connection it takes back, in a task of its own, because a call
//! whose future was dropped mid-flight may have left the connection in the middle of an
//! exchange. The store's own pool knows better: a connection goes back only from
//! [`Lent::finish`], once its call finished in a state the next call can rely on; dropped
//! any other way (the future was cancelled, a panic), it is closed instead, and a new one is
//! opened when needed.

use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgDatabaseError, PgSeverity};
use sqlx::{Connection, PgConnection, PgPool, Postgres};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Idle connections beyond `min_connections` idle this long are closed (sqlx's default).
const IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// Connections this old are closed when given back (sqlx's default), so that sessions do
/// not live forever (load balancers, server-side memory).
const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);
/// The longest wait between two attempts to reach a server that refuses connections.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The store's connections. See the module docs.
#[derive(Debug, Clone)]
pub(crate) enum Connections {
    /// The store's own pool (`connect`, `connect_with`, `connect_lazy_with`).
    Own(Arc<OwnPool>),
    /// A pool the user passed to `from_pool`: sqlx's rules, its ping on release included.
    Shared(PgPool),
}

/// A connection lent to one call. Give it back with [`Lent::finish`]; dropping it any
/// other way closes an own connection (a sqlx pool's goes back through sqlx's ping).
pub(crate) struct Lent(Held);

enum Held {
    Own {
        conn: PgConnection,
        opened: Instant,
        pool: Arc<OwnPool>,
        // Dropped after `conn` went back to the idle stack, so that whoever gets the permit
        // next finds it there.
        _permit: OwnedSemaphorePermit,
    },
    Shared(PoolConnection<Postgres>),
}

impl Connections {
    /// A connection, within the acquire timeout (then [`sqlx::Error::PoolTimedOut`]).
    pub(crate) async fn acquire(&self) -> Result<Lent, sqlx::Error> {
        match self {
            Self::Own(pool) => pool.acquire().await,
            Self::Shared(pool) => Ok(Lent(Held::Shared(pool.acquire().await?))),
        }
    }

    /// Closes every connection, waiting for calls in progress; later calls fail.
    pub(crate) async fn close(&self) {
        match self {
            Self::Own(pool) => pool.close().await,
            Self::Shared(pool) => pool.close().await,
        }
    }
}

impl Lent {
    /// Ends the call that used this connection, with its outcome, and gives the connection
    /// back if the next call can use it without a round trip to check it: after success,
    /// or after an error the server reported for the statement, which leaves the session
    /// as it was (not one that ends the session, `FATAL`, as when the backend was
    /// terminated). After an I/O or protocol error, or inside a transaction, it is closed.
    ///
    /// A call that ran a transaction and failed must not come here: sqlx queues the
    /// `ROLLBACK` of a dropped transaction for the connection's next use, so such a
    /// connection would sit idle with the transaction (and its locks) still open. Let the
    /// `Lent` drop instead.
    pub(crate) fn finish<T>(self, result: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        match self.0 {
            Held::Own {
                conn, opened, pool, ..
            } => {
                let sound = match &result {
                    Ok(_) => true,
                    Err(sqlx::Error::Database(error)) => error
                        .try_downcast_ref::<PgDatabaseError>()
                        .is_some_and(|error| {
                            !matches!(error.severity(), PgSeverity::Fatal | PgSeverity::Panic)
                        }),
                    Err(_) => false,
                };
                if sound && !conn.is_in_transaction() {
                    pool.give_back(conn, opened);
                }
            }
            // sqlx pings it on release.
            Held::Shared(_) => {}
        }
        result
    }
}

impl Deref for Lent {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        match &self.0 {
            Held::Own { conn, .. } => conn,
            Held::Shared(conn) => conn,
        }
    }
}

impl DerefMut for Lent {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match &mut self.0 {
            Held::Own { conn, .. } => conn,
            Held::Shared(conn) => conn,
        }
    }
}

/// The store's own pool: at most `max_connections` connections. A call holds a semaphore
/// permit while it has a connection, and opens one only when none is idle, so lent and
/// idle ones together never pass the permit count. The idle ones are on a stack so the
/// warmest is used first.
pub(crate) struct OwnPool {
    options: PgConnectOptions,
    permits: Arc<Semaphore>,
    max_connections: u32,
    min_connections: usize,
    acquire_timeout: Duration,
    ping_idle_after: Option<Duration>,
    /// Most recently given back at the back. Never locked across an `.await`.
    idle: Mutex<VecDeque<Idle>>,
    closed: AtomicBool,
}

struct Idle {
    conn: PgConnection,
    opened: Instant,
    since: Instant,
}

impl std::fmt::Debug for OwnPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnPool")
            .field("max_connections", &self.max_connections)
            .field("idle", &self.idle.lock().map(|idle| idle.len()).ok())
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// The settings of an [`OwnPool`], as [`crate::PostgresOptions`] gives them.
pub(crate) struct OwnPoolOptions {
    pub(crate) max_connections: u32,
    pub(crate) min_connections: u32,
    pub(crate) acquire_timeout: Duration,
    pub(crate) ping_idle_after: Option<Duration>,
}

/// Errors that mean the server is not up yet, worth trying again until the deadline (as
/// sqlx's pool does): the connection was refused, or the server is starting (`57P03`).
fn starting_up(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(error) => error.kind() == std::io::ErrorKind::ConnectionRefused,
        sqlx::Error::Database(error) => error.code().as_deref() == Some("57P03"),
        _ => false,
    }
}

impl OwnPool {
    pub(crate) fn new(options: PgConnectOptions, settings: &OwnPoolOptions) -> Arc<Self> {
        let max = settings.max_connections.max(1);
        Arc::new(Self {
            options,
            permits: Arc::new(Semaphore::new(max as usize)),
            max_connections: max,
            min_connections: settings.min_connections.min(max) as usize,
            acquire_timeout: settings.acquire_timeout,
            ping_idle_after: settings.ping_idle_after,
            idle: Mutex::new(VecDeque::new()),
            closed: AtomicBool::new(false),
        })
    }

    /// Opens `min_connections` connections (at least one, which proves the server is
    /// reachable), within the acquire timeout.
    pub(crate) async fn open_min(self: &Arc<Self>) -> Result<(), sqlx::Error> {
        let mut opened = Vec::new();
        for _ in 0..self.min_connections.max(1) {
            opened.push(self.acquire().await?);
        }
        for conn in opened {
            conn.finish(Ok(()))?;
        }
        Ok(())
    }

    async fn acquire(self: &Arc<Self>) -> Result<Lent, sqlx::Error> {
        tokio::time::timeout(self.acquire_timeout, self.checkout())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?
    }

    async fn checkout(self: &Arc<Self>) -> Result<Lent, sqlx::Error> {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        if self.closed.load(Ordering::Acquire) {
            return Err(sqlx::Error::PoolClosed);
        }
        let (conn, opened) = loop {
            let Some(mut idle) = self.pop_idle() else {
                break (self.open().await?, Instant::now());
            };
            if self
                .ping_idle_after
                .is_some_and(|after| idle.since.elapsed() >= after)
                && idle.conn.ping().await.is_err()
            {
                // The server or the network dropped it while it sat idle: try the next one.
                continue;
            }
            break (idle.conn, idle.opened);
        };
        Ok(Lent(Held::Own {
            conn,
            opened,
            pool: Arc::clone(self),
            _permit: permit,
        }))
    }

    /// A new connection; refused attempts are repeated, with backoff, until the caller's
    /// deadline ends them.
    async fn open(&self) -> Result<PgConnection, sqlx::Error> {
        let mut backoff = Duration::from_millis(10);
        loop {
            match PgConnection::connect_with(&self.options).await {
                Err(error) if starting_up(&error) => {
                    tracing::debug!(%error, ?backoff, "Postgres is not accepting connections yet");
                }
                result => return result,
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    fn pop_idle(&self) -> Option<Idle> {
        self.idle.lock().ok()?.pop_back()
    }

    fn give_back(&self, conn: PgConnection, opened: Instant) {
        if self.closed.load(Ordering::Acquire) || opened.elapsed() >= MAX_LIFETIME {
            return;
        }
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        idle.push_back(Idle {
            conn,
            opened,
            since: Instant::now(),
        });
        // The least recently used connection is at the front: close it once it has been
        // idle too long, as long as more than `min_connections` stay.
        while idle.len() > self.min_connections
            && idle
                .front()
                .is_some_and(|oldest| oldest.since.elapsed() >= IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
    }

    async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        // Every permit: the calls in progress have finished.
        let all = self.permits.acquire_many(self.max_connections).await;
        let idle = match self.idle.lock() {
            Ok(mut idle) => std::mem::take(&mut *idle),
            Err(_) => VecDeque::new(),
        };
        for Idle { conn, .. } in idle {
            if let Err(error) = conn.close().await {
                tracing::debug!(%error, "closing a Postgres connection");
            }
        }
        drop(all);
        self.permits.close();
    }
}
