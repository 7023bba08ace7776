//! Shared by the test binaries: where Redis is, unique prefixes, and cleaning up after them.
#![allow(dead_code)] // Each test binary uses its own part of this module.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use idem_core::testing::{Subject, TimeTravel};
use idem_redis::fred::interfaces::{ClientLike, KeysInterface};
use idem_redis::fred::prelude::{Builder, Config};
use idem_redis::{RedisOptions, RedisStore};

/// The single Redis node under test: `REDIS_URL`, else the local default.
pub(crate) fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A random number, from the standard library's randomly seeded hasher.
pub(crate) fn random() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// A key prefix no other test (or test run) uses.
pub(crate) fn unique_prefix() -> String {
    format!("idem-test-{:016x}", random())
}

/// Options for a test store under its own prefix.
pub(crate) fn test_options(prefix: &str) -> RedisOptions {
    RedisOptions {
        prefix: prefix.to_owned(),
        ..RedisOptions::default()
    }
}

/// Deletes every key under `prefix` on a single node when dropped.
pub(crate) struct Cleanup {
    pub(crate) url: String,
    pub(crate) prefix: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (url, pattern) = (self.url.clone(), format!("{}:*", self.prefix));
        // Drop cannot await, and may run inside a runtime: clean up on a thread of its own.
        let cleaned = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            runtime.block_on(delete_matching(&url, &pattern))
        })
        .join();
        match cleaned {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => eprintln!("cleaning up {}: {error}", self.prefix),
            Err(_) => eprintln!("cleaning up {} panicked", self.prefix),
        }
    }
}

/// Deletes the keys matching `pattern` on the single node at `url`; returns how many.
pub(crate) async fn delete_matching(
    url: &str,
    pattern: &str,
) -> Result<usize, idem_redis::fred::error::Error> {
    let client = Builder::from_config(Config::from_url(url)?).build()?;
    client.init().await?;
    let mut cursor = "0".to_owned();
    let mut deleted = 0;
    loop {
        let (next, keys): (String, Vec<String>) = client
            .scan_page(cursor.clone(), pattern.to_owned(), Some(1000), None)
            .await?;
        if !keys.is_empty() {
            deleted += keys.len();
            client.del::<i64, _>(keys).await?;
        }
        if next == "0" {
            break;
        }
        cursor = next;
    }
    client.quit().await?;
    Ok(deleted)
}

/// A fresh single-node store under its own prefix, whose keys are deleted afterwards.
pub(crate) async fn single_node_subject() -> Subject<RedisStore> {
    let (url, prefix) = (redis_url(), unique_prefix());
    let store = RedisStore::connect_with(&url, test_options(&prefix))
        .await
        .unwrap_or_else(|error| panic!("cannot connect to {url}: {error:?}"));
    Subject::with_guard(store, TimeTravel::Real, Cleanup { url, prefix })
}

/// Generous bound for calls that must fail "within the timeout".
pub(crate) const PATIENCE: Duration = Duration::from_secs(10);
