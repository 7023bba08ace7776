//! # idem-redis: the Redis and Redis Cluster idem store
//!
//! Many gateways that share one Redis behave as one: a key completed through any of them is
//! replayed by all of them. Built on [`fred`] (re-exported, so you never fight a version
//! mismatch).
//!
//! ```no_run
//! use std::time::Duration;
//! use idem_core::{Begin, Fingerprint, Key, Scope, ScopedKey, Store, Stored};
//! use idem_redis::{RedisOptions, RedisStore};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
//! // Or a cluster, with options:
//! let _cluster = RedisStore::connect_with(
//!     "redis+cluster://10.0.0.1:7000,10.0.0.2:7000,10.0.0.3:7000",
//!     RedisOptions { prefix: "payments".into(), ..RedisOptions::default() },
//! )
//! .await?;
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
//! ## URLs
//!
//! - `redis://[user:password@]host[:port][/db]`: one Redis node (default port 6379, db 0).
//! - `redis+cluster://[user:password@]host:port,host:port,...`: a Redis Cluster. Any
//!   reachable node will do; the client discovers the rest and follows slot moves
//!   (`MOVED`/`ASK`). fred's own form, `redis-cluster://host:port?node=host:port`, works too.
//!
//! - `rediss://…` and `rediss+cluster://…`: the same over TLS (rustls, with the `ring`
//!   provider). Without [`RedisOptions::tls`] the store trusts the system's certificate
//!   authorities and presents no client certificate; set it to trust a private authority or
//!   to present a client certificate (Redis asks for one unless `tls-auth-clients no`). In a
//!   cluster every node is verified under the name the cluster announces for it (its IP
//!   address unless `cluster-announce-hostname` is set), so its certificate must carry that
//!   name.
//!
//! ```no_run
//! use std::sync::Arc;
//! use idem_redis::{RedisOptions, RedisStore, rustls};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut roots = rustls::RootCertStore::empty();
//! # let my_ca = rustls::pki_types::CertificateDer::from(Vec::new());
//! roots.add(my_ca)?; // e.g. read with rustls::pki_types::pem::PemObject
//! let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
//!     rustls::crypto::ring::default_provider(),
//! ))
//! .with_safe_default_protocol_versions()?
//! .with_root_certificates(roots)
//! .with_no_client_auth();
//! let options = RedisOptions { tls: Some(Arc::new(tls)), ..RedisOptions::default() };
//! let store = RedisStore::connect_with("rediss://redis.internal:6380", options).await?;
//! # Ok(()) }
//! ```
//!
//! Redis 7.0 or later (or Valkey) is required: the scripts declare their flags (`#!lua`) and
//! read the clock before writing.
//!
//! [`RedisStore::connect_with`] waits until Redis answers; [`RedisStore::connect_lazy`]
//! returns at once and connects in the background, so a gateway can start while Redis is
//! down and fail closed (every call a [`StoreError::Backend`]) until it is back.
//!
//! ## How it works
//!
//! Each record is one Redis hash at `<prefix>:{<hex of ScopedKey::digest>}`. The braces make
//! the digest the Redis Cluster hash tag, so a record and everything a script touches live in
//! one slot; user-supplied keys and scopes never appear in a key name (they may contain
//! braces), only in the hash's `scope` and `key` fields, for inspection.
//!
//! Every state change (`begin`, `complete`, `release`, `renew`, `delete`) is one Lua
//! script: loaded once (`SCRIPT LOAD` on every primary), called by SHA (`EVALSHA`), and
//! loaded again when a node answers `NOSCRIPT` (after a restart, a failover or a
//! `SCRIPT FLUSH`). Redis runs a script atomically, so of any number of concurrent `begin`s
//! of a key exactly one acquires it. `get` is a read-only script (`no-writes`).
//!
//! Time is Redis' own clock (`TIME`, read inside each script), so gateways with skewed
//! clocks agree on leases. Leases and retention are also Redis' native key expiry: a
//! completed record is gone by itself at its retention end (`PEXPIREAT`), and
//! [`Store::sweep`] has nothing to do (it returns `Ok(0)`). An in-flight record expires one
//! more lease length past its lease end: it reads as absent (a new `begin` takes the key over)
//! but its holder's late [`Store::complete`] still finds it, so a slow write never turns
//! into a second execution.
//!
//! Leases and retentions are sent as whole milliseconds; one past [`idem_core::transition::MAX_SPAN`]
//! (about a hundred years, which keeps every time exact in Lua's numbers) is refused with
//! [`StoreError::DurationOutOfRange`] before anything is sent.
//!
//! **Fencing tokens** are `max(previous token + 1, TIME in microseconds)`. Within a record's
//! life the first term makes them grow; once a record is gone (released, deleted, expired)
//! the clock does, since the previous token was minted at an earlier microsecond. This
//! assumes the clock of the node that owns the key never steps back by more than the time
//! between the previous claim and the next one, including across a failover to a replica on
//! another machine: keep Redis hosts on NTP (slewing, not stepping).
//!
//! ## Operating Redis for idem
//!
//! - **Persistence**: what [`Store::complete`] acknowledged must survive a Redis restart, or
//!   a retry after the restart executes again. Enable AOF: `appendonly yes` with
//!   `appendfsync always` (nothing acknowledged is lost; every write waits for an fsync) or
//!   `appendfsync everysec` (up to about a second of acknowledged writes lost on a crash of
//!   the host). RDB snapshots alone lose everything since the last snapshot.
//! - **Memory**: set `maxmemory-policy noeviction`. An evicting policy (`allkeys-lru`,
//!   `volatile-*`, …) silently drops records, in-flight claims and completed outcomes alike,
//!   and a retry then executes again. With `noeviction` a full Redis refuses writes instead:
//!   `begin` fails with [`StoreError::Backend`] and the gateway fails closed.
//! - **Failover**: Redis replication is asynchronous. A record acknowledged by a primary that
//!   dies before a replica received it is lost when the replica is promoted (Sentinel or
//!   Cluster failover), and a retry of that key executes again. `WAIT` does not close the
//!   gap (it does not roll back). If that matters, use Postgres with synchronous
//!   replication, or accept it as the rare case the forwarded idempotency key lets the
//!   upstream catch with its own unique constraint.
//! - **Errors and timeouts**: every Redis error, and every command that takes longer than
//!   [`RedisOptions::command_timeout`] (waiting for a reconnection included), is returned as
//!   [`StoreError::Backend`] with the client's error as its source. A call that timed out may
//!   still have run on the server: a `begin` may have claimed the key (it stays in flight
//!   until the lease ends, so nothing runs twice), a `complete` may have stored its outcome.
//!   Commands are not retried by the client on a broken connection, for the same reason.

