//! The one thread that writes: group commit and background sweeping.

use std::collections::HashMap;
use std::collections::hash_map::Entry as Slot;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};

use fjall::{Database, Keyspace, PersistMode};
use idem_core::{
    Begin, Clock, CommitCounters, Fingerprint, Lease, Record, ScopedKey, StoreError, Stored, Token,
    transition, unix_millis,
};
use tokio::sync::oneshot;

use crate::FjallOptions;
use crate::row::{self, Digest, Entry, Kept, LAST_TOKEN};

/// The last token a shard made durable, 0 for a new one.
pub(crate) fn last_token(ks: &Keyspaces) -> Result<u64, StoreError> {
    let stored = ks
        .meta
        .get(LAST_TOKEN)
        .map_err(|e| StoreError::backend("read the last token", e))?;
    match stored {
        None => Ok(0),
        Some(bytes) => {
            Ok(u64::from_be_bytes(bytes.as_ref().try_into().map_err(
                |_| StoreError::corrupt("the last token is not 8 bytes"),
            )?))
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// The database and its keyspaces.
#[derive(Clone)]
pub(crate) struct Keyspaces {
    pub(crate) db: Database,
    pub(crate) records: Keyspace,
    pub(crate) expiry: Keyspace,
    pub(crate) claims: Keyspace,
    pub(crate) meta: Keyspace,
}

impl std::fmt::Debug for Keyspaces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyspaces").finish_non_exhaustive()
    }
}

/// A write request, answered once its group is durable.
#[derive(Debug)]
pub(crate) enum Job {
    Begin {
        key: ScopedKey,
        fingerprint: Fingerprint,
        lease: Duration,
        reply: Reply<Begin>,
    },
    Complete {
        key: ScopedKey,
        token: Token,
        stored: Stored,
        retain: Duration,
        reply: Reply<SystemTime>,
    },
    Release {
        key: ScopedKey,
        token: Token,
        reply: Reply<()>,
    },
    Renew {
        key: ScopedKey,
        token: Token,
        lease: Duration,
        reply: Reply<Lease>,
    },
    Delete {
        key: ScopedKey,
        reply: Reply<bool>,
    },
    Sweep {
        limit: usize,
        reply: Reply<usize>,
    },
    /// Makes the writer thread panic, for tests of what a dead writer looks like.
    #[cfg(test)]
    Crash,
}

/// Sends a job's answer once the fate of its group is known.
type Finish = Box<dyn FnOnce(Option<&str>) + Send>;

fn finish<T: Send + 'static>(reply: Reply<T>, result: Result<T, StoreError>) -> Finish {
    Box::new(move |failed| {
        let answer = match failed {
            None => result,
            Some(error) => Err(StoreError::backend(
                "write a group of records",
                error.to_owned(),
            )),
        };
        // The caller may have given up waiting; its answer is then nobody's business.
        let _ = reply.send(answer);
    })
}

pub(crate) struct Writer {
    ks: Keyspaces,
    clock: Arc<dyn Clock>,
    options: FjallOptions,
    last_sweep: Instant,
    /// The last token handed out by any shard: tokens grow store-wide, so they grow per key
    /// whichever shard a key lives in.
    tokens: Arc<AtomicU64>,
    /// Shared by every shard's writer.
    counters: Arc<CommitCounters>,
    /// Where the next sweep starts scanning the expiry index: the time of the last entry a
    /// sweep removed. Entries before it are gone, but their tombstones stay until a
    /// compaction drops them; starting here keeps a sweep's work its `limit`, not the
    /// number of tombstones left by earlier sweeps.
    sweep_from: u64,
    /// The clock at the last sweep: a clock that went back could file new entries before
    /// `sweep_from`, so the scan then starts over from the beginning.
    swept_at: u64,
}

