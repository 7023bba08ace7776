//! The store contract every backend fulfils, and the state machine behind it.

use std::error::Error as StdError;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::record::{Begin, InFlightRecord, Lease, Record, RecordState, Stored, Token};
use crate::{Fingerprint, ScopedKey};

/// A boxed error from a backend, kept whole so its source chain survives.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The caller's token no longer holds the key: its lease ended, or another `begin` took
    /// the key over, or the record completed or was released. The record was not changed.
    #[error("lease lost: the key is no longer held by this token")]
    LeaseLost,
    /// The backend could not be reached or failed the operation.
    #[error("store backend failed while trying to {operation}")]
    Backend {
        /// What the store was doing.
        operation: &'static str,
        /// The backend's own error.
        #[source]
        source: BoxError,
    },
    /// A stored record could not be read back.
    #[error("stored record is corrupt")]
    Corrupt(#[source] BoxError),
    /// A lease or retention is longer than any store accepts
    /// ([`transition::MAX_SPAN`], about a hundred years): refused before anything was
    /// read or written, so the store is as it was and keeps serving.
    #[error(
        "cannot {operation}: a duration of {duration:?} is out of range (at most {max:?})",
        max = transition::MAX_SPAN
    )]
    DurationOutOfRange {
        /// What the store was asked to do.
        operation: &'static str,
        /// The duration that was refused.
        duration: Duration,
    },
    /// The backend did not answer within the caller's deadline. The operation may or may
    /// not have taken effect: a timed-out `begin` may have claimed the key (it then stays
    /// held until its lease ends), a timed-out `complete` may have stored the outcome.
    #[error("store did not answer within {after:?} while trying to {operation}")]
    Timeout {
        /// What the store was doing.
        operation: &'static str,
        /// The deadline that passed.
        after: Duration,
    },
    /// The store holds as much as it is allowed to (a configured capacity, such as the
    /// memory store's [`MemoryLimits`](crate::MemoryLimits)) and refuses to claim a new key
    /// until records expire or are released or deleted. Nothing was written, and no record
    /// was evicted: keys the store holds still replay, complete, renew and release.
    #[error("the store is full (at most {limit} {resource}); a new key cannot be claimed now")]
    Full {
        /// What ran out: `"records"` or `"bytes"`.
        resource: &'static str,
        /// The configured maximum of `resource`.
        limit: u64,
    },
    /// This store cannot do `operation` (for instance list records, which a store keyed
    /// only by digests cannot). Nothing was read or written.
    #[error("this store cannot {operation}")]
    Unsupported {
        /// What the store was asked to do.
        operation: &'static str,
    },
}

impl StoreError {
    /// Wraps a backend error met while doing `operation`.
    pub fn backend(operation: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Backend {
            operation,
            source: source.into(),
        }
    }

    /// Wraps a decoding error.
    pub fn corrupt(source: impl Into<BoxError>) -> Self {
        Self::Corrupt(source.into())
    }
}

