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
//! writes, so a large backlog never stalls `begin`. An in-flight record whose lease ended
//! stays in the file one more lease length before it is swept (it reads as absent
//! meanwhile), so that its holder's late [`Store::complete`] still finds it.
//!
//! If that thread ever dies (it should not: every duration is checked before use, and a
//! failed transaction only fails its callers), [`Store::fatal_error`] says why and every
//! call fails at once with a [`StoreError::Backend`] naming the cause; reopen the store
//! (restart the process) to recover.
//!
//! A file has one owner: a second [`RedbStore`] on the same file, in this process or
//! another, fails to open with [`OpenError::AlreadyOpen`]. Several gateways that must
//! behave as one share a Redis or Postgres store instead.
//!
//! ```no_run
//! use std::time::Duration;
//! use idem_core::{Begin, Fingerprint, Key, Scope, ScopedKey, Store, Stored};
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
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use idem_core::{
    Begin, Clock, CommitCounters, Fingerprint, InFlightRecord, Lease, Record, RecordState,
    ScopedKey, Store, StoreCounters, StoreError, Stored, SystemClock, Token, from_unix_millis,
    transition, unix_millis,
};
use redb::{ReadableDatabase, ReadableTableMetadata};
use tokio::sync::oneshot;

pub use redb;

use crate::row::{CLAIMS, RECORDS};
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
    /// Why the writer thread died, once it has.
    writer_died: Arc<OnceLock<String>>,
    counters: Arc<CommitCounters>,
}

/// The error every call answers once the writer thread has died.
#[derive(Debug, thiserror::Error)]
#[error(
    "the idem-redb writer thread died ({0}); the store cannot serve until it is reopened \
     (restart the process)"
)]
struct WriterDied(String);

