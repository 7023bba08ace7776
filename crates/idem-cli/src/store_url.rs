//! `--store URL`: which store the gateway keeps its records in.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use idem_core::SystemClock;
use idem_core::{
    Begin, Fingerprint, Lease, MemoryLimits, MemoryStore, Record, ScopedKey, Store, StoreError,
    Stored, Token,
};
use idem_fjall::{FjallOptions, FjallStore};
use idem_postgres::{PostgresOptions, PostgresStore};
use idem_redb::{RedbOptions, RedbStore};
use idem_redis::{RedisOptions, RedisStore};

use crate::tls::{TlsError, TlsFiles};

/// A parsed store URL.
///
/// ```
/// use idem_cli::store_url::StoreUrl;
///
/// use idem_core::MemoryLimits;
///
/// assert_eq!(
///     "memory:".parse::<StoreUrl>().unwrap(),
///     StoreUrl::Memory(MemoryLimits::default())
/// );
/// assert_eq!(
///     "memory:?max_records=100000".parse::<StoreUrl>().unwrap(),
///     StoreUrl::Memory(MemoryLimits::default().max_records(100_000))
/// );
/// assert_eq!(
///     "redb:data/idem.redb".parse::<StoreUrl>().unwrap(),
///     StoreUrl::Redb("data/idem.redb".into())
/// );
/// assert_eq!(
///     "fjall:data/idem.fjall?cache_mib=16".parse::<StoreUrl>().unwrap(),
///     StoreUrl::Fjall {
///         path: "data/idem.fjall".into(),
///         cache_mib: Some(16),
///         memtable_mib: None,
///         shards: None,
///     }
/// );
/// assert_eq!(
///     "redis://:secret@127.0.0.1:6379".parse::<StoreUrl>().unwrap().to_string(),
///     "redis://:***@127.0.0.1:6379"
/// );
/// assert!("mysql://x".parse::<StoreUrl>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `memory:`: in this process only; gone on restart. `?max_records=N` and
    /// `?max_bytes=N` (also with a `KiB`, `MiB` or `GiB` suffix) cap what it holds (default:
    /// no record limit, 16 MiB); a full store refuses new keys with `503`, it never evicts
    /// a record (see [`MemoryLimits`]).
    Memory(MemoryLimits),
    /// `redb:PATH`: the embedded durable store in the file at PATH (created if absent).
    Redb(PathBuf),
    /// `fjall:DIR[?cache_mib=N&memtable_mib=N&shards=N]`: the embedded durable store on an
    /// LSM engine, in the directory DIR (created if absent). `cache_mib` is its block cache
    /// (default 8) and `memtable_mib` how much of the newest records it keeps in memory
    /// before writing them out sorted (default 8), both in MiB; `shards` (1 to 64, default
    /// 4) how many journals it syncs in parallel, fixed when the directory is created.
    Fjall {
        /// The directory.
        path: PathBuf,
        /// `cache_mib`, if given.
        cache_mib: Option<u64>,
        /// `memtable_mib`, if given.
        memtable_mib: Option<u64>,
        /// `shards`, if given.
        shards: Option<u64>,
    },
    /// `redis://[user:pass@]host[:port][/db]` (one node) or
    /// `redis+cluster://[user:pass@]host:port,host:port,...` (Redis Cluster), and over TLS
    /// `rediss://…` and `rediss+cluster://…`: shared by every gateway that names it. A
    /// `?prefix=NAME` query sets the key prefix (default `idem`), so several deployments
    /// can share one Redis; with TLS, `ca_file=PATH` trusts the authorities in that PEM
    /// file instead of the system's, and `cert_file=PATH&key_file=PATH` present a client
    /// certificate (see [`TlsFiles`]).
    Redis(String),
    /// `postgres://user@host:port/db` (also `postgresql://`): shared by every gateway
    /// that names it. A `?table=NAME` query sets the table (default `idem_records`,
    /// optionally `schema.table`); migrations run at startup. TLS is libpq's:
    /// `sslmode=verify-full&sslrootcert=PATH`, and `sslcert`/`sslkey` for a client
    /// certificate.
    Postgres(String),
}