mod options;
mod scripts;

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use fred::clients::Pool;
use fred::error::{Error as RedisError, ErrorKind};
use fred::interfaces::HashesInterface;
use fred::interfaces::{ClientLike, LuaInterface};
use fred::prelude::{Builder, ReconnectPolicy};
use fred::types::scan::{ScanType, Scanner};
use fred::types::scripts::Script;
use fred::types::{ConnectHandle, Value};
use futures_util::StreamExt;
use idem_core::{
    Begin, Fingerprint, InFlightRecord, Key, Lease, Record, RecordState, Scope, ScopedKey, Store,
    StoreError, Stored, Token, from_unix_millis, to_millis, transition,
};

pub use fred;
pub use options::{ConnectError, RedisOptions};
/// The TLS library of [`RedisOptions::tls`], re-exported so its version always matches.
pub use rustls;

use crate::scripts::Scripts;

/// The Redis and Redis Cluster store. See the [crate docs](crate).
///
/// Cheap to clone: clones share one connection pool, which is closed when the last clone is
/// dropped.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    scripts: Scripts,
    prefix: String,
    max_in_flight_scan: usize,
    url: String,
    tasks: Vec<ConnectHandle>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Each task drives one pooled client's connections; stopping it closes them.
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.inner.url)
            .field("prefix", &self.inner.prefix)
            .field("pool_size", &self.inner.pool.size())
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to the Redis at `url` with default options; see the [crate docs](crate) for
    /// the URL forms.
    pub async fn connect(url: &str) -> Result<Self, ConnectError> {
        Self::connect_with(url, RedisOptions::default()).await
    }

    /// Connects to the Redis at `url`, waits until every pooled connection is up and the
    /// scripts are loaded, all within [`RedisOptions::connect_timeout`].
    ///
    /// Connections lost later are re-established in the background; calls made meanwhile
    /// wait up to [`RedisOptions::command_timeout`] and then fail.
    pub async fn connect_with(url: &str, options: RedisOptions) -> Result<Self, ConnectError> {
        let limit = options.connect_timeout;
        let (pool, scripts, options) = Self::prepare(url, options, true)?;
        let mut tasks = pool.connect_pool();
        let started = tokio::time::timeout(limit, async {
            wait_connected(&pool, &mut tasks).await?;
            for script in scripts.all() {
                load(&pool, script).await?;
            }
            Ok(())
        })
        .await;
        // From here on, dropping the store stops the connection tasks.
        let store = Self::assemble(url, pool, scripts, options, tasks);
        match started {
            Ok(Ok(())) => Ok(store),
            Ok(Err(error)) => Err(ConnectError::Redis(error)),
            Err(_) => Err(ConnectError::Timeout(limit)),
        }
    }

    /// Makes a store for the Redis at `url` without waiting for it: connections are made in
    /// the background and retried until they succeed, and scripts are loaded on first use.
    /// Until Redis is reachable every call fails with [`StoreError::Backend`] after
    /// [`RedisOptions::command_timeout`]. Only a bad URL or option fails here.
    ///
    /// Must be called inside a Tokio runtime.
    pub fn connect_lazy(url: &str, options: RedisOptions) -> Result<Self, ConnectError> {
        tokio::runtime::Handle::try_current().map_err(|_| ConnectError::NoRuntime)?;
        let (pool, scripts, options) = Self::prepare(url, options, false)?;
        let tasks = pool.connect_pool();
        Ok(Self::assemble(url, pool, scripts, options, tasks))
    }

    fn prepare(
        url: &str,
        options: RedisOptions,
        fail_fast: bool,
    ) -> Result<(Pool, Scripts, RedisOptions), ConnectError> {
        options.validate()?;
        let mut config = options::parse_url(url, options.tls.as_ref())?;
        config.fail_fast = fail_fast;
        let pool = Builder::from_config(config)
            .with_connection_config(|connection| {
                connection.connection_timeout = options.connect_timeout;
                connection.internal_command_timeout = options.command_timeout;
                // A command that may have run must not run again behind the caller's back:
                // a second `complete` would answer "lease lost" to the holder that stored it.
                connection.max_command_attempts = 1;
            })
            .with_performance_config(|performance| {
                performance.default_command_timeout = options.command_timeout;
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2))
            .build_pool(options.pool_size)
            .map_err(|source| ConnectError::InvalidUrl {
                reason: "the client rejected the configuration".to_owned(),
                source: Some(source),
            })?;
        Ok((pool, Scripts::new(), options))
    }

    fn assemble(
        url: &str,
        pool: Pool,
        scripts: Scripts,
        options: RedisOptions,
        tasks: Vec<ConnectHandle>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                scripts,
                prefix: options.prefix,
                max_in_flight_scan: options.max_in_flight_scan,
                url: options::redact(url),
                tasks,
            }),
        }
    }

    /// The underlying connection pool, for commands of your own.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// The key prefix this store's records live under.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The Redis key of `key`'s record: `<prefix>:{<64 hex digits>}`, the braces making the
    /// digest its Redis Cluster hash tag.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
    /// use idem_core::{Key, Scope, ScopedKey};
    /// let store = idem_redis::RedisStore::connect("redis://127.0.0.1:6379").await?;
    /// let key = ScopedKey::new(Scope::anonymous(), Key::new("pay-1")?);
    /// let name = store.record_key(&key);
    /// assert!(name.starts_with("idem:{") && name.ends_with('}'));
    /// # Ok(()) }
    /// ```
    pub fn record_key(&self, key: &ScopedKey) -> String {
        let mut name = String::with_capacity(self.inner.prefix.len() + 2 + 64 + 1);
        name.push_str(&self.inner.prefix);
        name.push_str(":{");
        push_hex(&mut name, &key.digest());
        name.push('}');
        name
    }

    /// Runs `script` on `key`'s record: by SHA, loading it again if the node lost it.
    async fn run(
        &self,
        operation: &'static str,
        script: &Script,
        key: &ScopedKey,
        args: Vec<Value>,
    ) -> Result<Value, StoreError> {
        let pool = &self.inner.pool;
        let record = self.record_key(key);
        let first: Result<Value, RedisError> = pool
            .evalsha(script.sha1().clone(), record.as_str(), args.clone())
            .await;
        match first {
            Err(error) if error.details().starts_with("NOSCRIPT") => {
                load(pool, script)
                    .await
                    .map_err(|e| StoreError::backend(operation, e))?;
                pool.evalsha(script.sha1().clone(), record.as_str(), args)
                    .await
            }
            other => other,
        }
        .map_err(|e| StoreError::backend(operation, e))
    }

    /// Runs a script that answers with an array whose first element is a tag.
    async fn run_tagged(
        &self,
        operation: &'static str,
        script: &Script,
        key: &ScopedKey,
        args: Vec<Value>,
    ) -> Result<Vec<Value>, StoreError> {
        match self.run(operation, script, key, args).await? {
            Value::Array(items) => Ok(items),
            other => Err(unexpected(operation, &other)),
        }
    }
}

