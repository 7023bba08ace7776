//! # idem-fjall: the embedded, durable idem store on an LSM engine
//!
//! Records live in one directory managed by [fjall](https://docs.rs/fjall), a log-structured
//! (LSM) engine: a write is an append to its journal and an insert into a memory table, and
//! sorted files are written and merged in the background. New random keys, which is what
//! an idempotency store mostly writes, cost an append instead of a rewrite of B-tree pages.
//! Nothing to install, and what [`Store::complete`] returned `Ok` for survives a crash, a
//! kill or a power cut: every write reaches the journal and is `fdatasync`ed before any
//! caller is answered, and before any reader can see it.
//!
//! Keys are split by digest over a few shards ([`FjallOptions::shards`], default 2), each a
//! fjall database of its own with one background thread that owns its writes. That thread
//! takes every request waiting for it, decides them in order against the records (and
//! against what earlier requests of the same group decided), writes the group as one atomic
//! batch and syncs the journal once, so concurrent callers share an `fdatasync` (group
//! commit); the shards sync at the same time, because a disk answers several concurrent
//! syncs in about the time of one. Reads that need no write (replays, in-flight and
//! mismatch answers, `get`, [`Store::in_flight`]) go straight to the engine.
//!
//! Expired records are swept by that same thread, in bounded batches between groups of
//! writes, so a large backlog never stalls `begin`. An in-flight record whose lease ended
//! stays one more lease length before it is swept (it reads as absent meanwhile), so that
//! its holder's late [`Store::complete`] still finds it.
//!
//! Memory is bounded by [`FjallOptions::cache_size`] (the block cache) and
//! [`FjallOptions::memtable_size`] (writes not yet in sorted files), not by the number of
//! records.
//!
//! If a writer thread ever dies (a panic, or a group the engine could not make durable),
//! [`Store::fatal_error`] says why and every call fails at once with a
//! [`StoreError::Backend`] naming the cause; reopen the store (restart the process) to
//! recover.
//!
//! A directory has one owner: a second [`FjallStore`] on it, in this process or another,
//! fails to open with [`OpenError::AlreadyOpen`].
//!
//! ```no_run
//! use std::time::Duration;
//! use idem_core::{Begin, Fingerprint, Key, Scope, ScopedKey, Store, Stored};
//! use idem_fjall::FjallStore;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = FjallStore::open("idem.fjall")?;
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
use std::sync::atomic::AtomicU64;
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use fjall::{Database, KeyspaceCreateOptions};
use idem_core::{
    Begin, Clock, CommitCounters, Fingerprint, InFlightRecord, Lease, Record, RecordState,
    ScopedKey, Store, StoreCounters, StoreError, Stored, SystemClock, Token, from_unix_millis,
    transition, unix_millis,
};
use tokio::sync::oneshot;

pub use fjall;

use crate::writer::{Job, Keyspaces, Writer};

/// Why a directory could not be opened as a store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Another store, in this process or another, has the directory open.
    #[error(
        "{path} is already open by another idem process (or another store in this one); a \
         store directory has one owner: give each gateway its own, or share Redis or Postgres"
    )]
    AlreadyOpen {
        /// The directory.
        path: PathBuf,
    },
    /// fjall could not open or create the store.
    #[error("cannot open the idem store at {path}")]
    Database {
        /// The directory.
        path: PathBuf,
        /// fjall's error.
        #[source]
        source: fjall::Error,
    },
    /// The store's own records could not be read.
    #[error("cannot read the idem store at {path}")]
    Store {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: StoreError,
    },
    /// The background writer thread could not be started.
    #[error("cannot start the store's writer thread")]
    Thread(#[source] std::io::Error),
}

/// Tuning for a [`FjallStore`]; the defaults suit a gateway.
///
/// ```
/// use idem_fjall::FjallOptions;
///
/// let small = FjallOptions {
///     cache_size: 4 << 20,
///     memtable_size: 4 << 20,
///     ..FjallOptions::default()
/// };
/// assert_eq!(small.max_batch, FjallOptions::default().max_batch);
/// ```
#[derive(Debug, Clone)]
pub struct FjallOptions {
    /// The most requests one group takes (default 1024).
    pub max_batch: usize,
    /// How often expired records are swept (default 1 s).
    pub sweep_interval: Duration,
    /// The most expired records one sweep step removes (default 512), which bounds how long a
    /// sweep holds up writes.
    pub sweep_batch: usize,
    /// The block cache for reads, in bytes (default 8 MiB).
    pub cache_size: u64,
    /// How many bytes of records are kept in memory before they are written out as a sorted
    /// file (default 8 MiB); each of the two indexes gets a quarter of it. Up to twice this
    /// can be in memory while a full table is being written out. Both budgets are for the
    /// whole store: each shard gets its share.
    pub memtable_size: u64,
    /// How many shards a new store is split into (default 2, at most 64): each has its own
    /// journal and writer thread, so that many journal syncs are in flight at once (a disk
    /// answers several concurrent syncs in about the time of one). Keys are placed by
    /// digest; an existing store keeps the count it was created with.
    pub shards: usize,
}