/// Where records live. Every backend passes the same conformance suite
/// (`idem_core::testing`, feature `testing`).
///
/// The guarantees, for every implementation:
/// - `begin` is one atomic step: of any number of concurrent `begin`s of an absent key,
///   exactly one is [`Begin::Acquired`].
/// - A record whose lease or retention has ended is treated as absent by `begin` and `get`:
///   after the lease a new `begin` takes the key over with a new token.
/// - Tokens only grow per key, across takeovers, releases and expiry.
/// - `release` and `renew` act only for the current, unexpired holder; anyone else gets
///   [`StoreError::LeaseLost`] and the record is left untouched.
/// - `complete` acts for the holder of the current token even after its lease ended, as
///   long as no newer claim took the key over, the holder did not release it and nobody
///   deleted it: a slow operation or a slow store write must not turn into a second
///   execution. For that, a store keeps an in-flight record whose lease ended for at least
///   one more lease length (the one last granted by `begin` or `renew`) before it forgets
///   it; once forgotten, a late `complete` gets [`StoreError::LeaseLost`].
/// - `complete` repeated with the token that completed the record answers `Ok` with the
///   record's expiry and changes nothing, for as long as the record is retained, so a
///   `complete` whose answer was lost (a client-side deadline) can be retried safely. Any
///   other token gets [`StoreError::LeaseLost`].
/// - A lease or retention longer than [`transition::MAX_SPAN`] is refused with
///   [`StoreError::DurationOutOfRange`] before anything is read or written; no duration
///   makes a store panic, overflow or stop serving.
///
/// ```
/// use std::time::Duration;
/// use idem_core::{Begin, Fingerprint, Key, MemoryStore, Scope, ScopedKey, Store, Stored};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idem_core::StoreError> {
/// let store = MemoryStore::new();
/// let key = ScopedKey::new(Scope::anonymous(), Key::new("pay-1").unwrap());
/// let fingerprint = Fingerprint::builder().part("body", b"{\"cents\":100}").finish();
/// let lease = Duration::from_secs(30);
///
/// let Begin::Acquired(claim) = store.begin(&key, &fingerprint, lease).await? else {
///     unreachable!("a new key is acquired")
/// };
/// let outcome = Stored::new(201).with_body("charged");
/// store.complete(&key, claim.token, &outcome, Duration::from_secs(86_400)).await?;
///
/// // The retry gets the first answer back and runs nothing.
/// match store.begin(&key, &fingerprint, lease).await? {
///     Begin::Completed { stored, .. } => assert_eq!(*stored, outcome),
///     other => panic!("expected a replay, got {other:?}"),
/// }
/// # Ok(()) }
/// ```
#[async_trait]
pub trait Store: std::fmt::Debug + Send + Sync + 'static {
    /// Claims `key` for the request with `fingerprint`, or says why not.
    async fn begin(
        &self,
        key: &ScopedKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError>;

    /// Records the outcome of the holder's operation, kept for `retain`; returns when the
    /// record will expire.
    async fn complete(
        &self,
        key: &ScopedKey,
        token: Token,
        stored: &Stored,
        retain: Duration,
    ) -> Result<SystemTime, StoreError>;

    /// Gives the key up without an outcome (nothing ran, or it may safely run again).
    async fn release(&self, key: &ScopedKey, token: Token) -> Result<(), StoreError>;

    /// Extends the holder's lease to `lease` from now, for long operations.
    async fn renew(
        &self,
        key: &ScopedKey,
        token: Token,
        lease: Duration,
    ) -> Result<Lease, StoreError>;

    /// The live record for `key`, if any.
    async fn get(&self, key: &ScopedKey) -> Result<Option<Record>, StoreError>;

    /// Forgets `key` whatever its state; says whether a live record was there.
    async fn delete(&self, key: &ScopedKey) -> Result<bool, StoreError>;

    /// Removes up to `limit` expired records; returns how many it removed. Stores whose
    /// backend expires records by itself may always return 0.
    async fn sweep(&self, limit: usize) -> Result<usize, StoreError>;

    /// Up to `limit` records held in flight (lease not ended) whose claim is at least
    /// `older_than` old, oldest claim first: keys a crashed or hung holder keeps from
    /// running, for an operator to inspect or delete. A renewal does not make a claim
    /// younger; a takeover does. The work per call is bounded by `limit` where the backend
    /// keeps an index by claim time.
    ///
    /// The default answers [`StoreError::Unsupported`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use idem_core::{Fingerprint, Key, ManualClock, MemoryStore, Scope, ScopedKey, Store};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idem_core::StoreError> {
    /// let clock = ManualClock::new();
    /// let store = MemoryStore::with_clock(clock.clone());
    /// let key = ScopedKey::new(Scope::anonymous(), Key::new("pay-1").unwrap());
    /// let fingerprint = Fingerprint::builder().part("body", b"{}").finish();
    /// store.begin(&key, &fingerprint, Duration::from_secs(600)).await?;
    ///
    /// clock.advance(Duration::from_secs(60));
    /// let stuck = store.in_flight(Duration::from_secs(30), 100).await?;
    /// assert_eq!(stuck.len(), 1);
    /// assert_eq!(stuck[0].key, key);
    /// assert!(store.in_flight(Duration::from_secs(120), 100).await?.is_empty());
    /// # Ok(()) }
    /// ```
    async fn in_flight(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> Result<Vec<InFlightRecord>, StoreError> {
        let _ = (older_than, limit);
        Err(StoreError::Unsupported {
            operation: "list in-flight records",
        })
    }

    /// Why this store can no longer serve at all, if that is so: a background worker it
    /// depends on (a writer thread, a sweeper) has died. A process that sees `Some` should
    /// report itself not ready and stop rather than limp on. The default is `None`.
    fn fatal_error(&self) -> Option<String> {
        None
    }

    /// What the store can tell about its size and its own upkeep, for metrics; cheap
    /// enough to call on every scrape. The default tells nothing.
    ///
    /// ```
    /// use std::time::Duration;
    /// use idem_core::{Fingerprint, Key, MemoryStore, Scope, ScopedKey, Store};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idem_core::StoreError> {
    /// let store = MemoryStore::new();
    /// let key = ScopedKey::new(Scope::anonymous(), Key::new("pay-1").unwrap());
    /// let fingerprint = Fingerprint::builder().part("body", b"{}").finish();
    /// store.begin(&key, &fingerprint, Duration::from_secs(60)).await?;
    /// assert_eq!(store.counters().records, Some(1));
    /// assert_eq!(store.counters().swept, Some(0));
    /// # Ok(()) }
    /// ```
    fn counters(&self) -> StoreCounters {
        StoreCounters::default()
    }
}

/// A store's answer to [`Store::counters`]: each figure `None` where the store cannot tell
/// it (Redis, for one, expires records by itself and shares its key space).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCounters {
    /// Records kept now: in flight, completed, or expired and not yet swept.
    pub records: Option<u64>,
    /// Expired records removed by sweeps since the store was opened.
    pub swept: Option<u64>,
    /// Durable commits since the store was opened, for stores that group operations into
    /// commits (the writers of redb and fjall).
    pub commits: Option<u64>,
    /// Operations those commits carried: divided by `commits`, the group-commit size.
    pub committed_operations: Option<u64>,
}