/// Waits until every pooled client is connected, or one of them gave up: with `fail_fast`,
/// a client whose first connection fails ends its task with the error.
async fn wait_connected(pool: &Pool, tasks: &mut [ConnectHandle]) -> Result<(), RedisError> {
    loop {
        if pool.clients().iter().all(|client| client.is_connected()) {
            return Ok(());
        }
        if let Some(task) = tasks.iter_mut().find(|task| task.is_finished()) {
            return Err(match task.await {
                Ok(Err(error)) => error,
                Ok(Ok(())) => RedisError::new(ErrorKind::IO, "the connection closed"),
                Err(failed) => RedisError::new(ErrorKind::Unknown, failed.to_string()),
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Loads `script` on every primary.
async fn load(pool: &Pool, script: &Script) -> Result<(), RedisError> {
    let lua = script.lua().cloned().unwrap_or_default();
    pool.script_load_cluster::<(), _>(lua).await
}

#[async_trait]
impl Store for RedisStore {
    async fn begin(
        &self,
        key: &ScopedKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        const OP: &str = "begin";
        let mut fp = String::with_capacity(64);
        push_hex(&mut fp, fingerprint.as_bytes());
        let args = vec![
            Value::from(fp),
            span(OP, lease)?,
            Value::from(key.scope().as_str()),
            Value::from(key.key().as_str()),
        ];
        let reply = self
            .run_tagged(OP, &self.inner.scripts.begin, key, args)
            .await?;
        match (tag(&reply), reply.as_slice()) {
            (Some("acquired"), [_, token, expires]) => Ok(Begin::Acquired(Lease {
                token: Token::new(number(OP, token)?),
                expires_at: time(OP, expires)?,
            })),
            (Some("in_flight"), [_, left]) => Ok(Begin::InFlight {
                retry_after: Duration::from_millis(number(OP, left)?.max(1)),
            }),
            (Some("completed"), [_, expires, stored]) => Ok(Begin::Completed {
                stored: Arc::new(decode_stored(stored)?),
                expires_at: time(OP, expires)?,
            }),
            (Some("mismatch"), [_]) => Ok(Begin::Mismatch),
            (Some("corrupt"), _) => Err(StoreError::corrupt(Malformed("unknown record state"))),
            _ => Err(unexpected(OP, &Value::Array(reply))),
        }
    }

    async fn complete(
        &self,
        key: &ScopedKey,
        token: Token,
        stored: &Stored,
        retain: Duration,
    ) -> Result<SystemTime, StoreError> {
        const OP: &str = "complete";
        let args = vec![
            Value::from(token.get().to_string()),
            span(OP, retain)?,
            Value::Bytes(stored.encode().into()),
        ];
        let reply = self
            .run_tagged(OP, &self.inner.scripts.complete, key, args)
            .await?;
        match (tag(&reply), reply.as_slice()) {
            (Some("ok"), [_, expires]) => time(OP, expires),
            (Some("lost"), [_]) => Err(StoreError::LeaseLost),
            _ => Err(unexpected(OP, &Value::Array(reply))),
        }
    }

    async fn release(&self, key: &ScopedKey, token: Token) -> Result<(), StoreError> {
        const OP: &str = "release";
        let args = vec![Value::from(token.get().to_string())];
        let reply = self
            .run_tagged(OP, &self.inner.scripts.release, key, args)
            .await?;
        match (tag(&reply), reply.as_slice()) {
            (Some("ok"), [_]) => Ok(()),
            (Some("lost"), [_]) => Err(StoreError::LeaseLost),
            _ => Err(unexpected(OP, &Value::Array(reply))),
        }
    }

    async fn renew(
        &self,
        key: &ScopedKey,
        token: Token,
        lease: Duration,
    ) -> Result<Lease, StoreError> {
        const OP: &str = "renew";
        let args = vec![Value::from(token.get().to_string()), span(OP, lease)?];
        let reply = self
            .run_tagged(OP, &self.inner.scripts.renew, key, args)
            .await?;
        match (tag(&reply), reply.as_slice()) {
            (Some("ok"), [_, expires]) => Ok(Lease {
                token,
                expires_at: time(OP, expires)?,
            }),
            (Some("lost"), [_]) => Err(StoreError::LeaseLost),
            _ => Err(unexpected(OP, &Value::Array(reply))),
        }
    }

    async fn get(&self, key: &ScopedKey) -> Result<Option<Record>, StoreError> {
        const OP: &str = "get";
        let reply = self
            .run_tagged(OP, &self.inner.scripts.get, key, Vec::new())
            .await?;
        let fields = match (tag(&reply), reply.as_slice()) {
            (Some("absent"), [_]) => return Ok(None),
            (Some("record"), [_, state, fp, token, expires, stored]) => {
                (state, fp, token, expires, stored)
            }
            _ => return Err(unexpected(OP, &Value::Array(reply))),
        };
        let (state, fp, token, expires, stored) = fields;
        let corrupt = |what| StoreError::corrupt(Malformed(what));
        let fingerprint = fp
            .as_str()
            .and_then(|hex| parse_hex32(&hex))
            .map(Fingerprint::from_bytes)
            .ok_or_else(|| corrupt("the fingerprint is not 64 hex digits"))?;
        let token = Token::new(
            token
                .as_str()
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| corrupt("the token is not a number"))?,
        );
        let expires_at = expires
            .as_str()
            .and_then(|t| t.parse().ok())
            .map(from_unix_millis)
            .ok_or_else(|| corrupt("the expiry is not a number"))?;
        let state = match state.as_str().as_deref() {
            Some("in_flight") => RecordState::InFlight {
                lease_expires_at: expires_at,
            },
            Some("completed") => RecordState::Completed {
                stored: Arc::new(decode_stored(stored)?),
                expires_at,
            },
            _ => return Err(corrupt("unknown record state")),
        };
        Ok(Some(Record {
            fingerprint,
            token,
            state,
        }))
    }

    async fn delete(&self, key: &ScopedKey) -> Result<bool, StoreError> {
        const OP: &str = "delete";
        match self
            .run(OP, &self.inner.scripts.delete, key, Vec::new())
            .await?
        {
            Value::Integer(live) => Ok(live == 1),
            other => Err(unexpected(OP, &other)),
        }
    }

    /// Redis expires records by itself (`PEXPIREAT`), so there is never anything to sweep.
    async fn sweep(&self, _limit: usize) -> Result<usize, StoreError> {
        Ok(0)
    }

    /// Scans the prefix's keys (on every primary of a cluster), reading each record's
    /// state, up to [`RedisOptions::max_in_flight_scan`] keys: Redis keeps no index by claim
    /// time. Ages are measured with this process's clock.
    async fn in_flight(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> Result<Vec<InFlightRecord>, StoreError> {
        const OP: &str = "list in-flight records";
        let failed = |e: RedisError| StoreError::backend(OP, e);
        let client = self.inner.pool.next();
        let pattern = format!("{}:{{*}}", glob_escape(&self.inner.prefix));
        let mut pages = if client.is_clustered() {
            client
                .scan_cluster(pattern, Some(SCAN_PAGE), Some(ScanType::Hash))
                .boxed()
        } else {
            client
                .scan(pattern, Some(SCAN_PAGE), Some(ScanType::Hash))
                .boxed()
        };
        let now = SystemTime::now();
        let mut held = Vec::new();
        let mut scanned = 0;
        while let Some(page) = pages.next().await {
            let mut page = page.map_err(failed)?;
            let keys = page.take_results().unwrap_or_default();
            scanned += keys.len();
            let records = futures_util::future::try_join_all(
                keys.into_iter()
                    .map(|key| client.hmget::<Vec<Value>, _, _>(key, IN_FLIGHT_FIELDS.to_vec())),
            )
            .await
            .map_err(failed)?;
            for fields in records {
                if let Some(record) = in_flight_record(&fields, now, older_than)? {
                    held.push(record);
                }
            }
            if scanned >= self.inner.max_in_flight_scan {
                tracing::warn!(
                    scanned,
                    "listing in-flight records stopped at max_in_flight_scan keys"
                );
                page.cancel();
                break;
            }
            page.next();
        }
        held.sort_by_key(|record| record.claimed_at);
        held.truncate(limit);
        Ok(held)
    }
}

/// Keys `SCAN` asks for per page.
const SCAN_PAGE: u32 = 1000;

/// The hash fields [`in_flight_record`] reads, in its order.
const IN_FLIGHT_FIELDS: [&str; 6] = ["state", "expires_ms", "token", "claimed_ms", "scope", "key"];

/// A record's fields (as [`IN_FLIGHT_FIELDS`]) as an in-flight record, if it is held, its
/// lease not over at `now`, and claimed at least `older_than` before `now`.
fn in_flight_record(
    fields: &[Value],
    now: SystemTime,
    older_than: Duration,
) -> Result<Option<InFlightRecord>, StoreError> {
    let [state, expires, token, claimed, scope, key] = fields else {
        return Err(StoreError::corrupt(Malformed("a record's fields")));
    };
    // Gone between the scan and the read, or completed: not in flight.
    if state.as_str().as_deref() != Some("in_flight") {
        return Ok(None);
    }
    let corrupt = |what| StoreError::corrupt(Malformed(what));
    let number = |value: &Value| value.as_str().and_then(|text| text.parse::<u64>().ok());
    let lease_expires_at = number(expires)
        .map(from_unix_millis)
        .ok_or_else(|| corrupt("the expiry is not a number"))?;
    let token = number(token).ok_or_else(|| corrupt("the token is not a number"))?;
    // Records claimed before `claimed_ms` was kept: the token is the claim's clock in
    // microseconds (or just above the previous token).
    let claimed_at = from_unix_millis(number(claimed).unwrap_or(token / 1000));
    // No minimum age lists every claim, even one stamped by a Redis clock slightly ahead.
    let old_enough = older_than.is_zero()
        || now
            .duration_since(claimed_at)
            .is_ok_and(|age| age >= older_than);
    if now >= lease_expires_at || !old_enough {
        return Ok(None);
    }
    let (Some(scope), Some(key)) = (scope.as_str(), key.as_str()) else {
        return Err(corrupt("the scope or key is missing"));
    };
    Ok(Some(InFlightRecord {
        key: ScopedKey::new(
            Scope::new(scope.into_owned()),
            Key::from_stored(&key).map_err(StoreError::corrupt)?,
        ),
        token: Token::new(token),
        claimed_at,
        lease_expires_at,
    }))
}

/// `text` matching itself in a `SCAN MATCH` pattern.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// A lease or retention, as whole milliseconds for a script argument; refused past
/// [`transition::MAX_SPAN`], so the script's arithmetic stays exact.
fn span(operation: &'static str, d: Duration) -> Result<Value, StoreError> {
    let d = transition::span(operation, d)?;
    Ok(Value::from(to_millis(d).to_string()))
}

fn tag(reply: &[Value]) -> Option<&str> {
    match reply.first() {
        Some(Value::String(s)) => Some(&**s),
        _ => None,
    }
}

/// A decimal number a script returned.
fn number(operation: &'static str, value: &Value) -> Result<u64, StoreError> {
    value
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| unexpected(operation, value))
}

/// A Unix-millisecond time a script returned.
fn time(operation: &'static str, value: &Value) -> Result<SystemTime, StoreError> {
    number(operation, value).map(from_unix_millis)
}

fn decode_stored(value: &Value) -> Result<Stored, StoreError> {
    match value {
        Value::Bytes(bytes) => Stored::decode(bytes),
        Value::String(text) => Stored::decode(text.as_bytes()),
        _ => Err(StoreError::corrupt(Malformed(
            "the stored outcome is missing",
        ))),
    }
}

fn unexpected(operation: &'static str, value: &Value) -> StoreError {
    let mut shown = format!("{value:?}");
    if shown.len() > 200 {
        let mut end = 200;
        while !shown.is_char_boundary(end) {
            end -= 1;
        }
        shown.truncate(end);
        shown.push('…');
    }
    StoreError::backend(operation, UnexpectedReply(shown))
}

/// A script answered in a shape this version does not know: another version of idem-redis
/// wrote scripts under the same SHA (impossible) or something else answered.
#[derive(Debug)]
struct UnexpectedReply(String);

impl fmt::Display for UnexpectedReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unexpected reply from an idem script: {}", self.0)
    }
}

impl StdError for UnexpectedReply {}

/// A record field that does not hold what idem wrote there.
#[derive(Debug)]
struct Malformed(&'static str);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed record in Redis: {}", self.0)
    }
}

impl StdError for Malformed {}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
}

fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    let digits = hex.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        let high = char::from(pair[0]).to_digit(16)?;
        let low = char::from(pair[1]).to_digit(16)?;
        out[i] = u8::try_from(high * 16 + low).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let bytes: [u8; 32] = std::array::from_fn(|i| (i * 37) as u8);
        let mut hex = String::new();
        push_hex(&mut hex, &bytes);
        assert_eq!(hex.len(), 64);
        assert_eq!(parse_hex32(&hex), Some(bytes));
        assert_eq!(parse_hex32(&hex[1..]), None);
        assert_eq!(parse_hex32(&hex.replace('0', "g")), None);
    }

    #[test]
    fn spans_past_the_maximum_are_refused() {
        assert_eq!(
            span("begin", Duration::from_millis(1500)).unwrap(),
            Value::from("1500")
        );
        let most = transition::MAX_SPAN;
        assert_eq!(
            span("begin", most).unwrap(),
            Value::from(to_millis(most).to_string())
        );
        for absurd in [most + Duration::from_millis(1), Duration::MAX] {
            assert!(matches!(
                span("renew", absurd),
                Err(StoreError::DurationOutOfRange {
                    operation: "renew",
                    ..
                })
            ));
        }
    }
}
