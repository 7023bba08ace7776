//! The shared services tests run against (Redis, Postgres): where they are, and a
//! namespace of each test's own that is removed when the test ends.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

/// The Redis under test: `REDIS_URL`, else `redis://127.0.0.1:6379`.
///
/// ```
/// assert!(idem_testkit::redis_url().starts_with("redis"));
/// ```
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// The Postgres under test: `DATABASE_URL`, else `postgres://postgres@127.0.0.1:5432/test`.
///
/// ```
/// assert!(idem_testkit::database_url().starts_with("postgres"));
/// ```
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A number no other call in this process, and most likely no other process, returns.
///
/// ```
/// assert_ne!(idem_testkit::unique(), idem_testkit::unique());
/// ```
pub fn unique() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    (u64::from(std::process::id()) << 32) ^ nanos ^ NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The numeric `host:port` of a service URL (`scheme://[user@]host:port[/…][?…]`).
///
/// ```
/// use idem_testkit::host_port;
///
/// assert_eq!(host_port("postgres://u@127.0.0.1:5432/db").to_string(), "127.0.0.1:5432");
/// assert_eq!(host_port("redis://127.0.0.1:6379/?prefix=p").port(), 6379);
/// ```
pub fn host_port(url: &str) -> SocketAddr {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let host = rest.split(['/', '?']).next().unwrap_or(rest);
    host.parse()
        .expect("a service URL with a numeric host:port")
}

/// A Redis key prefix of a test's own; its keys are deleted when it is dropped.
///
/// ```no_run
/// use idem_testkit::RedisPrefix;
///
/// let prefix = RedisPrefix::new("doc");
/// assert!(prefix.name().starts_with("idem-test-doc-"));
/// assert!(prefix.store_url(None).ends_with(&format!("/?prefix={}", prefix.name())));
/// ```
pub struct RedisPrefix(String);

impl RedisPrefix {
    /// `idem-test-TEST-UNIQUE`.
    pub fn new(test: &str) -> Self {
        Self(format!("idem-test-{test}-{}", unique()))
    }

    /// The prefix.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// An idem store URL for this prefix on [`redis_url`], or on `via` (a relay such as a
    /// [`FaultProxy`](crate::FaultProxy) in front of it) when given.
    pub fn store_url(&self, via: Option<SocketAddr>) -> String {
        match via {
            Some(addr) => format!("redis://{addr}/?prefix={}", self.0),
            None => format!("{}/?prefix={}", redis_url().trim_end_matches('/'), self.0),
        }
    }
}

impl Drop for RedisPrefix {
    fn drop(&mut self) {
        let script = format!(
            "redis-cli -u {url} --scan --pattern '{prefix}:*' | xargs -r redis-cli -u {url} del >/dev/null",
            url = redis_url(),
            prefix = self.0,
        );
        let _ = Command::new("sh").args(["-c", &script]).status();
    }
}

/// A Postgres schema of a test's own, created now and dropped (with everything in it)
/// when this is dropped.
///
/// ```no_run
/// use idem_testkit::PostgresSchema;
///
/// let schema = PostgresSchema::new("doc");
/// assert!(schema.store_url(None).ends_with(&format!("?table={}.records", schema.name())));
/// ```
pub struct PostgresSchema(String);

impl PostgresSchema {
    /// `idem_test_TEST_UNIQUE`, created with `psql`.
    pub fn new(test: &str) -> Self {
        let schema = format!("idem_test_{test}_{}", unique() % 1_000_000_007);
        psql(&format!("CREATE SCHEMA {schema}"));
        Self(schema)
    }

    /// The schema's name.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// An idem store URL for a `records` table in this schema on [`database_url`], or on
    /// `via` (a relay in front of it, same user and database) when given.
    pub fn store_url(&self, via: Option<SocketAddr>) -> String {
        let url = database_url();
        let table = format!("table={}.records", self.0);
        let Some(addr) = via else {
            return format!("{url}?{table}");
        };
        let user = url
            .split_once("://")
            .and_then(|(_, rest)| rest.split_once('@'))
            .map_or("postgres", |(user, _)| user);
        let database = url.rsplit_once('/').map_or("test", |(_, db)| db);
        format!("postgres://{user}@{addr}/{database}?{table}")
    }
}

impl Drop for PostgresSchema {
    fn drop(&mut self) {
        psql(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.0));
    }
}

/// Runs one SQL statement on [`database_url`] with `psql`; panics if it fails.
pub fn psql(sql: &str) {
    let status = Command::new("psql")
        .args([
            database_url().as_str(),
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .stdout(Stdio::null())
        .status()
        .expect("psql runs");
    assert!(status.success(), "psql failed: {sql}");
}
