//! [`Holder`]: the life of a claimed key, once for every front end (HTTP, queues).
//!
//! claim → renew every third of the lease, on its own task → complete (retried with
//! backoff while the lease is still renewed) or release, or hold until the lease ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::ScopedKey;
use crate::record::{Lease, Stored, Token};
use crate::store::{Store, StoreError};

/// How a [`Holder`] keeps and gives up its key.
///
/// ```
/// use std::time::Duration;
/// use idem_core::HoldOptions;
///
/// let options = HoldOptions::new(Duration::from_secs(60));
/// assert_eq!(options.renew_every, Duration::from_secs(20));
/// assert_eq!(options.complete_for, Duration::from_secs(10));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldOptions {
    /// The lease each renewal asks for.
    pub lease: Duration,
    /// How often the lease is renewed while the operation runs; a third of the lease by
    /// default, so two renewals can fail before the lease ends.
    pub renew_every: Duration,
    /// How long [`Holder::complete`] keeps retrying a store that fails, renewing the lease
    /// meanwhile. Default 10 s.
    pub complete_for: Duration,
}

impl HoldOptions {
    /// Renewal every third of `lease`; completion retried for 10 s.
    pub fn new(lease: Duration) -> Self {
        Self {
            lease,
            renew_every: lease / 3,
            complete_for: Duration::from_secs(10),
        }
    }
}

/// First and longest pause between attempts to store an outcome.
const FIRST_RETRY: Duration = Duration::from_millis(20);
const MAX_RETRY: Duration = Duration::from_secs(1);
/// The longest pause before a failed renewal is tried again.
const MAX_RENEW_RETRY: Duration = Duration::from_millis(500);

#[derive(Debug, Default)]
struct LostSignal {
    lost: AtomicBool,
    notify: Notify,
}

impl LostSignal {
    fn set(&self) {
        self.lost.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
}

/// A key this process claimed, kept claimed while its operation runs.
///
/// The lease is renewed on a task of its own, so a handler or an upstream call that is slow,
/// CPU-bound or not polled cannot starve the renewal. When a renewal is refused (the lease
/// ended, or another claim took the key over) [`lost`](Self::lost) resolves: the operation
/// may want to stop, and its outcome may no longer be stored.
///
/// End it with [`complete`](Self::complete), [`release`](Self::release) or
/// [`hold`](Self::hold); dropping it is `hold`.
///
/// Give it a store with deadlines ([`TimeoutStore`](crate::TimeoutStore)), so that no single
/// call can stall it.
///
/// ```
/// use std::time::Duration;
/// use idem_core::{Begin, Fingerprint, HoldOptions, Holder, Key, MemoryStore, Scope, ScopedKey, Store, Stored};
/// use std::sync::Arc;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idem_core::StoreError> {
/// let store = Arc::new(MemoryStore::new());
/// let key = ScopedKey::new(Scope::anonymous(), Key::new("order-1").unwrap());
/// let fingerprint = Fingerprint::builder().part("body", b"{}").finish();
/// let options = HoldOptions::new(Duration::from_secs(30));
/// let Begin::Acquired(lease) = store.begin(&key, &fingerprint, options.lease).await? else {
///     unreachable!()
/// };
/// let holder = Holder::start(Arc::clone(&store), key.clone(), lease, options).await;
/// // ... run the operation ...
/// holder.complete(&Stored::new(201), Duration::from_secs(3600)).await?;
/// assert!(matches!(store.begin(&key, &fingerprint, options.lease).await?, Begin::Completed { .. }));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Holder<S: Store + Clone> {
    store: S,
    key: ScopedKey,
    token: Token,
    options: HoldOptions,
    lost: Arc<LostSignal>,
    renewer: Option<JoinHandle<()>>,
}

