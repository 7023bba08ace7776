//! The store contract every backend fulfils, and the state machine behind it.

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::record::{Begin, Lease, Record, RecordState, Stored, Token};
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
/// (`idem::testing`, feature `testing`).
///
/// The guarantees, for every implementation:
/// - `begin` is one atomic step: of any number of concurrent `begin`s of an absent key,
///   exactly one is [`Begin::Acquired`].
/// - A record whose lease or retention has ended is treated as absent.
/// - Tokens only grow per key, across takeovers, releases and expiry.
/// - `complete`, `release` and `renew` act only for the current, unexpired holder; anyone
///   else gets [`StoreError::LeaseLost`] and the record is left untouched.
///
/// ```
/// use std::time::Duration;
/// use idem::{Begin, Fingerprint, Key, MemoryStore, Scope, ScopedKey, Store, Stored};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idem::StoreError> {
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

    /// Why this store can no longer serve at all, if that is so: a background worker it
    /// depends on (a writer thread, a sweeper) has died. A process that sees `Some` should
    /// report itself not ready and stop rather than limp on. The default is `None`.
    fn fatal_error(&self) -> Option<String> {
        None
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
    fn fatal_error(&self) -> Option<String> {
        (**self).fatal_error()
    }
}

/// The contract's state machine as pure functions over the current record, for stores that
/// read a record, decide, and write it back inside one atomic step (a lock, a write
/// transaction). Server-side stores (Lua, SQL) implement the same rules in their language.
pub mod transition {
    use super::*;

    /// The current record, if it still counts at `now`.
    pub fn live(current: Option<&Record>, now: SystemTime) -> Option<&Record> {
        current.filter(|record| record.is_live(now))
    }

    /// Decides `begin`: the answer, and the record to write if the key was acquired.
    /// `mint` is called only when a new token is needed.
    pub fn begin(
        current: Option<&Record>,
        fingerprint: &Fingerprint,
        now: SystemTime,
        lease: Duration,
        mint: impl FnOnce() -> Token,
    ) -> (Begin, Option<Record>) {
        match live(current, now) {
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
                    expires_at: now + lease,
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
        }
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

    /// Decides `complete`: the completed record to write.
    pub fn complete(
        current: Option<&Record>,
        token: Token,
        stored: &Stored,
        now: SystemTime,
        retain: Duration,
    ) -> Result<Record, StoreError> {
        let record = held(current, token, now)?;
        Ok(Record {
            fingerprint: record.fingerprint,
            token,
            state: RecordState::Completed {
                stored: Arc::new(stored.clone()),
                expires_at: now + retain,
            },
        })
    }

    /// Decides `renew`: the record with its lease extended.
    pub fn renew(
        current: Option<&Record>,
        token: Token,
        now: SystemTime,
        lease: Duration,
    ) -> Result<Record, StoreError> {
        let record = held(current, token, now)?;
        Ok(Record {
            state: RecordState::InFlight {
                lease_expires_at: now + lease,
            },
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