impl Default for FjallOptions {
    fn default() -> Self {
        Self {
            max_batch: 1024,
            sweep_interval: Duration::from_secs(1),
            sweep_batch: 512,
            cache_size: 8 << 20,
            memtable_size: 8 << 20,
            shards: 2,
        }
    }
}

/// The embedded durable store on fjall. See the [crate docs](crate).
///
/// ```
/// use std::time::Duration;
/// use idem_core::{Fingerprint, Key, Scope, ScopedKey, Store, SystemClock};
/// use idem_fjall::{FjallOptions, FjallStore, OpenError};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let options = FjallOptions { shards: 2, ..FjallOptions::default() };
/// let store = FjallStore::open_with(dir.path().join("idem"), SystemClock, options)?;
/// assert_eq!(store.shard_count(), 2);
///
/// let key = ScopedKey::new(Scope::anonymous(), Key::new("pay-1")?);
/// let fingerprint = Fingerprint::builder().part("body", b"{}").finish();
/// store.begin(&key, &fingerprint, Duration::from_secs(30)).await?;
/// assert_eq!(store.record_count()?, 1);
///
/// // One owner per directory.
/// assert!(matches!(
///     FjallStore::open(dir.path().join("idem")),
///     Err(OpenError::AlreadyOpen { .. })
/// ));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct FjallStore {
    shards: Vec<Shard>,
    clock: Arc<dyn Clock>,
    counters: Arc<CommitCounters>,
}

/// One shard: its own database (journal, memory tables, files) and its own writer thread.
#[derive(Debug)]
struct Shard {
    ks: Keyspaces,
    jobs: Option<mpsc::Sender<Job>>,
    writer: Option<JoinHandle<()>>,
    /// Why the writer thread died, once it has.
    writer_died: Arc<OnceLock<String>>,
}

/// The error every call answers once a writer thread has died.
#[derive(Debug, thiserror::Error)]
#[error(
    "the idem-fjall writer thread died ({0}); the store cannot serve until it is reopened \
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

/// The file in the store's directory that fixes its number of shards: records are placed
/// by key, so an existing store keeps the count it was created with.
const SHARDS_FILE: &str = "shards";
const MAX_SHARDS: usize = 64;