impl Writer {
    pub(crate) fn new(
        ks: Keyspaces,
        clock: Arc<dyn Clock>,
        options: FjallOptions,
        tokens: Arc<AtomicU64>,
        counters: Arc<CommitCounters>,
    ) -> Self {
        Self {
            ks,
            clock,
            options,
            last_sweep: Instant::now(),
            tokens,
            counters,
            sweep_from: 0,
            swept_at: 0,
        }
    }

    /// Serves jobs until every sender is gone, or until a group cannot be made durable:
    /// then what is visible may not match what is on disk, so the writer stops for good and
    /// says why.
    pub(crate) fn run(mut self, inbox: Receiver<Job>) -> Result<(), fjall::Error> {
        loop {
            let first = match inbox.recv_timeout(self.options.sweep_interval) {
                Ok(job) => Some(job),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            };
            // Everything that queued up while the last group was syncing goes into this one.
            let mut batch: Vec<Job> = first.into_iter().collect();
            while batch.len() < self.options.max_batch {
                match inbox.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            let sweep_due = self.last_sweep.elapsed() >= self.options.sweep_interval;
            if sweep_due {
                self.last_sweep = Instant::now();
            }
            self.commit_group(batch, sweep_due)?;
        }
    }

    fn commit_group(&mut self, batch: Vec<Job>, sweep_due: bool) -> Result<(), fjall::Error> {
        let operations = batch.len() as u64;
        let mut finishers: Vec<Finish> = Vec::with_capacity(batch.len());
        let now = self.clock.now();
        let now_ms = unix_millis(now);
        if now_ms < self.swept_at {
            self.sweep_from = 0;
        }
        self.swept_at = now_ms;
        let mut tx = Tx::new(&self.ks, now, &self.tokens, self.sweep_from);
        for job in batch {
            finishers.push(tx.apply(job));
            if tx.broken.is_some() {
                break;
            }
        }
        if sweep_due
            && tx.broken.is_none()
            && let Err(error) = tx.sweep(self.options.sweep_batch)
        {
            tracing::warn!(%error, "sweeping expired idempotency records failed");
        }
        if let Some(error) = tx.broken.take() {
            // Nothing of this group was written: its callers get errors, the store goes on.
            let message = error.to_string();
            tracing::error!(%message, "an idem-fjall group failed to read; its callers get errors");
            for finish in finishers {
                finish(Some(&message));
            }
            return Ok(());
        }
        let sweep_from = tx.sweep_from;
        let swept = tx.swept;
        let batch = tx.into_batch(&self.ks);
        // fjall writes nothing for an empty batch (an idle second's sweep that found
        // nothing): that is no commit.
        let wrote = !batch.is_empty();
        let outcome = batch.commit();
        if let Err(error) = outcome {
            let message = error.to_string();
            tracing::error!(%message, "an idem-fjall group could not be made durable");
            for finish in finishers {
                finish(Some(&message));
            }
            return Err(error);
        }
        self.sweep_from = sweep_from;
        if wrote {
            self.counters.committed(operations, swept);
        }
        for finish in finishers {
            finish(None);
        }
        Ok(())
    }
}

/// One group's writes, and the state machine applied to them.
struct Tx<'k> {
    ks: &'k Keyspaces,
    now: SystemTime,
    tokens: &'k AtomicU64,
    minted: bool,
    /// Where a sweep starts scanning (see [`Writer::sweep_from`]).
    sweep_from: u64,
    /// Expired records this group's sweeps removed.
    swept: u64,
    /// What this group wrote, by key: later jobs of the group read it, and it is written
    /// once at the end. A write batch gives all its items one sequence number, so each key
    /// must appear in it at most once.
    records: HashMap<Digest, Option<(Kept, Vec<u8>)>>,
    expiry: HashMap<Entry, bool>,
    claims: HashMap<Entry, bool>,
    /// A storage error that makes the whole group unusable.
    broken: Option<fjall::Error>,
}

impl<'k> Tx<'k> {
    fn new(ks: &'k Keyspaces, now: SystemTime, tokens: &'k AtomicU64, sweep_from: u64) -> Self {
        Self {
            ks,
            now,
            tokens,
            minted: false,
            sweep_from,
            swept: 0,
            records: HashMap::new(),
            expiry: HashMap::new(),
            claims: HashMap::new(),
            broken: None,
        }
    }