/// What a panic said, for the fatal error.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        format!("it panicked: {text}")
    } else if let Some(text) = payload.downcast_ref::<String>() {
        format!("it panicked: {text}")
    } else {
        "it panicked".to_owned()
    }
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
        let counters = Arc::new(CommitCounters::default());
        let writer = Writer::new(
            Arc::clone(&db),
            Arc::clone(&clock),
            options,
            Arc::clone(&counters),
        );
        let writer_died = Arc::new(OnceLock::new());
        let died = Arc::clone(&writer_died);
        let thread = std::thread::Builder::new()
            .name("idem-redb-writer".into())
            .spawn(move || {
                // A panic drops the inbox and every waiting reply as it unwinds, so callers
                // get an error at once instead of waiting forever; the reason is kept for
                // `fatal_error` and for every later call.
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                    writer.run(inbox)
                }));
                if let Err(payload) = ran {
                    let reason = panic_message(&*payload);
                    tracing::error!(%reason, "the idem-redb writer thread died");
                    let _ = died.set(reason);
                }
            })
            .map_err(OpenError::Thread)?;
        Ok(Self {
            db,
            jobs: Some(jobs),
            writer: Some(thread),
            clock,
            writer_died,
            counters,
        })
    }

    /// Fails at once if the writer thread has died.
    fn alive(&self, operation: &'static str) -> Result<(), StoreError> {
        match self.writer_died.get() {
            Some(reason) => Err(StoreError::backend(operation, WriterDied(reason.clone()))),
            None => Ok(()),
        }
    }

    async fn write<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Job,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || {
            let reason = self
                .writer_died
                .get()
                .cloned()
                .unwrap_or_else(|| "it stopped".to_owned());
            StoreError::backend("reach the writer thread", WriterDied(reason))
        };
        self.jobs
            .as_ref()
            .ok_or_else(stopped)?
            .send(make(reply))
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// How many records the file holds, live or expired but not yet swept.
    pub fn record_count(&self) -> Result<u64, StoreError> {
        self.alive("count records")?;
        let read_error = |e: redb::Error| StoreError::backend("count records", e);
        let txn = self.db.begin_read().map_err(|e| read_error(e.into()))?;
        let table = txn.open_table(RECORDS).map_err(|e| read_error(e.into()))?;
        table.len().map_err(|e| read_error(e.into()))
    }

    fn read(&self, key: &ScopedKey) -> Result<Option<row::Kept>, StoreError> {
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
        self.alive("begin")?;
        transition::span("begin", lease)?;
        // A live record answers without a write: replays, in-flight and mismatch never wait
        // for the writer or an fsync.
        let current = self.read(key)?.map(|kept| kept.record);
        let now = self.clock.now();
        if transition::live(current.as_ref(), now).is_some() {
            let (answer, _) =
                transition::begin(current.as_ref(), fingerprint, now, lease, || Token::new(0))?;
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
        self.alive("complete")?;
        transition::span("complete", retain)?;
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
        self.alive("release")?;
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
        self.alive("renew")?;
        transition::span("renew", lease)?;
        self.write(|reply| Job::Renew {
            key: key.clone(),
            token,
            lease,
            reply,
        })
        .await
    }

    async fn get(&self, key: &ScopedKey) -> Result<Option<Record>, StoreError> {
        self.alive("get")?;
        let now = self.clock.now();
        Ok(self
            .read(key)?
            .map(|kept| kept.record)
            .filter(|record| record.is_live(now)))
    }

    async fn delete(&self, key: &ScopedKey) -> Result<bool, StoreError> {
        self.alive("delete")?;
        self.write(|reply| Job::Delete {
            key: key.clone(),
            reply,
        })
        .await
    }

    async fn sweep(&self, limit: usize) -> Result<usize, StoreError> {
        self.alive("sweep")?;
        self.write(|reply| Job::Sweep { limit, reply }).await
    }

    // Walks the claim index oldest first: the work is the answer's length, plus entries of
    // records whose lease ended (the sweeper removes those).
    async fn in_flight(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> Result<Vec<InFlightRecord>, StoreError> {
        const OPERATION: &str = "list in-flight records";
        self.alive(OPERATION)?;
        let now = self.clock.now();
        let Some(cutoff) = now.checked_sub(older_than) else {
            return Ok(Vec::new());
        };
        let read_error = |e: redb::Error| StoreError::backend(OPERATION, e);
        let txn = self.db.begin_read().map_err(|e| read_error(e.into()))?;
        let claims = txn.open_table(CLAIMS).map_err(|e| read_error(e.into()))?;
        let records = txn.open_table(RECORDS).map_err(|e| read_error(e.into()))?;
        // Claims up to and including the cutoff's millisecond.
        let mut bound = [0u8; 40];
        bound[..8].copy_from_slice(&unix_millis(cutoff).saturating_add(1).to_be_bytes());
        let mut held = Vec::new();
        for entry in claims
            .range(..bound.as_slice())
            .map_err(|e| read_error(e.into()))?
        {
            if held.len() >= limit {
                break;
            }
            let (entry, _) = entry.map_err(|e| read_error(e.into()))?;
            let Some(row) = records
                .get(&entry.value()[8..])
                .map_err(|e| read_error(e.into()))?
            else {
                continue;
            };
            let kept = row::decode(row.value())?;
            let (Some(key), RecordState::InFlight { lease_expires_at }) =
                (kept.key, &kept.record.state)
            else {
                continue;
            };
            if kept.record.is_live(now) {
                held.push(InFlightRecord {
                    key,
                    token: kept.record.token,
                    claimed_at: from_unix_millis(kept.claimed_ms),
                    lease_expires_at: *lease_expires_at,
                });
            }
        }
        Ok(held)
    }

    fn fatal_error(&self) -> Option<String> {
        self.writer_died
            .get()
            .map(|reason| WriterDied(reason.clone()).to_string())
    }

    fn counters(&self) -> StoreCounters {
        // A scrape that cannot read the file says nothing rather than a wrong figure.
        self.counters.figures(self.record_count().ok())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use idem_core::testing::{fingerprint, scoped};
    use idem_core::{ManualClock, Stored};

    use super::*;

    /// Kills the writer thread the only way left: a job that exists for this test.
    fn crash_the_writer(store: &RedbStore) {
        store
            .jobs
            .as_ref()
            .expect("the store is open")
            .send(Job::Crash)
            .expect("the writer takes the job");
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.writer_died.get().is_none() {
            assert!(Instant::now() < deadline, "the writer did not die");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The call's answer, which must come within seconds: a dead writer never hangs a caller.
    async fn within<T>(call: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("a call on a dead store hung")
    }

    fn assert_writer_died<T: std::fmt::Debug>(result: Result<T, StoreError>, what: &str) {
        match result {
            Err(error @ StoreError::Backend { .. }) => {
                let source = std::error::Error::source(&error).map(ToString::to_string);
                let text = source.unwrap_or_default();
                assert!(
                    text.contains("writer thread died") && text.contains("told to crash"),
                    "{what}: unclear error {text:?}"
                );
            }
            other => panic!("{what} should fail because the writer died, got {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_writer_is_reported_and_every_call_fails_fast() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let clock = ManualClock::new();
        let store = RedbStore::open_with(
            dir.path().join("dead.redb"),
            clock.clone(),
            RedbOptions::default(),
        )
        .expect("open store");
        let (key, fp, lease) = (scoped("dead"), fingerprint("a"), Duration::from_secs(30));
        let Begin::Acquired(claim) = store.begin(&key, &fp, lease).await.unwrap() else {
            panic!("a new key is acquired")
        };
        assert_eq!(store.fatal_error(), None);

        crash_the_writer(&store);

        let reason = store.fatal_error().expect("a dead writer is fatal");
        assert!(reason.contains("told to crash"), "{reason}");
        let started = Instant::now();
        assert_writer_died(
            within(store.begin(&key, &fp, lease)).await,
            "begin of a held key",
        );
        assert_writer_died(
            within(store.begin(&scoped("fresh"), &fp, lease)).await,
            "begin of a fresh key",
        );
        assert_writer_died(
            within(store.complete(&key, claim.token, &Stored::new(200), lease)).await,
            "complete",
        );
        assert_writer_died(within(store.renew(&key, claim.token, lease)).await, "renew");
        assert_writer_died(within(store.release(&key, claim.token)).await, "release");
        assert_writer_died(within(store.get(&key)).await, "get");
        assert_writer_died(within(store.delete(&key)).await, "delete");
        assert_writer_died(within(store.sweep(10)).await, "sweep");
        assert_writer_died(store.record_count(), "record_count");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "calls failed fast"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_waiting_when_the_writer_dies_gets_an_error() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = RedbStore::open(dir.path().join("waiting.redb")).expect("open store");
        let jobs = store.jobs.clone().expect("the store is open");
        // The crash is queued first, so the begin behind it is never served.
        jobs.send(Job::Crash).expect("the writer takes the job");
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            store.begin(
                &scoped("waiting"),
                &fingerprint("a"),
                Duration::from_secs(30),
            ),
        )
        .await
        .expect("a caller waiting on a dead writer is answered");
        assert!(
            matches!(answer, Err(StoreError::Backend { .. })),
            "{answer:?}"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.fatal_error().is_none() {
            assert!(Instant::now() < deadline, "the death was not reported");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