/// Why a store URL is unusable.
#[derive(Debug, thiserror::Error)]
pub enum StoreUrlError {
    /// An unknown or malformed URL.
    #[error(
        "`{0}` is not a store URL; use `memory:`, `fjall:DIR`, `redb:PATH`, `redis://host:port` or \
         `redis+cluster://host:port,host:port` (`rediss…` for TLS) or \
         `postgres://user@host/db`"
    )]
    Unknown(String),
    /// A `memory:` setting that is unknown or not a number.
    #[error(
        "`{0}` is not a memory store URL; use `memory:`, or e.g. \
         `memory:?max_records=100000&max_bytes=64MiB`"
    )]
    Memory(String),
    /// `redb:` without a path.
    #[error("`{0}` names no file; use `redb:PATH`, e.g. `redb:idem.redb`")]
    NoPath(String),
    /// `fjall:` without a directory, or with a setting it does not know.
    #[error(
        "`{0}` is not a fjall store URL; use `fjall:DIR`, optionally with \
         `?cache_mib=N&memtable_mib=N` (whole MiB, 1 to 65536) and `shards=N` (1 to 64)"
    )]
    BadFjall(String),
    /// The store could not be opened.
    #[error("cannot open the store")]
    Open(#[source] idem_redb::OpenError),
    /// The fjall store could not be opened.
    #[error("cannot open the store")]
    OpenFjall(#[source] idem_fjall::OpenError),
    /// The Redis store could not connect.
    #[error("cannot connect to the Redis store")]
    Redis(#[source] idem_redis::ConnectError),
    /// The Redis store's TLS files are unusable.
    #[error("the Redis store's TLS settings are unusable: {0}")]
    RedisTls(#[source] TlsError),
    /// TLS files given for a Redis URL that does not use TLS.
    #[error(
        "`ca_file`, `cert_file` and `key_file` need a TLS URL: write `rediss://` or \
         `rediss+cluster://`"
    )]
    RedisTlsWithoutTls,
    /// The Postgres store could not connect or migrate.
    #[error("cannot connect to the Postgres store")]
    Postgres(#[source] idem_postgres::ConnectError),
    /// A store URL setting that is not a count of at least 1.
    #[error("`{setting}={value}` in the store URL: {setting} is a whole number from 1 to {max}")]
    BadCount {
        /// The setting.
        setting: &'static str,
        /// What was given.
        value: String,
        /// The largest accepted.
        max: u32,
    },
}

/// The value of the count setting `setting` in a store URL's query (removed from the URL),
/// from 1 to `max`.
fn take_count(
    url: &str,
    setting: &'static str,
    max: u32,
) -> Result<(String, Option<u32>), StoreUrlError> {
    let (url, value) = take_param(url, setting);
    let count = value
        .map(|value| {
            value
                .parse::<u32>()
                .ok()
                .filter(|count| (1..=max).contains(count))
                .ok_or(StoreUrlError::BadCount {
                    setting,
                    value,
                    max,
                })
        })
        .transpose()?;
    Ok((url, count))
}

/// The most pooled connections a store URL may ask for: more would exhaust the server
/// (Postgres' own default `max_connections` is 100) long before it helped.
const MAX_POOL: u32 = 1024;

impl std::str::FromStr for StoreUrl {
    type Err = StoreUrlError;

    fn from_str(url: &str) -> Result<Self, StoreUrlError> {
        if let Some(settings) = ["memory://", "memory:", "memory"]
            .iter()
            .find_map(|scheme| url.strip_prefix(scheme))
            .filter(|rest| rest.is_empty() || rest.starts_with('?'))
        {
            return memory_limits(settings)
                .map(Self::Memory)
                .ok_or_else(|| StoreUrlError::Memory(url.to_owned()));
        }
        if [
            "redis://",
            "redis+cluster://",
            "rediss://",
            "rediss+cluster://",
        ]
        .iter()
        .any(|scheme| url.starts_with(scheme))
        {
            return Ok(Self::Redis(url.to_owned()));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Self::Postgres(url.to_owned()));
        }
        if let Some(rest) = url
            .strip_prefix("fjall://")
            .or_else(|| url.strip_prefix("fjall:"))
        {
            return parse_fjall(url, rest);
        }
        let path = url
            .strip_prefix("redb://")
            .or_else(|| url.strip_prefix("redb:"))
            .ok_or_else(|| StoreUrlError::Unknown(url.to_owned()))?;
        if path.is_empty() {
            return Err(StoreUrlError::NoPath(url.to_owned()));
        }
        Ok(Self::Redb(PathBuf::from(path)))
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Memory(limits) => {
                f.write_str("memory:")?;
                let mut separator = '?';
                if limits.records() != usize::MAX {
                    write!(f, "{separator}max_records={}", limits.records())?;
                    separator = '&';
                }
                if limits.bytes() != MemoryLimits::default().bytes() {
                    write!(f, "{separator}max_bytes={}", limits.bytes())?;
                }
                Ok(())
            }
            Self::Redb(path) => write!(f, "redb:{}", path.display()),
            Self::Fjall {
                path,
                cache_mib,
                memtable_mib,
                shards,
            } => {
                write!(f, "fjall:{}", path.display())?;
                let settings = [
                    ("cache_mib", cache_mib),
                    ("memtable_mib", memtable_mib),
                    ("shards", shards),
                ];
                let mut separator = '?';
                for (name, value) in settings {
                    if let Some(value) = value {
                        write!(f, "{separator}{name}={value}")?;
                        separator = '&';
                    }
                }
                Ok(())
            }
            Self::Redis(url) | Self::Postgres(url) => f.write_str(&redact(url)),
        }
    }
}