    /// The group as one batch, made durable (`fdatasync` of the journal) before it is
    /// applied, so readers never see a write that a crash could take back.
    fn into_batch(self, ks: &Keyspaces) -> fjall::OwnedWriteBatch {
        let mut batch = ks.db.batch().durability(Some(PersistMode::SyncData));
        for (digest, row) in self.records {
            match row {
                Some((_, bytes)) => batch.insert(&ks.records, digest, bytes),
                None => batch.remove(&ks.records, digest),
            }
        }
        for (index, changes) in [(&ks.expiry, self.expiry), (&ks.claims, self.claims)] {
            for (entry, present) in changes {
                if present {
                    batch.insert(index, entry, []);
                } else {
                    batch.remove(index, entry);
                }
            }
        }
        if self.minted {
            // At least every token this group minted: after a restart the store starts
            // above the largest token any shard made durable.
            let last = self.tokens.load(Ordering::SeqCst);
            batch.insert(&ks.meta, LAST_TOKEN, last.to_be_bytes());
        }
        batch
    }

    /// Notes a storage error and turns it into the caller's error.
    fn storage(&mut self, operation: &'static str, error: fjall::Error) -> StoreError {
        let message = error.to_string();
        self.broken.get_or_insert(error);
        StoreError::backend(operation, message)
    }

    fn apply(&mut self, job: Job) -> Finish {
        match job {
            Job::Begin {
                key,
                fingerprint,
                lease,
                reply,
            } => {
                let result = self.begin(&key, &fingerprint, lease);
                finish(reply, result)
            }
            Job::Complete {
                key,
                token,
                stored,
                retain,
                reply,
            } => {
                let result = self.load(&key.digest()).and_then(|current| {
                    let (expires_at, write) = transition::complete(
                        kept_at(current.as_ref(), self.now),
                        token,
                        &stored,
                        self.now,
                        retain,
                    )?;
                    if let Some(record) = write {
                        let claimed_ms = current.as_ref().map_or(0, |kept| kept.claimed_ms);
                        self.save(&key, current.as_ref(), record, expires_at, claimed_ms)?;
                    }
                    Ok(expires_at)
                });
                finish(reply, result)
            }
            Job::Release { key, token, reply } => {
                let result = self.load(&key.digest()).and_then(|current| {
                    transition::held(kept_at(current.as_ref(), self.now), token, self.now)?;
                    self.remove(&key.digest(), current.as_ref());
                    Ok(())
                });
                finish(reply, result)
            }
            Job::Renew {
                key,
                token,
                lease,
                reply,
            } => {
                let result = self.load(&key.digest()).and_then(|current| {
                    let record = transition::renew(
                        kept_at(current.as_ref(), self.now),
                        token,
                        self.now,
                        lease,
                    )?;
                    let expires_at = record.expires_at();
                    let kept_until = transition::kept_until(expires_at, lease);
                    let claimed_ms = current.as_ref().map_or(0, |kept| kept.claimed_ms);
                    self.save(&key, current.as_ref(), record, kept_until, claimed_ms)?;
                    Ok(Lease { token, expires_at })
                });
                finish(reply, result)
            }
            Job::Delete { key, reply } => {
                let result = self.load(&key.digest()).map(|current| {
                    let existed =
                        transition::live(current.as_ref().map(|kept| &kept.record), self.now)
                            .is_some();
                    self.remove(&key.digest(), current.as_ref());
                    existed
                });
                finish(reply, result)
            }
            Job::Sweep { limit, reply } => {
                let result = self.sweep(limit);
                finish(reply, result)
            }
            #[cfg(test)]
            Job::Crash => panic!("the writer was told to crash"),
        }
    }