impl<S: Store + Clone> Holder<S> {
    /// Starts renewing `lease` of `key` every [`HoldOptions::renew_every`].
    ///
    /// It yields once, so the renewal task gets its first turn before the caller goes on:
    /// tokio runs a freshly spawned task next on the spawning worker, where no other worker
    /// may steal it, so an operation that then blocks this thread would starve it.
    pub async fn start(store: S, key: ScopedKey, lease: Lease, options: HoldOptions) -> Self {
        let lost = Arc::new(LostSignal::default());
        let renewer = (!options.renew_every.is_zero()).then(|| {
            tokio::spawn(renew_until_lost(
                store.clone(),
                key.clone(),
                lease.token,
                options,
                Arc::clone(&lost),
            ))
        });
        let holder = Self {
            store,
            key,
            token: lease.token,
            options,
            lost,
            renewer,
        };
        tokio::task::yield_now().await;
        holder
    }

    /// The key held.
    pub fn key(&self) -> &ScopedKey {
        &self.key
    }

    /// The token of this claim.
    pub fn token(&self) -> Token {
        self.token
    }

    /// Whether a renewal was refused: the lease ended or was taken over.
    pub fn is_lost(&self) -> bool {
        self.lost.lost.load(Ordering::SeqCst)
    }

    /// Resolves once a renewal was refused (at once if it already was).
    pub async fn lost(&self) {
        loop {
            let notified = self.lost.notify.notified();
            if self.is_lost() {
                return;
            }
            notified.await;
        }
    }