impl StoreUrl {
    /// Opens the store (for Redis: connects, and fails if it cannot within the connect
    /// timeout). Call it inside a tokio runtime: the memory store's sweeper is a task.
    pub async fn open(&self) -> Result<Arc<dyn Store>, StoreUrlError> {
        Ok(match self {
            Self::Memory(limits) => {
                let store = Arc::new(MemoryStore::with_limits(*limits));
                let sweeper =
                    idem_core::spawn_sweeper(Arc::clone(&store), Duration::from_secs(1), 1024);
                Arc::new(Swept::new(store, sweeper))
            }
            // redb sweeps on its own writer thread.
            Self::Redb(path) => Arc::new(
                RedbStore::open_with(path, SystemClock, gateway_redb_options())
                    .map_err(StoreUrlError::Open)?,
            ),
            // fjall sweeps on its own writer thread too.
            Self::Fjall {
                path,
                cache_mib,
                memtable_mib,
                shards,
            } => Arc::new(
                FjallStore::open_with(
                    path,
                    SystemClock,
                    gateway_fjall_options(*cache_mib, *memtable_mib, *shards),
                )
                .map_err(StoreUrlError::OpenFjall)?,
            ),
            // Redis expires records by itself: no sweeper.
            Self::Redis(url) => {
                let (url, prefix) = take_param(url, "prefix");
                let (url, pool_size) = take_count(&url, "pool_size", MAX_POOL)?;
                let (url, tls) = take_tls_files(&url);
                let mut options = RedisOptions::default();
                if let Some(prefix) = prefix {
                    options.prefix = prefix;
                }
                if let Some(size) = pool_size {
                    options.pool_size = size as usize;
                }
                if url.starts_with("rediss") {
                    let config = tls.client_config().map_err(StoreUrlError::RedisTls)?;
                    options.tls = Some(Arc::new(config));
                } else if !tls.is_empty() {
                    return Err(StoreUrlError::RedisTlsWithoutTls);
                }
                Arc::new(
                    RedisStore::connect_with(&url, options)
                        .await
                        .map_err(StoreUrlError::Redis)?,
                )
            }
            Self::Postgres(url) => {
                let (url, table) = take_param(url, "table");
                let (url, max_connections) = take_count(&url, "max_connections", MAX_POOL)?;
                // Fail closed quickly, as with Redis' command timeout, when no connection can
                // be had.
                let mut options =
                    PostgresOptions::default().acquire_timeout(Duration::from_secs(2));
                if let Some(table) = table {
                    options = options.table(table);
                }
                if let Some(max) = max_connections {
                    options = options.max_connections(max);
                }
                let store = PostgresStore::connect_with(&url, &options)
                    .await
                    .map_err(StoreUrlError::Postgres)?;
                // Every gateway sweeps; an advisory lock lets one at a time do the work.
                let sweeper = idem_core::spawn_sweeper(store.clone(), Duration::from_secs(5), 1000);
                Arc::new(Swept::new(Arc::new(store), sweeper))
            }
        })
    }
}