impl FjallStore {
    /// Opens (or creates) the store in the directory `path`, on the system clock, with
    /// default options.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, OpenError> {
        Self::open_with(path, SystemClock, FjallOptions::default())
    }

    /// Opens (or creates) the store in the directory `path` with the given clock and
    /// options. An existing store keeps the number of shards it was created with, whatever
    /// [`FjallOptions::shards`] says.
    pub fn open_with(
        path: impl AsRef<Path>,
        clock: impl Clock,
        options: FjallOptions,
    ) -> Result<Self, OpenError> {
        let path = path.as_ref();
        let io_error = |source: std::io::Error| OpenError::Database {
            path: path.to_owned(),
            source: fjall::Error::Io(source),
        };
        std::fs::create_dir_all(path).map_err(io_error)?;
        // The first shard's lock makes this process the directory's owner before the shard
        // count is read or written.
        let first = open_shard(&path.join("shard-0"), &options, options.shards.max(1))?;
        let count_file = path.join(SHARDS_FILE);
        let count = match std::fs::read_to_string(&count_file) {
            Ok(text) => text
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=MAX_SHARDS).contains(n))
                .ok_or_else(|| OpenError::Store {
                    path: path.to_owned(),
                    source: StoreError::corrupt(format!("{SHARDS_FILE} holds {text:?}")),
                })?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let count = options.shards.clamp(1, MAX_SHARDS);
                write_durably(path, &count_file, &format!("{count}\n")).map_err(io_error)?;
                count
            }
            Err(error) => return Err(io_error(error)),
        };
        let mut keyspaces = vec![first];
        for shard in 1..count {
            keyspaces.push(open_shard(
                &path.join(format!("shard-{shard}")),
                &options,
                count,
            )?);
        }
        let mut last_token = 0;
        for ks in &keyspaces {
            let last = writer::last_token(ks).map_err(|source| OpenError::Store {
                path: path.to_owned(),
                source,
            })?;
            last_token = last_token.max(last);
        }
        let tokens = Arc::new(AtomicU64::new(last_token));
        let counters = Arc::new(CommitCounters::default());
        let clock: Arc<dyn Clock> = Arc::new(clock);
        let mut shards = Vec::with_capacity(count);
        for (n, ks) in keyspaces.into_iter().enumerate() {
            let writer = Writer::new(
                ks.clone(),
                Arc::clone(&clock),
                options.clone(),
                Arc::clone(&tokens),
                Arc::clone(&counters),
            );
            let (jobs, inbox) = mpsc::channel();
            let writer_died = Arc::new(OnceLock::new());
            let died = Arc::clone(&writer_died);
            let thread = std::thread::Builder::new()
                .name(format!("idem-fjall-writer-{n}"))
                .spawn(move || {
                    // A panic drops the inbox and every waiting reply as it unwinds, so
                    // callers get an error at once instead of waiting forever; the reason
                    // is kept for `fatal_error` and for every later call.
                    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                        writer.run(inbox)
                    }));
                    let reason = match ran {
                        Ok(Ok(())) => return,
                        Ok(Err(error)) => format!("a group could not be made durable: {error}"),
                        Err(payload) => panic_message(&*payload),
                    };
                    tracing::error!(%reason, "an idem-fjall writer thread died");
                    let _ = died.set(reason);
                })
                .map_err(OpenError::Thread)?;
            shards.push(Shard {
                ks,
                jobs: Some(jobs),
                writer: Some(thread),
                writer_died,
            });
        }
        Ok(Self {
            shards,
            clock,
            counters,
        })
    }

    /// The shard that holds `key`.
    fn shard(&self, key: &ScopedKey) -> &Shard {
        let digest = key.digest();
        let n = usize::from(u16::from_be_bytes([digest[0], digest[1]]));
        &self.shards[n % self.shards.len()]
    }

    /// Why the store cannot serve, if a writer thread has died.
    fn died(&self) -> Option<&String> {
        self.shards.iter().find_map(|shard| shard.writer_died.get())
    }

    /// Fails at once if a writer thread has died: the store then stops as a whole, whichever
    /// shard a key lives in.
    fn alive(&self, operation: &'static str) -> Result<(), StoreError> {
        match self.died() {
            Some(reason) => Err(StoreError::backend(operation, WriterDied(reason.clone()))),
            None => Ok(()),
        }
    }

    async fn write<T>(
        &self,
        shard: &Shard,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Job,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || {
            let reason = self
                .died()
                .cloned()
                .unwrap_or_else(|| "it stopped".to_owned());
            StoreError::backend("reach the writer thread", WriterDied(reason))
        };
        shard
            .jobs
            .as_ref()
            .ok_or_else(stopped)?
            .send(make(reply))
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// How many records the store holds, live or expired but not yet swept. This counts
    /// them one by one: for tests and tools, not for a hot path.
    pub fn record_count(&self) -> Result<u64, StoreError> {
        self.alive("count records")?;
        let mut count = 0;
        for shard in &self.shards {
            let records = shard
                .ks
                .records
                .len()
                .map_err(|e| StoreError::backend("count records", e))?;
            count += records as u64;
        }
        Ok(count)
    }

    /// How many shards the store has (fixed when it was created).
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    fn read(&self, key: &ScopedKey) -> Result<Option<row::Kept>, StoreError> {
        self.shard(key)
            .ks
            .records
            .get(key.digest())
            .map_err(|e| StoreError::backend("read a record", e))?
            .map(|bytes| row::decode(&bytes))
            .transpose()
    }
}