    /// Stores the operation's outcome for `retain`; returns when the record will expire.
    ///
    /// A store that fails is tried again with backoff for [`HoldOptions::complete_for`],
    /// while the lease is still renewed, so a brief outage does not let the key run twice.
    /// The holder of the current token may complete even after its lease ended, as long as
    /// no newer claim exists (the store contract). If the outcome still cannot be stored,
    /// the key is *not* released: it stays held until its lease ends, and the last error is
    /// returned for the caller to log and count. [`StoreError::LeaseLost`] means another
    /// claim took the key over.
    pub async fn complete(
        mut self,
        stored: &Stored,
        retain: Duration,
    ) -> Result<SystemTime, StoreError> {
        let give_up_at = tokio::time::Instant::now() + self.options.complete_for;
        let mut pause = FIRST_RETRY;
        let answer = loop {
            match self
                .store
                .complete(&self.key, self.token, stored, retain)
                .await
            {
                Ok(expires_at) => break Ok(expires_at),
                Err(StoreError::LeaseLost) => break Err(StoreError::LeaseLost),
                Err(error) if tokio::time::Instant::now() + pause >= give_up_at => {
                    break Err(error);
                }
                Err(error) => {
                    tracing::warn!(%error, key = %self.key.log_id(), "storing an outcome failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_RETRY);
                }
            }
        };
        self.stop_renewing();
        answer
    }

    /// Gives the key up without an outcome: nothing ran, or it may safely run again.
    /// If the store cannot be reached the key stays held until its lease ends.
    pub async fn release(mut self) -> Result<(), StoreError> {
        self.stop_renewing();
        self.store.release(&self.key, self.token).await
    }

    /// Stops renewing and leaves the key claimed until its lease ends: for an outcome that
    /// is unknown and must not be replayed nor run again at once.
    pub fn hold(mut self) {
        self.stop_renewing();
    }

    fn stop_renewing(&mut self) {
        if let Some(renewer) = self.renewer.take() {
            renewer.abort();
        }
    }
}

impl<S: Store + Clone> Drop for Holder<S> {
    fn drop(&mut self) {
        self.stop_renewing();
    }
}

async fn renew_until_lost<S: Store>(
    store: S,
    key: ScopedKey,
    token: Token,
    options: HoldOptions,
    lost: Arc<LostSignal>,
) {
    let mut pause = options.renew_every;
    loop {
        tokio::time::sleep(pause).await;
        match store.renew(&key, token, options.lease).await {
            Ok(_) => pause = options.renew_every,
            Err(StoreError::LeaseLost) => {
                tracing::warn!(
                    key = %key.log_id(),
                    "an idempotency lease was lost while its operation ran"
                );
                lost.set();
                return;
            }
            Err(error) => {
                tracing::warn!(%error, key = %key.log_id(), "renewing an idempotency lease failed; retrying");
                pause = (options.renew_every / 4).clamp(Duration::from_millis(1), MAX_RENEW_RETRY);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faulty::FaultyStore;
    use crate::{Begin, Fingerprint, Key, ManualClock, MemoryStore, Scope};

    fn key() -> ScopedKey {
        ScopedKey::new(Scope::anonymous(), Key::new("unit").unwrap())
    }

    fn options(lease_ms: u64) -> HoldOptions {
        HoldOptions::new(Duration::from_millis(lease_ms))
    }

    async fn claim<S: Store>(store: &S, lease: Duration) -> Lease {
        match store
            .begin(&key(), &Fingerprint::builder().finish(), lease)
            .await
        {
            Ok(Begin::Acquired(lease)) => lease,
            other => panic!("expected a claim, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn renews_on_its_own_task_while_the_work_is_not_polled() {
        let clock = ManualClock::new();
        let store = Arc::new(MemoryStore::with_clock(clock.clone()));
        let options = options(300);
        let lease = claim(&store, options.lease).await;
        let holder = Holder::start(Arc::clone(&store), key(), lease, options).await;
        // A blocking-ish operation: time passes in steps, nobody polls the holder.
        for _ in 0..10 {
            clock.advance(Duration::from_millis(100));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!holder.is_lost());
        holder
            .complete(&Stored::new(200), Duration::from_secs(60))
            .await
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn complete_retries_a_failing_store_until_it_recovers() {
        let store = Arc::new(FaultyStore::new(MemoryStore::new()));
        let options = options(60_000);
        let lease = claim(&store, options.lease).await;
        let holder = Holder::start(Arc::clone(&store), key(), lease, options).await;
        store.fail_next_completes(5);
        holder
            .complete(&Stored::new(201), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(store.completes(), 6);
        let fp = Fingerprint::builder().finish();
        assert!(matches!(
            store.begin(&key(), &fp, options.lease).await.unwrap(),
            Begin::Completed { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn an_outcome_that_cannot_be_stored_leaves_the_key_held() {
        let store = Arc::new(FaultyStore::new(MemoryStore::new()));
        let options = options(60_000);
        let lease = claim(&store, options.lease).await;
        let holder = Holder::start(Arc::clone(&store), key(), lease, options).await;
        store.fail_next_completes(u32::MAX);
        let started = tokio::time::Instant::now();
        let error = holder
            .complete(&Stored::new(201), Duration::from_secs(60))
            .await
            .unwrap_err();
        assert!(matches!(error, StoreError::Backend { .. }), "{error:?}");
        assert!(started.elapsed() <= options.complete_for);
        assert!(started.elapsed() >= options.complete_for - MAX_RETRY * 2);
        // Not released: a retry is told the key is in flight, it does not run again.
        let fp = Fingerprint::builder().finish();
        assert!(matches!(
            store.begin(&key(), &fp, options.lease).await.unwrap(),
            Begin::InFlight { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_takeover_is_reported_as_lost() {
        let clock = ManualClock::new();
        let store = Arc::new(MemoryStore::with_clock(clock.clone()));
        let options = HoldOptions {
            renew_every: Duration::from_millis(200),
            ..options(100)
        };
        let lease = claim(&store, options.lease).await;
        let holder = Holder::start(Arc::clone(&store), key(), lease, options).await;
        clock.advance(Duration::from_millis(150));
        let _newer = claim(&store, Duration::from_secs(60)).await;
        tokio::time::timeout(Duration::from_secs(1), holder.lost())
            .await
            .unwrap();
        assert!(holder.is_lost());
        let error = holder
            .complete(&Stored::new(200), Duration::from_secs(60))
            .await
            .unwrap_err();
        assert!(matches!(error, StoreError::LeaseLost), "{error:?}");
    }
}