/// A store with the sweeper task the gateway spawned for it. The sweeper never returns on
/// its own, so a finished one has panicked: [`Store::fatal_error`] then says so, and the
/// gateway stops rather than let expired records pile up. Dropping the store stops the
/// sweeper.
#[derive(Debug)]
struct Swept {
    store: Arc<dyn Store>,
    sweeper: tokio::task::JoinHandle<()>,
}

impl Swept {
    fn new(store: Arc<dyn Store>, sweeper: tokio::task::JoinHandle<()>) -> Self {
        Self { store, sweeper }
    }
}

impl Drop for Swept {
    fn drop(&mut self) {
        self.sweeper.abort();
    }
}

#[async_trait]
impl Store for Swept {
    async fn begin(
        &self,
        key: &ScopedKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        self.store.begin(key, fingerprint, lease).await
    }
    async fn complete(
        &self,
        key: &ScopedKey,
        token: Token,
        stored: &Stored,
        retain: Duration,
    ) -> Result<std::time::SystemTime, StoreError> {
        self.store.complete(key, token, stored, retain).await
    }
    async fn release(&self, key: &ScopedKey, token: Token) -> Result<(), StoreError> {
        self.store.release(key, token).await
    }
    async fn renew(
        &self,
        key: &ScopedKey,
        token: Token,
        lease: Duration,
    ) -> Result<Lease, StoreError> {
        self.store.renew(key, token, lease).await
    }
    async fn get(&self, key: &ScopedKey) -> Result<Option<Record>, StoreError> {
        self.store.get(key).await
    }
    async fn delete(&self, key: &ScopedKey) -> Result<bool, StoreError> {
        self.store.delete(key).await
    }
    async fn sweep(&self, limit: usize) -> Result<usize, StoreError> {
        self.store.sweep(limit).await
    }
    async fn in_flight(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> Result<Vec<idem_core::InFlightRecord>, StoreError> {
        self.store.in_flight(older_than, limit).await
    }
    fn fatal_error(&self) -> Option<String> {
        if self.sweeper.is_finished() {
            return Some("the task sweeping expired records has stopped".to_owned());
        }
        self.store.fatal_error()
    }
    fn counters(&self) -> idem_core::StoreCounters {
        self.store.counters()
    }
}

/// The limits in a `memory:` URL's query (`?max_records=N&max_bytes=N`), or `None` if a
/// setting is unknown or unreadable.
fn memory_limits(query: &str) -> Option<MemoryLimits> {
    let mut limits = MemoryLimits::default();
    for pair in query.trim_start_matches('?').split('&') {
        if pair.is_empty() {
            continue;
        }
        let (name, value) = pair.split_once('=')?;
        limits = match name {
            "max_records" => limits.max_records(value.parse().ok()?),
            "max_bytes" => limits.max_bytes(byte_size(value)?),
            _ => return None,
        };
    }
    Some(limits)
}

/// `N`, `NKiB`, `NMiB` or `NGiB`.
fn byte_size(value: &str) -> Option<usize> {
    let (number, unit) = [("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30)]
        .into_iter()
        .find_map(|(suffix, unit)| value.strip_suffix(suffix).map(|n| (n, unit)))
        .unwrap_or((value, 1));
    number.parse::<usize>().ok()?.checked_mul(unit)
}

/// The URL with any password replaced, for logs and `--check`.
fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((credentials, host)) => {
                let user = credentials.split(':').next().unwrap_or("");
                format!("{scheme}://{user}:***@{host}")
            }
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// Removes `name=value` from the URL's query, returning the URL without it and the value:
/// idem's own settings ride in the store URL but are not the client library's business.
fn take_param(url: &str, name: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), None);
    };
    let mut value = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.split_once('=') {
            Some((key, found)) if key == name => {
                value = Some(found.to_owned());
                false
            }
            _ => !pair.is_empty(),
        })
        .collect();
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (url, value)
}