/// Opens one shard's database and keyspaces, with its share of the memory budget.
fn open_shard(path: &Path, options: &FjallOptions, count: usize) -> Result<Keyspaces, OpenError> {
    let database_error = |source: fjall::Error| match source {
        fjall::Error::Locked => OpenError::AlreadyOpen {
            path: path.parent().unwrap_or(path).to_owned(),
        },
        source => OpenError::Database {
            path: path.to_owned(),
            source,
        },
    };
    let count = count as u64;
    let db = Database::builder(path)
        .cache_size((options.cache_size / count).max(1 << 20))
        .worker_threads(1)
        .open()
        .map_err(database_error)?;
    let memtable = (options.memtable_size / count).max(1 << 20);
    let keyspace = |name: &str, memtable: u64| {
        db.keyspace(name, || {
            KeyspaceCreateOptions::default().max_memtable_size(memtable)
        })
        .map_err(database_error)
    };
    Ok(Keyspaces {
        records: keyspace(row::RECORDS, memtable)?,
        expiry: keyspace(row::EXPIRY, (memtable / 4).max(1 << 20))?,
        claims: keyspace(row::CLAIMS, (memtable / 4).max(1 << 20))?,
        meta: keyspace(row::META, 1 << 20)?,
        db: db.clone(),
    })
}

/// Writes a small file so that it survives a power cut once this returns.
fn write_durably(dir: &Path, file: &Path, text: &str) -> std::io::Result<()> {
    let temporary = file.with_extension("tmp");
    {
        let mut out = std::fs::File::create(&temporary)?;
        std::io::Write::write_all(&mut out, text.as_bytes())?;
        out.sync_all()?;
    }
    std::fs::rename(&temporary, file)?;
    std::fs::File::open(dir)?.sync_all()
}

impl Drop for FjallStore {
    fn drop(&mut self) {
        // Closing the channels lets the writers finish what is queued and exit; waiting for
        // them lets the directory be opened again once the engine's handles are gone.
        for shard in &mut self.shards {
            shard.jobs.take();
        }
        for shard in &mut self.shards {
            if let Some(writer) = shard.writer.take() {
                let _ = writer.join();
            }
        }
    }
}

