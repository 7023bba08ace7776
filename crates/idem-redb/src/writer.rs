//! The one thread that writes: group commit and background sweeping.

use std::error::Error as StdError;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};

use idem_core::{
    Begin, Clock, CommitCounters, Fingerprint, Lease, Record, ScopedKey, StoreError, Stored, Token,
    transition, unix_millis,
};
use redb::{Database, ReadableTable, Table, WriteTransaction};
use tokio::sync::oneshot;

use crate::RedbOptions;
use crate::row::{self, CLAIMS, EXPIRY, Kept, LAST_TOKEN, META, RECORDS};

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A write request, answered once its transaction has committed.
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

type SharedError = Arc<dyn StdError + Send + Sync>;

/// Sends a job's answer once the fate of its transaction is known.
type Finish = Box<dyn FnOnce(Option<&SharedError>) + Send>;

fn finish<T: Send + 'static>(reply: Reply<T>, result: Result<T, StoreError>) -> Finish {
    Box::new(move |failed| {
        let answer = match failed {
            None => result,
            Some(error) => Err(StoreError::backend(
                "commit a write transaction",
                Arc::clone(error),
            )),
        };
        // The caller may have given up waiting; its answer is then nobody's business.
        let _ = reply.send(answer);
    })
}

pub(crate) fn create_tables(db: &Database) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    txn.open_table(RECORDS)?;
    txn.open_table(EXPIRY)?;
    txn.open_table(CLAIMS)?;
    txn.open_table(META)?;
    txn.commit()?;
    Ok(())
}

pub(crate) struct Writer {
    db: Arc<Database>,
    clock: Arc<dyn Clock>,
    options: RedbOptions,
    last_sweep: Instant,
    counters: Arc<CommitCounters>,
}

impl Writer {
    pub(crate) fn new(
        db: Arc<Database>,
        clock: Arc<dyn Clock>,
        options: RedbOptions,
        counters: Arc<CommitCounters>,
    ) -> Self {
        Self {
            db,
            clock,
            options,
            last_sweep: Instant::now(),
            counters,
        }
    }

    /// Serves jobs until every sender is gone.
    pub(crate) fn run(mut self, inbox: Receiver<Job>) {
        loop {
            let first = match inbox.recv_timeout(self.options.sweep_interval) {
                Ok(job) => Some(job),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            // Everything that queued up while the last commit was syncing goes into this one.
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
            self.commit_batch(batch, sweep_due);
        }
    }

    fn commit_batch(&self, batch: Vec<Job>, sweep_due: bool) {
        let operations = batch.len() as u64;
        let mut finishers: Vec<Finish> = Vec::with_capacity(batch.len());
        let mut swept = 0;
        let outcome = self
            .db
            .begin_write()
            .map_err(redb::Error::from)
            .and_then(|txn| {
                let mut tx = Tx::open(&txn, self.clock.now())?;
                for job in batch {
                    finishers.push(tx.apply(job));
                    if let Some(error) = tx.broken.take() {
                        return Err(error);
                    }
                }
                if sweep_due {
                    if let Err(error) = tx.sweep(self.options.sweep_batch) {
                        tracing::warn!(%error, "sweeping expired idempotency records failed");
                    }
                    if let Some(error) = tx.broken.take() {
                        return Err(error);
                    }
                }
                tx.save_last_token()?;
                swept = tx.swept;
                drop(tx);
                txn.commit()?;
                Ok(())
            });
        if outcome.is_ok() {
            self.counters.committed(operations, swept);
        }
        let failed: Option<SharedError> = outcome.err().map(|error| Arc::new(error) as SharedError);
        if let Some(error) = &failed {
            tracing::error!(%error, "an idem-redb write transaction failed; its callers get errors");
        }
        for finish in finishers {
            finish(failed.as_ref());
        }
    }
}

/// One write transaction's tables, and the state machine applied to them.
struct Tx<'t> {
    records: Table<'t, &'static [u8], &'static [u8]>,
    expiry: Table<'t, &'static [u8], ()>,
    claims: Table<'t, &'static [u8], ()>,
    meta: Table<'t, &'static str, u64>,
    now: SystemTime,
    last_token: u64,
    minted: bool,
    /// Records this transaction's sweeps removed.
    swept: u64,
    /// A storage error that makes the whole transaction unusable.
    broken: Option<redb::Error>,
}