/// Takes the TLS file settings out of a Redis URL's query.
fn take_tls_files(url: &str) -> (String, TlsFiles) {
    let (url, ca_file) = take_param(url, "ca_file");
    let (url, cert_file) = take_param(&url, "cert_file");
    let (url, key_file) = take_param(&url, "key_file");
    let files = TlsFiles {
        ca_file: ca_file.map(PathBuf::from),
        cert_file: cert_file.map(PathBuf::from),
        key_file: key_file.map(PathBuf::from),
    };
    (url, files)
}

/// The gateway's redb tuning: a 16 MiB page cache keeps its memory small; the operating
/// system's page cache holds the rest of a busy file.
fn gateway_redb_options() -> RedbOptions {
    RedbOptions {
        cache_size: 16 << 20,
        ..RedbOptions::default()
    }
}

/// Reads `fjall:DIR[?cache_mib=N&memtable_mib=N&shards=N]` (`rest` is what follows the
/// scheme).
fn parse_fjall(url: &str, rest: &str) -> Result<StoreUrl, StoreUrlError> {
    let bad = || StoreUrlError::BadFjall(url.to_owned());
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() {
        return Err(bad());
    }
    let (mut cache_mib, mut memtable_mib, mut shards) = (None, None, None);
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (name, value) = pair.split_once('=').ok_or_else(bad)?;
        let (setting, most) = match name {
            "cache_mib" => (&mut cache_mib, 65_536),
            "memtable_mib" => (&mut memtable_mib, 65_536),
            "shards" => (&mut shards, 64),
            _ => return Err(bad()),
        };
        let number = value
            .parse::<u64>()
            .ok()
            .filter(|number| (1..=most).contains(number))
            .ok_or_else(bad)?;
        *setting = Some(number);
    }
    Ok(StoreUrl::Fjall {
        path: PathBuf::from(path),
        cache_mib,
        memtable_mib,
        shards,
    })
}