/// What a store's writer committed since the store was opened, shared between its writer
/// threads and [`Store::counters`]: for stores that group operations into durable commits.
/// Count a commit only once it is durable.
///
/// ```
/// use idem_core::CommitCounters;
///
/// let counters = CommitCounters::default();
/// counters.committed(8, 0); // one commit carrying eight operations
/// counters.committed(2, 5); // another, whose sweep removed five expired records
/// let figures = counters.figures(Some(42));
/// assert_eq!(figures.commits, Some(2));
/// assert_eq!(figures.committed_operations, Some(10));
/// assert_eq!(figures.swept, Some(5));
/// assert_eq!(figures.records, Some(42));
/// ```
#[derive(Debug, Default)]
pub struct CommitCounters {
    commits: AtomicU64,
    operations: AtomicU64,
    swept: AtomicU64,
}

impl CommitCounters {
    /// Counts one durable commit that carried `operations` calls and removed `swept`
    /// expired records.
    pub fn committed(&self, operations: u64, swept: u64) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.operations.fetch_add(operations, Ordering::Relaxed);
        self.swept.fetch_add(swept, Ordering::Relaxed);
    }

    /// The figures for [`Store::counters`], with the store's own count of `records`.
    pub fn figures(&self, records: Option<u64>) -> StoreCounters {
        StoreCounters {
            records,
            swept: Some(self.swept.load(Ordering::Relaxed)),
            commits: Some(self.commits.load(Ordering::Relaxed)),
            committed_operations: Some(self.operations.load(Ordering::Relaxed)),
        }
    }
}

