//! # idem-redb: the embedded, durable idem store
//!
//! Records live in one [redb](https://docs.rs/redb) file: nothing to install, and what
//! [`Store::complete`] returned `Ok` for survives a crash, a kill or a power cut (every
//! commit is fsynced before any caller is answered).
//!
//! One background thread owns all writes. It takes every request waiting for it, applies
//! them in one write transaction and commits once, so concurrent callers share an fsync
//! (group commit) instead of queueing for one each. Reads that need no write (replays,
//! in-flight and mismatch answers, `get`) go straight to a read transaction.
//!
//! Expired records are swept by that same thread, in bounded batches between groups of
//! writes, so a large backlog never stalls `begin`.
//!
//! A file has one owner: a second [`RedbStore`] on the same file, in this process or
//! another, fails to open with [`OpenError::AlreadyOpen`]. Several gateways that must
//! behave as one share a Redis or Postgres store instead.
//!
//! ```no_run
//! use std::time::Duration;
//! use idem::{Begin, Fingerprint, Key, Scope, ScopedKey, Store, Stored};
//! use idem_redb::RedbStore;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = RedbStore::open("idem.redb")?;
//! let key = ScopedKey::new(Scope::anonymous(), Key::new("pay-1")?);
//! let fingerprint = Fingerprint::builder().part("body", b"{}").finish();
//! if let Begin::Acquired(lease) = store.begin(&key, &fingerprint, Duration::from_secs(30)).await? {
//!     let outcome = Stored::new(201).with_body("charged");
//!     store.complete(&key, lease.token, &outcome, Duration::from_secs(86_400)).await?;
//! }
//! # Ok(()) }
//! ```

mod row;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use idem::{
    Begin, Clock, Fingerprint, Lease, Record, ScopedKey, Store, StoreError, Stored, SystemClock,
    Token, transition,
};
use redb::{ReadableDatabase, ReadableTableMetadata};
use tokio::sync::oneshot;

pub use redb;

use crate::row::RECORDS;
use crate::writer::{Job, Writer};

/// Why a redb file could not be opened as a store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Another store, in this process or another, has the file open.
    #[error(
        "{path} is already open by another idem process (or another store in this one); a redb \
         file has one owner: give each gateway its own file, or share Redis or Postgres"
    )]
    AlreadyOpen {
        /// The file.
        path: PathBuf,
    },
    /// redb could not open or create the file.
    #[error("cannot open the idem store at {path}")]
    Database {
        /// The file.
        path: PathBuf,
        /// redb's error.
        #[source]
        source: redb::Error,
    },
    /// The background writer thread could not be started.
    #[error("cannot start the store's writer thread")]
    Thread(#[source] std::io::Error),
}

/// Tuning for a [`RedbStore`]; the defaults suit a gateway.
#[derive(Debug, Clone)]
pub struct RedbOptions {
    /// The most requests one write transaction takes (default 1024).
    pub max_batch: usize,
    /// How often expired records are swept (default 1 s).
    pub sweep_interval: Duration,
    /// The most expired records one sweep step removes (default 512), which bounds how long a
    /// sweep holds up writes.
    pub sweep_batch: usize,
    /// redb's page cache, in bytes (default 64 MiB).
    pub cache_size: usize,
}

impl Default for RedbOptions {
    fn default() -> Self {
        Self {
            max_batch: 1024,
            sweep_interval: Duration::from_secs(1),
            sweep_batch: 512,
            cache_size: 64 << 20,
        }
    }
}

/// The embedded durable store. See the [crate docs](crate).
#[derive(Debug)]
pub struct RedbStore {
    db: Arc<redb::Database>,
    jobs: Option<mpsc::Sender<Job>>,
    writer: Option<JoinHandle<()>>,
    clock: Arc<dyn Clock>,
}