impl<'t> Tx<'t> {
    fn open(txn: &'t WriteTransaction, now: SystemTime) -> Result<Self, redb::Error> {
        let meta = txn.open_table(META)?;
        let last_token = meta.get(LAST_TOKEN)?.map(|v| v.value()).unwrap_or(0);
        Ok(Self {
            records: txn.open_table(RECORDS)?,
            expiry: txn.open_table(EXPIRY)?,
            claims: txn.open_table(CLAIMS)?,
            meta,
            now,
            last_token,
            minted: false,
            swept: 0,
            broken: None,
        })
    }

    fn save_last_token(&mut self) -> Result<(), redb::Error> {
        if self.minted {
            self.meta.insert(LAST_TOKEN, self.last_token)?;
        }
        Ok(())
    }

    /// Notes a storage error and turns it into the caller's error.
    fn storage(&mut self, operation: &'static str, error: impl Into<redb::Error>) -> StoreError {
        let error = error.into();
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
                let result = self.load(&key).and_then(|current| {
                    let (expires_at, write) = transition::complete(
                        kept_at(current.as_ref(), self.now),
                        token,
                        &stored,
                        self.now,
                        retain,
                    )?;
                    if let Some(record) = write {
                        let claimed_ms = current.as_ref().map_or(0, |kept| kept.claimed_ms);
                        self.save(&key, current.as_ref(), &record, expires_at, claimed_ms)?;
                    }
                    Ok(expires_at)
                });
                finish(reply, result)
            }
            Job::Release { key, token, reply } => {
                let result = self.load(&key).and_then(|current| {
                    transition::held(kept_at(current.as_ref(), self.now), token, self.now)?;
                    self.remove(&key, current.as_ref())
                });
                finish(reply, result)
            }
            Job::Renew {
                key,
                token,
                lease,
                reply,
            } => {
                let result = self.load(&key).and_then(|current| {
                    let record = transition::renew(
                        kept_at(current.as_ref(), self.now),
                        token,
                        self.now,
                        lease,
                    )?;
                    let kept_until = transition::kept_until(record.expires_at(), lease);
                    let claimed_ms = current.as_ref().map_or(0, |kept| kept.claimed_ms);
                    self.save(&key, current.as_ref(), &record, kept_until, claimed_ms)?;
                    Ok(Lease {
                        token,
                        expires_at: record.expires_at(),
                    })
                });
                finish(reply, result)
            }
            Job::Delete { key, reply } => {
                let result = self.load(&key).and_then(|current| {
                    let existed =
                        transition::live(current.as_ref().map(|kept| &kept.record), self.now)
                            .is_some();
                    self.remove(&key, current.as_ref())?;
                    Ok(existed)
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
        let current = self.load(key)?;
        let mut next = self.last_token;
        let (answer, write) = transition::begin(
            kept_at(current.as_ref(), self.now),
            fingerprint,
            self.now,
            lease,
            || {
                next += 1;
                Token::new(next)
            },
        )?;
        if let Some(record) = write {
            self.last_token = next;
            self.minted = true;
            let kept_until = transition::kept_until(record.expires_at(), lease);
            // At least 1: 0 marks an unknown claim time.
            let claimed_ms = unix_millis(self.now).max(1);
            self.save(key, current.as_ref(), &record, kept_until, claimed_ms)?;
        }
        Ok(answer)
    }

    fn load(&mut self, key: &ScopedKey) -> Result<Option<Kept>, StoreError> {
        let found = self
            .records
            .get(key.digest().as_slice())
            .map(|row| row.map(|bytes| bytes.value().to_vec()));
        match found {
            Ok(Some(bytes)) => row::decode(&bytes).map(Some),
            Ok(None) => Ok(None),
            Err(error) => Err(self.storage("read a record", error)),
        }
    }

    fn save(
        &mut self,
        key: &ScopedKey,
        old: Option<&Kept>,
        new: &Record,
        kept_until: SystemTime,
        claimed_ms: u64,
    ) -> Result<(), StoreError> {
        let digest = key.digest();
        let bytes = row::encode(key, new, kept_until, claimed_ms)?;
        let kept_ms = unix_millis(kept_until).max(unix_millis(new.expires_at()));
        let claim = Kept {
            record: new.clone(),
            kept_ms,
            claimed_ms,
            key: None,
        }
        .claim_entry(&digest);
        let written = (|| -> Result<(), redb::Error> {
            if let Some(old) = old {
                self.expiry
                    .remove(row::expiry_entry(&digest, old.kept_ms).as_slice())?;
                if let Some(entry) = old.claim_entry(&digest) {
                    self.claims.remove(entry.as_slice())?;
                }
            }
            self.records.insert(digest.as_slice(), bytes.as_slice())?;
            self.expiry
                .insert(row::expiry_entry(&digest, kept_ms).as_slice(), ())?;
            if let Some(entry) = claim {
                self.claims.insert(entry.as_slice(), ())?;
            }
            Ok(())
        })();
        written.map_err(|error| self.storage("write a record", error))
    }

    fn remove(&mut self, key: &ScopedKey, old: Option<&Kept>) -> Result<(), StoreError> {
        let digest = key.digest();
        let removed = (|| -> Result<(), redb::Error> {
            if let Some(old) = old {
                self.expiry
                    .remove(row::expiry_entry(&digest, old.kept_ms).as_slice())?;
                if let Some(entry) = old.claim_entry(&digest) {
                    self.claims.remove(entry.as_slice())?;
                }
            }
            self.records.remove(digest.as_slice())?;
            Ok(())
        })();
        removed.map_err(|error| self.storage("remove a record", error))
    }

    /// Removes up to `limit` records no longer kept, oldest first.
    fn sweep(&mut self, limit: usize) -> Result<usize, StoreError> {
        // Entries are ordered by the end of keeping: everything before "now + 1 ms, digest 0"
        // is done (a record is kept while now < its end).
        let mut bound = [0u8; 40];
        bound[..8].copy_from_slice(&unix_millis(self.now).saturating_add(1).to_be_bytes());
        let due: Result<Vec<Vec<u8>>, redb::Error> = (|| {
            let mut due = Vec::new();
            for entry in self.expiry.range(..bound.as_slice())?.take(limit) {
                due.push(entry?.0.value().to_vec());
            }
            Ok(due)
        })();
        let due = due.map_err(|error| self.storage("scan for expired records", error))?;
        let removed = (|| -> Result<(), redb::Error> {
            for entry in &due {
                self.expiry.remove(entry.as_slice())?;
                let removed = self.records.remove(&entry[8..])?;
                let claim = removed
                    .and_then(|row| row::decode(row.value()).ok())
                    .and_then(|kept| {
                        let digest: [u8; 32] = entry[8..].try_into().ok()?;
                        kept.claim_entry(&digest)
                    });
                if let Some(claim) = claim {
                    self.claims.remove(claim.as_slice())?;
                }
            }
            Ok(())
        })();
        removed.map_err(|error| self.storage("remove expired records", error))?;
        self.swept += due.len() as u64;
        Ok(due.len())
    }
}

/// The record as the store still keeps it at `now`: what the state machine decides on.
fn kept_at(current: Option<&Kept>, now: SystemTime) -> Option<&Record> {
    current.and_then(|kept| kept.at(now))
}