#[async_trait]
impl<S: Store + ?Sized> Store for Arc<S> {
    async fn begin(
        &self,
        key: &ScopedKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        (**self).begin(key, fingerprint, lease).await
    }
    async fn complete(
        &self,
        key: &ScopedKey,
        token: Token,
        stored: &Stored,
        retain: Duration,
    ) -> Result<SystemTime, StoreError> {
        (**self).complete(key, token, stored, retain).await
    }
    async fn release(&self, key: &ScopedKey, token: Token) -> Result<(), StoreError> {
        (**self).release(key, token).await
    }
    async fn renew(
        &self,
        key: &ScopedKey,
        token: Token,
        lease: Duration,
    ) -> Result<Lease, StoreError> {
        (**self).renew(key, token, lease).await
    }
    async fn get(&self, key: &ScopedKey) -> Result<Option<Record>, StoreError> {
        (**self).get(key).await
    }
    async fn delete(&self, key: &ScopedKey) -> Result<bool, StoreError> {
        (**self).delete(key).await
    }
    async fn sweep(&self, limit: usize) -> Result<usize, StoreError> {
        (**self).sweep(limit).await
    }
    async fn in_flight(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> Result<Vec<InFlightRecord>, StoreError> {
        (**self).in_flight(older_than, limit).await
    }
    fn fatal_error(&self) -> Option<String> {
        (**self).fatal_error()
    }
    fn counters(&self) -> StoreCounters {
        (**self).counters()
    }
}

/// The contract's state machine as pure functions over the current record, for stores that
/// read a record, decide, and write it back inside one atomic step (a lock, a write
/// transaction). Server-side stores (Lua, SQL) implement the same rules in their language.
///
/// A store hands these functions the record as it still keeps it: a live record, or an
/// in-flight record whose lease ended but which is still within
/// [`kept_until`](transition::kept_until) (so a late `complete` finds it), or nothing.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use idem_core::{Begin, Fingerprint, Stored, Token, transition};
///
/// let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
/// let lease = Duration::from_secs(30);
/// let fp = Fingerprint::builder().part("body", b"{}").finish();
/// let (answer, claimed) = transition::begin(None, &fp, now, lease, || Token::new(1)).unwrap();
/// assert!(matches!(answer, Begin::Acquired(_)));
///
/// // Completing after the lease ended still works: nobody took the key over.
/// let late = now + lease + Duration::from_secs(5);
/// let retain = Duration::from_secs(3_600);
/// let stored = Stored::new(201);
/// let (expires_at, completed) =
///     transition::complete(claimed.as_ref(), Token::new(1), &stored, late, retain).unwrap();
/// assert_eq!(expires_at, late + retain);
///
/// // Completing again with the same token is answered from the record, nothing written.
/// let (again, write) =
///     transition::complete(completed.as_ref(), Token::new(1), &stored, late, retain).unwrap();
/// assert_eq!((again, write), (expires_at, None));
///
/// // Absurd durations are refused, never a panic.
/// assert!(transition::begin(None, &fp, now, Duration::MAX, || Token::new(2)).is_err());
/// ```
pub mod transition {
    use super::*;

    /// The longest lease or retention any store accepts: 100 years of 365 days. Longer
    /// durations are refused with [`StoreError::DurationOutOfRange`]. Bounded so that every
    /// backend's arithmetic stays exact: two spans past any present time fit Unix
    /// microseconds in an `i64`, Lua's doubles in milliseconds and Postgres' timestamps.
    pub const MAX_SPAN: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

    /// `duration`, if a store accepts it as a lease or retention for `operation`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use idem_core::{StoreError, transition};
    ///
    /// assert!(transition::span("begin", Duration::from_secs(30)).is_ok());
    /// assert!(matches!(
    ///     transition::span("begin", Duration::MAX),
    ///     Err(StoreError::DurationOutOfRange { operation: "begin", .. })
    /// ));
    /// ```
    pub fn span(operation: &'static str, duration: Duration) -> Result<Duration, StoreError> {
        if duration <= MAX_SPAN {
            Ok(duration)
        } else {
            Err(StoreError::DurationOutOfRange {
                operation,
                duration,
            })
        }
    }

    /// `now + duration`, checked: refuses spans past [`MAX_SPAN`] and times the platform
    /// cannot represent, instead of panicking.
    pub fn after(
        operation: &'static str,
        now: SystemTime,
        duration: Duration,
    ) -> Result<SystemTime, StoreError> {
        span(operation, duration)?;
        now.checked_add(duration)
            .ok_or(StoreError::DurationOutOfRange {
                operation,
                duration,
            })
    }

    /// Until when a store keeps an in-flight record whose lease ends at `lease_expires_at`,
    /// granted for `lease`: one more lease length, so that its holder's late `complete`
    /// still finds it. (Completed records are kept until their retention ends.)
    pub fn kept_until(lease_expires_at: SystemTime, lease: Duration) -> SystemTime {
        // `lease` was accepted by `after`, so this only fails at the platform's end of time.
        lease_expires_at
            .checked_add(lease)
            .unwrap_or(lease_expires_at)
    }

    /// The current record, if it still counts at `now`.
    pub fn live(current: Option<&Record>, now: SystemTime) -> Option<&Record> {
        current.filter(|record| record.is_live(now))
    }