#[async_trait]
impl Store for FjallStore {
    async fn begin(
        &self,
        key: &ScopedKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        self.alive("begin")?;
        transition::span("begin", lease)?;
        // A live record answers without a write: replays, in-flight and mismatch never wait
        // for the writer or an fsync. What a reader sees was synced before it was visible.
        let current = self.read(key)?.map(|kept| kept.record);
        let now = self.clock.now();
        if transition::live(current.as_ref(), now).is_some() {
            let (answer, _) =
                transition::begin(current.as_ref(), fingerprint, now, lease, || Token::new(0))?;
            return Ok(answer);
        }
        self.write(self.shard(key), |reply| Job::Begin {
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
        self.write(self.shard(key), |reply| Job::Complete {
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
        self.write(self.shard(key), |reply| Job::Release {
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
        self.write(self.shard(key), |reply| Job::Renew {
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
        self.write(self.shard(key), |reply| Job::Delete {
            key: key.clone(),
            reply,
        })
        .await
    }

    async fn sweep(&self, limit: usize) -> Result<usize, StoreError> {
        self.alive("sweep")?;
        // Shard after shard, until `limit` is used up: the work stays bounded by `limit`
        // (plus one empty scan per shard).
        let mut removed = 0;
        for shard in &self.shards {
            let left = limit - removed;
            if left == 0 {
                break;
            }
            removed += self
                .write(shard, |reply| Job::Sweep { limit: left, reply })
                .await?;
        }
        Ok(removed)
    }

    // Walks the claim index oldest first: the work is the answer's length, plus entries of
    // records whose lease ended (the sweeper removes those) and tombstones of entries
    // removed since the engine last compacted that range.
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
        // Claims up to and including the cutoff's millisecond.
        let bound = row::entry(unix_millis(cutoff).saturating_add(1), &[0; 32]);
        let mut held = Vec::new();
        for shard in &self.shards {
            shard.in_flight(&bound, limit, now, &mut held)?;
        }
        // The oldest `limit` of every shard's oldest `limit`.
        held.sort_by_key(|record| record.claimed_at);
        held.truncate(limit);
        Ok(held)
    }

    fn fatal_error(&self) -> Option<String> {
        self.died()
            .map(|reason| WriterDied(reason.clone()).to_string())
    }

    fn counters(&self) -> StoreCounters {
        // Counting records is a scan of every shard (see `record_count`): too much for a
        // metrics scrape, so the figure is left out rather than guessed.
        self.counters.figures(None)
    }
}

impl Shard {
    /// Adds to `held` up to `limit` of this shard's in-flight records claimed before
    /// `bound`, oldest first.
    fn in_flight(
        &self,
        bound: &row::Entry,
        limit: usize,
        now: SystemTime,
        held: &mut Vec<InFlightRecord>,
    ) -> Result<(), StoreError> {
        const OPERATION: &str = "list in-flight records";
        let mut found = 0;
        for item in self.ks.claims.range(..*bound) {
            if found >= limit {
                break;
            }
            let entry = item.key().map_err(|e| StoreError::backend(OPERATION, e))?;
            let Some((_, digest)) = row::split_entry(&entry) else {
                continue;
            };
            let Some(bytes) = self
                .ks
                .records
                .get(digest)
                .map_err(|e| StoreError::backend(OPERATION, e))?
            else {
                continue;
            };
            let kept = row::decode(&bytes)?;
            if kept.claim_entry(&digest).as_ref().map(|e| e.as_slice()) != Some(&*entry) {
                continue;
            }
            let (Some(key), RecordState::InFlight { lease_expires_at }) =
                (kept.key, &kept.record.state)
            else {
                continue;
            };
            if kept.record.is_live(now) {
                found += 1;
                held.push(InFlightRecord {
                    key,
                    token: kept.record.token,
                    claimed_at: from_unix_millis(kept.claimed_ms),
                    lease_expires_at: *lease_expires_at,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use idem_core::testing::{fingerprint, scoped};
    use idem_core::{ManualClock, Stored};

    use super::*;

    /// Kills the writer thread the only way left: a job that exists for this test.
    fn crash_the_writer(store: &FjallStore) {
        store.shards[0]
            .jobs
            .as_ref()
            .expect("the store is open")
            .send(Job::Crash)
            .expect("the writer takes the job");
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.died().is_none() {
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
        let store = FjallStore::open_with(
            dir.path().join("dead"),
            clock.clone(),
            FjallOptions::default(),
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
    async fn one_group_sees_its_own_writes_and_writes_each_key_once() {
        // Two begins of one new key in one group: the second must see the first's claim,
        // and the group's batch must hold the key once (one sequence number per batch).
        let dir = tempfile::tempdir().expect("temporary directory");
        let options = FjallOptions {
            shards: 1,
            ..FjallOptions::default()
        };
        let store = FjallStore::open_with(dir.path().join("group"), SystemClock, options);
        let store = Arc::new(store.expect("open store"));
        let (fp, lease) = (fingerprint("a"), Duration::from_secs(30));
        let mut tasks = Vec::new();
        for round in 0..64 {
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                let key = scoped(&format!("group-{}", round % 4));
                store.begin(&key, &fp, lease).await.unwrap()
            }));
        }
        let mut acquired = 0;
        for task in tasks {
            if matches!(task.await.unwrap(), Begin::Acquired(_)) {
                acquired += 1;
            }
        }
        assert_eq!(acquired, 4);
        assert_eq!(store.record_count().unwrap(), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counters_tell_commits_their_operations_and_sweeps() {
        // What /metrics shows as idem_store_commits_total, …_committed_operations_total and
        // idem_store_swept_records_total for the default store.
        let dir = tempfile::tempdir().expect("temporary directory");
        let clock = ManualClock::new();
        // No background sweep: the test sweeps when it wants to. One shard, so that one
        // sweep is one commit.
        let options = FjallOptions {
            shards: 1,
            sweep_interval: Duration::from_secs(3600),
            ..FjallOptions::default()
        };
        let store = FjallStore::open_with(dir.path().join("counted"), clock.clone(), options)
            .expect("open store");
        assert_eq!(
            store.counters(),
            StoreCounters {
                records: None,
                swept: Some(0),
                commits: Some(0),
                committed_operations: Some(0),
            }
        );
        let (fp, lease) = (fingerprint("a"), Duration::from_secs(30));
        for n in 0..3 {
            let key = scoped(&format!("counted-{n}"));
            let Begin::Acquired(claim) = store.begin(&key, &fp, lease).await.unwrap() else {
                panic!("a new key is acquired")
            };
            store
                .complete(
                    &key,
                    claim.token,
                    &Stored::new(201),
                    Duration::from_secs(60),
                )
                .await
                .unwrap();
        }
        let counted = store.counters();
        // One call at a time: each is a commit of its own.
        assert_eq!(counted.commits, Some(6));
        assert_eq!(counted.committed_operations, Some(6));
        assert_eq!(counted.swept, Some(0));

        clock.advance(Duration::from_secs(61));
        assert_eq!(store.sweep(100).await.unwrap(), 3);
        let swept = store.counters();
        assert_eq!(swept.swept, Some(3));
        assert_eq!(swept.commits, Some(7));
        assert_eq!(swept.committed_operations, Some(7));
    }
}
