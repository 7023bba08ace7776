//! `--store URL`: which store the gateway keeps its records in.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use idem::{MemoryStore, Store};
use idem_redb::RedbStore;

/// A parsed store URL.
///
/// ```
/// use idem_cli::store_url::StoreUrl;
///
/// assert_eq!("memory:".parse::<StoreUrl>().unwrap(), StoreUrl::Memory);
/// assert_eq!(
///     "redb:data/idem.redb".parse::<StoreUrl>().unwrap(),
///     StoreUrl::Redb("data/idem.redb".into())
/// );
/// assert!("mysql://x".parse::<StoreUrl>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `memory:`: in this process only; gone on restart.
    Memory,
    /// `redb:PATH`: the embedded durable store in the file at PATH (created if absent).
    Redb(PathBuf),
}

/// Why a store URL is unusable.
#[derive(Debug, thiserror::Error)]
pub enum StoreUrlError {
    /// An unknown or malformed URL.
    #[error("`{0}` is not a store URL; use `memory:` or `redb:PATH`")]
    Unknown(String),
    /// `redb:` without a path.
    #[error("`{0}` names no file; use `redb:PATH`, e.g. `redb:idem.redb`")]
    NoPath(String),
    /// The store could not be opened.
    #[error("cannot open the store")]
    Open(#[source] idem_redb::OpenError),
}

impl std::str::FromStr for StoreUrl {
    type Err = StoreUrlError;

    fn from_str(url: &str) -> Result<Self, StoreUrlError> {
        if matches!(url, "memory" | "memory:" | "memory://") {
            return Ok(Self::Memory);
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
            Self::Memory => f.write_str("memory:"),
            Self::Redb(path) => write!(f, "redb:{}", path.display()),
        }
    }
}

impl StoreUrl {
    /// Opens the store. Call it inside a tokio runtime: the memory store's sweeper is a task.
    pub fn open(&self) -> Result<Arc<dyn Store>, StoreUrlError> {
        Ok(match self {
            Self::Memory => {
                let store = Arc::new(MemoryStore::new());
                idem::spawn_sweeper(Arc::clone(&store), Duration::from_secs(1), 1024);
                store
            }
            // redb sweeps on its own writer thread.
            Self::Redb(path) => Arc::new(RedbStore::open(path).map_err(StoreUrlError::Open)?),
        })
    }
}