    /// Decides `begin`: the answer, and the record to write if the key was acquired.
    /// `mint` is called only when a new token is needed. A lease past [`MAX_SPAN`] is
    /// refused whatever the record.
    pub fn begin(
        current: Option<&Record>,
        fingerprint: &Fingerprint,
        now: SystemTime,
        lease: Duration,
        mint: impl FnOnce() -> Token,
    ) -> Result<(Begin, Option<Record>), StoreError> {
        let lease_end = after("begin", now, lease)?;
        Ok(match live(current, now) {
            Some(record) if record.fingerprint != *fingerprint => (Begin::Mismatch, None),
            Some(record) => match &record.state {
                RecordState::InFlight { lease_expires_at } => {
                    let left = lease_expires_at.duration_since(now).unwrap_or_default();
                    let retry_after = left.max(Duration::from_millis(1));
                    (Begin::InFlight { retry_after }, None)
                }
                RecordState::Completed { stored, expires_at } => (
                    Begin::Completed {
                        stored: Arc::clone(stored),
                        expires_at: *expires_at,
                    },
                    None,
                ),
            },
            None => {
                let claim = Lease {
                    token: mint(),
                    expires_at: lease_end,
                };
                let record = Record {
                    fingerprint: *fingerprint,
                    token: claim.token,
                    state: RecordState::InFlight {
                        lease_expires_at: claim.expires_at,
                    },
                };
                (Begin::Acquired(claim), Some(record))
            }
        })
    }

    /// The record, if `token` holds it in flight at `now`.
    pub fn held(
        current: Option<&Record>,
        token: Token,
        now: SystemTime,
    ) -> Result<&Record, StoreError> {
        match live(current, now) {
            Some(record)
                if record.token == token
                    && matches!(record.state, RecordState::InFlight { .. }) =>
            {
                Ok(record)
            }
            _ => Err(StoreError::LeaseLost),
        }
    }

    /// Decides `complete`: when the record will expire, and the completed record to write
    /// (`None` when `token` already completed it and nothing changes).
    ///
    /// `current` is the record as the store keeps it, an in-flight record past its lease
    /// included (see [`kept_until`]): the holder of the current token completes it even
    /// after its lease ended. Any other token, or a completed record whose retention ended,
    /// is [`StoreError::LeaseLost`].
    pub fn complete(
        current: Option<&Record>,
        token: Token,
        stored: &Stored,
        now: SystemTime,
        retain: Duration,
    ) -> Result<(SystemTime, Option<Record>), StoreError> {
        let expires_at = after("complete", now, retain)?;
        match current {
            Some(record) if record.token == token => match &record.state {
                RecordState::InFlight { .. } => Ok((
                    expires_at,
                    Some(Record {
                        fingerprint: record.fingerprint,
                        token,
                        state: RecordState::Completed {
                            stored: Arc::new(stored.clone()),
                            expires_at,
                        },
                    }),
                )),
                RecordState::Completed { expires_at, .. } if record.is_live(now) => {
                    Ok((*expires_at, None))
                }
                RecordState::Completed { .. } => Err(StoreError::LeaseLost),
            },
            _ => Err(StoreError::LeaseLost),
        }
    }

    /// Decides `renew`: the record with its lease extended.
    pub fn renew(
        current: Option<&Record>,
        token: Token,
        now: SystemTime,
        lease: Duration,
    ) -> Result<Record, StoreError> {
        let lease_expires_at = after("renew", now, lease)?;
        let record = held(current, token, now)?;
        Ok(Record {
            state: RecordState::InFlight { lease_expires_at },
            ..record.clone()
        })
    }
}

/// Runs `store.sweep` in the background every `every`, in batches of `batch`, until the
/// returned handle is aborted or dropped with the runtime. Batches keep each sweep step short,
/// so a large backlog of expired records never stalls `begin`.
pub fn spawn_sweeper<S: Store>(
    store: S,
    every: Duration,
    batch: usize,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            loop {
                match store.sweep(batch).await {
                    Ok(removed) if removed >= batch => tokio::task::yield_now().await,
                    Ok(_) => break,
                    Err(error) => {
                        tracing::warn!(%error, "sweeping expired idempotency records failed");
                        break;
                    }
                }
            }
        }
    })
}