    fn begin(
        &mut self,
        key: &ScopedKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let current = self.load(&key.digest())?;
        let tokens = self.tokens;
        let (answer, write) = transition::begin(
            kept_at(current.as_ref(), self.now),
            fingerprint,
            self.now,
            lease,
            || Token::new(tokens.fetch_add(1, Ordering::SeqCst) + 1),
        )?;
        if let Some(record) = write {
            self.minted = true;
            let kept_until = transition::kept_until(record.expires_at(), lease);
            let claimed_ms = unix_millis(self.now);
            self.save(key, current.as_ref(), record, kept_until, claimed_ms)?;
        }
        Ok(answer)
    }

    fn load(&mut self, digest: &Digest) -> Result<Option<Kept>, StoreError> {
        if let Some(written) = self.records.get(digest) {
            return Ok(written.as_ref().map(|(kept, _)| kept.clone()));
        }
        match self.ks.records.get(digest) {
            Ok(Some(bytes)) => row::decode(&bytes).map(Some),
            Ok(None) => Ok(None),
            Err(error) => Err(self.storage("read a record", error)),
        }
    }

    fn save(
        &mut self,
        key: &ScopedKey,
        old: Option<&Kept>,
        record: Record,
        kept_until: SystemTime,
        claimed_ms: u64,
    ) -> Result<(), StoreError> {
        let digest = key.digest();
        let kept_ms = unix_millis(kept_until).max(unix_millis(record.expires_at()));
        let new = Kept {
            record,
            kept_ms,
            claimed_ms,
            key: None,
        };
        let bytes = row::encode(key, &new)?;
        self.unindex(&digest, old);
        self.expiry.insert(new.expiry_entry(&digest), true);
        if let Some(entry) = new.claim_entry(&digest) {
            self.claims.insert(entry, true);
        }
        self.records.insert(digest, Some((new, bytes)));
        Ok(())
    }

    fn remove(&mut self, digest: &Digest, old: Option<&Kept>) {
        self.unindex(digest, old);
        self.records.insert(*digest, None);
    }

    fn unindex(&mut self, digest: &Digest, old: Option<&Kept>) {
        if let Some(old) = old {
            self.expiry.insert(old.expiry_entry(digest), false);
            if let Some(entry) = old.claim_entry(digest) {
                self.claims.insert(entry, false);
            }
        }
    }

    /// Removes up to `limit` records no longer kept, oldest first, scanning the expiry
    /// index from [`Tx::sweep_from`], which it moves to the time of the last entry removed.
    fn sweep(&mut self, limit: usize) -> Result<usize, StoreError> {
        // A record is kept while now < its end: everything before "now + 1 ms" is done.
        let start = row::entry(self.sweep_from, &[0; 32]);
        let bound = row::entry(unix_millis(self.now).saturating_add(1), &[0; 32]);
        if start >= bound {
            return Ok(0);
        }
        let mut due = Vec::new();
        for item in self.ks.expiry.range(start..bound) {
            if due.len() >= limit {
                break;
            }
            match item.key() {
                Ok(key) => due.extend(row::split_entry(&key)),
                Err(error) => return Err(self.storage("scan for expired records", error)),
            }
        }
        for &(time, digest) in &due {
            // New entries are never older than now, so none can land before this.
            self.sweep_from = time;
            let entry = row::entry(time, &digest);
            // An entry this group already rewrote stays as the group left it.
            if let Slot::Vacant(slot) = self.expiry.entry(entry) {
                slot.insert(false);
            }
            let current = self.load(&digest)?;
            if let Some(kept) = current.filter(|kept| kept.kept_ms == time)
                && kept.at(self.now).is_none()
            {
                if let Some(claim) = kept.claim_entry(&digest) {
                    self.claims.insert(claim, false);
                }
                self.records.insert(digest, None);
                self.swept += 1;
            }
        }
        Ok(due.len())
    }
}

/// The record as the store still keeps it at `now`: what the state machine decides on.
fn kept_at(current: Option<&Kept>, now: SystemTime) -> Option<&Record> {
    current.and_then(|kept| kept.at(now))
}