impl RedbStore {
    /// Opens (or creates) the store at `path`, on the system clock, with default options.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, OpenError> {
        Self::open_with(path, SystemClock, RedbOptions::default())
    }

    /// Opens (or creates) the store at `path` with the given clock and options.
    pub fn open_with(
        path: impl AsRef<Path>,
        clock: impl Clock,
        options: RedbOptions,
    ) -> Result<Self, OpenError> {
        let path = path.as_ref();
        let db = redb::Database::builder()
            .set_cache_size(options.cache_size)
            .create(path)
            .map_err(|error| match error {
                redb::DatabaseError::DatabaseAlreadyOpen => OpenError::AlreadyOpen {
                    path: path.to_owned(),
                },
                other => OpenError::Database {
                    path: path.to_owned(),
                    source: other.into(),
                },
            })?;
        let db = Arc::new(db);
        let clock: Arc<dyn Clock> = Arc::new(clock);
        let database_error = |source: redb::Error| OpenError::Database {
            path: path.to_owned(),
            source,
        };
        writer::create_tables(&db).map_err(database_error)?;
        let (jobs, inbox) = mpsc::channel();
        let writer = Writer::new(Arc::clone(&db), Arc::clone(&clock), options);
        let thread = std::thread::Builder::new()
            .name("idem-redb-writer".into())
            .spawn(move || writer.run(inbox))
            .map_err(OpenError::Thread)?;
        Ok(Self {
            db,
            jobs: Some(jobs),
            writer: Some(thread),
            clock,
        })
    }

    async fn write<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Job,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let stopped =
            || StoreError::backend("reach the writer thread", "the writer thread stopped");
        self.jobs
            .as_ref()
            .ok_or_else(stopped)?
            .send(make(reply))
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// How many records the file holds, live or expired but not yet swept.
    pub fn record_count(&self) -> Result<u64, StoreError> {
        let read_error = |e: redb::Error| StoreError::backend("count records", e);
        let txn = self.db.begin_read().map_err(|e| read_error(e.into()))?;
        let table = txn.open_table(RECORDS).map_err(|e| read_error(e.into()))?;
        table.len().map_err(|e| read_error(e.into()))
    }

    fn read(&self, key: &ScopedKey) -> Result<Option<Record>, StoreError> {
        let read_error = |e: redb::Error| StoreError::backend("read a record", e);
        let txn = self.db.begin_read().map_err(|e| read_error(e.into()))?;
        let table = txn.open_table(RECORDS).map_err(|e| read_error(e.into()))?;
        let row = table
            .get(key.digest().as_slice())
            .map_err(|e| read_error(e.into()))?;
        row.map(|bytes| row::decode(bytes.value())).transpose()
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        // Closing the channel lets the writer finish what is queued and exit; waiting for it
        // releases the file, so the same path can be opened again at once.
        self.jobs.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

#[async_trait]
impl Store for RedbStore {
    async fn begin(
        &self,
        key: &ScopedKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        // A live record answers without a write: replays, in-flight and mismatch never wait
        // for the writer or an fsync.
        let current = self.read(key)?;
        let now = self.clock.now();
        if transition::live(current.as_ref(), now).is_some() {
            let (answer, _) =
                transition::begin(current.as_ref(), fingerprint, now, lease, || Token::new(0));
            return Ok(answer);
        }
        self.write(|reply| Job::Begin {
            key: key.clone(),
            fingerprint: *fingerprint,
            lease,
            reply,
        })
        .await
    }

    async fn complete(
        &self,
        key: &ScopedKey,
        token: Token,
        stored: &Stored,
        retain: Duration,
    ) -> Result<SystemTime, StoreError> {
        self.write(|reply| Job::Complete {
            key: key.clone(),
            token,
            stored: stored.clone(),
            retain,
            reply,
        })
        .await
    }

    async fn release(&self, key: &ScopedKey, token: Token) -> Result<(), StoreError> {
        self.write(|reply| Job::Release {
            key: key.clone(),
            token,
            reply,
        })
        .await
    }

    async fn renew(
        &self,
        key: &ScopedKey,
        token: Token,
        lease: Duration,
    ) -> Result<Lease, StoreError> {
        self.write(|reply| Job::Renew {
            key: key.clone(),
            token,
            lease,
            reply,
        })
        .await
    }

    async fn get(&self, key: &ScopedKey) -> Result<Option<Record>, StoreError> {
        let now = self.clock.now();
        Ok(self.read(key)?.filter(|record| record.is_live(now)))
    }

    async fn delete(&self, key: &ScopedKey) -> Result<bool, StoreError> {
        self.write(|reply| Job::Delete {
            key: key.clone(),
            reply,
        })
        .await
    }

    async fn sweep(&self, limit: usize) -> Result<usize, StoreError> {
        self.write(|reply| Job::Sweep { limit, reply }).await
    }
}