/// The gateway's fjall tuning: the store's defaults (8 MiB of block cache, 8 MiB of
/// memory tables, 2 shards), unless the URL says otherwise.
fn gateway_fjall_options(
    cache_mib: Option<u64>,
    memtable_mib: Option<u64>,
    shards: Option<u64>,
) -> FjallOptions {
    let defaults = FjallOptions::default();
    FjallOptions {
        cache_size: cache_mib.map_or(defaults.cache_size, |mib| mib << 20),
        memtable_size: memtable_mib.map_or(defaults.memtable_size, |mib| mib << 20),
        // At most 64: the parser checked.
        shards: shards.map_or(defaults.shards, |n| n as usize),
        ..defaults
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_urls_carry_their_limits() {
        let parse = |url: &str| url.parse::<StoreUrl>().map_err(|e| e.to_string());
        let defaults = MemoryLimits::default();
        for url in ["memory", "memory:", "memory://", "memory:?"] {
            assert_eq!(parse(url).unwrap(), StoreUrl::Memory(defaults), "{url}");
        }
        assert_eq!(
            parse("memory:?max_records=10&max_bytes=64MiB").unwrap(),
            StoreUrl::Memory(defaults.max_records(10).max_bytes(64 << 20))
        );
        assert_eq!(
            parse("memory://?max_bytes=4096").unwrap(),
            StoreUrl::Memory(defaults.max_bytes(4096))
        );
        for bad in [
            "memory:?max_records=ten",
            "memory:?max_bytes=1TiB",
            "memory:?max_bytes=99999999999GiB",
            "memory:?size=1",
            "memory:?max_records",
            "memoryless:",
        ] {
            assert!(parse(bad).is_err(), "{bad} was accepted");
        }
        let url = parse("memory:?max_bytes=1KiB&max_records=5").unwrap();
        assert_eq!(url.to_string(), "memory:?max_records=5&max_bytes=1024");
        assert_eq!(parse(&url.to_string()).unwrap(), url);
        assert_eq!(parse("memory:").unwrap().to_string(), "memory:");
    }

    #[tokio::test]
    async fn a_fjall_url_opens_a_store_that_lists_claims_and_has_one_owner() {
        use std::time::Duration;

        use idem_core::testing::{fingerprint, scoped};

        let dir = tempfile::tempdir().unwrap();
        let url: StoreUrl = format!(
            "fjall:{}?cache_mib=2&shards=3",
            dir.path().join("s").display()
        )
        .parse()
        .unwrap();
        let store = url.open().await.unwrap();
        // The store keeps the count it was created with in this file.
        let shards = std::fs::read_to_string(dir.path().join("s").join("shards")).unwrap();
        assert_eq!(shards.trim(), "3");
        let key = scoped("k");
        store
            .begin(&key, &fingerprint("a"), Duration::from_secs(60))
            .await
            .unwrap();
        let held = store.in_flight(Duration::ZERO, 10).await.unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].key, key);
        match url.open().await {
            Err(StoreUrlError::OpenFjall(error)) => {
                assert!(error.to_string().contains("already open"), "{error}")
            }
            other => panic!("a second open should be refused, got {other:?}"),
        }
    }

    #[test]
    fn fjall_urls_take_a_directory_two_sizes_and_a_shard_count() {
        let parsed: StoreUrl = "fjall:/var/lib/idem?memtable_mib=4&cache_mib=32"
            .parse()
            .unwrap();
        assert_eq!(
            parsed,
            StoreUrl::Fjall {
                path: "/var/lib/idem".into(),
                cache_mib: Some(32),
                memtable_mib: Some(4),
                shards: None,
            }
        );
        assert_eq!(
            parsed.to_string(),
            "fjall:/var/lib/idem?cache_mib=32&memtable_mib=4"
        );
        let sharded: StoreUrl = "fjall:d?shards=64".parse().unwrap();
        assert_eq!(sharded.to_string(), "fjall:d?shards=64");
        assert_eq!(
            "fjall://idem.fjall"
                .parse::<StoreUrl>()
                .unwrap()
                .to_string(),
            "fjall:idem.fjall"
        );
        for bad in [
            "fjall:",
            "fjall:?cache_mib=8",
            "fjall:d?cache_mib=0",
            "fjall:d?cache_mib=x",
            "fjall:d?cache=8",
            "fjall:d?cache_mib",
            "fjall:d?shards=0",
            "fjall:d?shards=65",
        ] {
            assert!(
                matches!(bad.parse::<StoreUrl>(), Err(StoreUrlError::BadFjall(_))),
                "{bad} was accepted"
            );
        }
    }

    #[test]
    fn idem_parameters_are_taken_out_of_the_url() {
        assert_eq!(
            take_param("redis://h:1/0?prefix=p1&x=y", "prefix"),
            ("redis://h:1/0?x=y".to_owned(), Some("p1".to_owned()))
        );
        assert_eq!(
            take_param("redis://h:1?prefix=p1", "prefix"),
            ("redis://h:1".to_owned(), Some("p1".to_owned()))
        );
        assert_eq!(
            take_param("redis://h:1", "prefix"),
            ("redis://h:1".to_owned(), None)
        );
    }
}
