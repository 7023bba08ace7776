//! The broker-independent part: claim a message id, run the handler once, keep its outcome.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use idem_core::{
    Begin, Fingerprint, Holder, Key, KeyError, Lease, Record, Scope, ScopedKey, Store, StoreError,
    Stored, TimeoutStore,
};

use crate::context::{Cancellation, MessageContext, PanicPolicy};
use crate::{
    DeadLetterReason, DedupError, DedupOptions, HandlerError, OptionsError, Outcome, Replay, status,
};

/// The `status` of an attempt record (see [`Deduplicator::failed_attempts`]).
const ATTEMPT_FAILED: u16 = 4;
/// Attempt records are counted by doubling probes up to this, then bisection.
const MAX_COUNTED_ATTEMPTS: u64 = 1 << 40;

/// Which run of a message's handler this is, and how many may fail before it is given up.
///
/// The deduplicator counts failed runs itself, in the store, per message id (see
/// [`Deduplicator::failed_attempts`]); the run's number is the higher of that count plus
/// one and `delivered`. Adapters pass `delivered = 1`: broker delivery counts also count
/// deliveries that never ran the handler (a message bounced because another consumer held
/// it), and on RabbitMQ classic queues they are not counted at all. Pass a higher
/// `delivered` only if you count runs of this handler yourself.
///
/// ```
/// use idem_queue::DeliveryAttempt;
///
/// assert!(!DeliveryAttempt::new(2, Some(3)).is_final());
/// assert!(DeliveryAttempt::new(3, Some(3)).is_final());
/// assert!(!DeliveryAttempt::first().is_final());
/// assert_eq!(DeliveryAttempt::limit(Some(5)), DeliveryAttempt::new(1, Some(5)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryAttempt {
    /// The lowest number this run can have, from 1 (the deduplicator's own count may raise it).
    pub delivered: u64,
    /// After this many runs a transient failure is final; `None` means never.
    pub max_deliveries: Option<u64>,
}

impl DeliveryAttempt {
    /// Delivery `delivered` of at most `max_deliveries`.
    pub fn new(delivered: u64, max_deliveries: Option<u64>) -> Self {
        Self {
            delivered,
            max_deliveries,
        }
    }

    /// A first delivery with no limit.
    pub fn first() -> Self {
        Self::new(1, None)
    }

    /// At most `max_deliveries` runs, numbered by the deduplicator's own count alone.
    pub fn limit(max_deliveries: Option<u64>) -> Self {
        Self::new(1, max_deliveries)
    }

    /// Whether a transient failure now exhausts the deliveries.
    pub fn is_final(&self) -> bool {
        self.max_deliveries.is_some_and(|max| self.delivered >= max)
    }
}

impl Default for DeliveryAttempt {
    fn default() -> Self {
        Self::first()
    }
}

/// What [`Deduplicator::claim`] found.
#[derive(Debug)]
pub enum Claim<S: Store> {
    /// This consumer holds the message: run it with [`Held::run`].
    Acquired(Held<S>),
    /// Already completed.
    Duplicate(Replay),
    /// Held by another consumer.
    InFlight {
        /// Time left on the holder's lease.
        retry_after: Duration,
    },
    /// Claimed with another fingerprint.
    Mismatch,
}

pub(crate) struct Inner<S> {
    /// The caller's store behind a deadline on every call; shared with the renewal tasks.
    pub(crate) store: Arc<TimeoutStore<S>>,
    pub(crate) scope: Scope,
    pub(crate) dead_letter_scope: Scope,
    /// Where failed runs are counted: `<scope>.attempts`, keys `<n>:<id>`.
    pub(crate) attempts_scope: Scope,
    pub(crate) options: DedupOptions,
    pub(crate) fingerprint: Fingerprint,
    pub(crate) panic_policy: PanicPolicy,
}

/// Runs each message's handler once, over any [`Store`].
///
/// Each message id is a key in the deduplicator's scope (a consumer group, a stream or queue
/// name: consumers that must not both apply a message share a scope). For each delivery:
///
/// - a **new** id is claimed with a lease, the handler runs, and its outcome is stored
///   ([`status::OK`] with the output as body) before the caller acknowledges;
/// - a **duplicate** of a completed message returns the stored outcome, and the handler
///   does not run;
/// - a duplicate while another consumer **holds** the message is reported
///   [`Outcome::InFlight`] with the time left on that holder's lease;
/// - a **transient** handler error releases the claim, so a redelivery runs it again; a
///   **permanent** one (or any error on the last allowed delivery) is stored as a failure,
///   so the message is never run again and can be dead-lettered;
/// - while the message is held its lease is **renewed** every
///   [`DedupOptions::renew_interval`] by the core crate's [`Holder`], on a task of its own,
///   so a handler that is slow, CPU-bound or blocks its thread (inside
///   [`tokio::task::block_in_place`] or [`tokio::task::spawn_blocking`], see the crate
///   docs) keeps its claim; if another
///   consumer took the message over, the result is [`Outcome::LeaseLost`] and nothing is
///   stored;
/// - an outcome the store fails to take is retried with backoff for
///   [`DedupOptions::complete_for`]; if it still cannot be stored the claim is left held
///   until its lease ends, never released ([`Outcome::Unrecorded`]);
/// - a handler that **panics** is caught: the panic counts as a failed run, the claim is
///   released (or held until its lease ends, by [`PanicPolicy`]) and the result is
///   [`Outcome::Panicked`].
///
/// # Counting attempts
///
/// Failed runs are counted in the store itself, so the limit in [`DeliveryAttempt`] holds
/// on any broker and queue type (RabbitMQ classic queues count nothing; JetStream and
/// quorum queues also count deliveries that never reached the handler). The store contract
/// has no counters, so each failed run `n` of message `id` leaves a record of its own:
/// key `<n>:<id>` in the scope `<scope>.attempts`, written with `begin` and `complete` by
/// the consumer that holds the message's claim (so only one writes at a time), kept for
/// [`DedupOptions::retention`], with the error text in an `error` header. The records are
/// numbered from 1 without gaps, so a claim counts them with a few `get`s (doubling probes,
/// then bisection: one `get` for a message that never failed). Writing the record comes
/// before the claim is released; if the store fails it the attempt goes uncounted (one more
/// run, logged). Runs that never finish (the process died) are not counted: the broker's
/// own limit (`max_deliver`, a quorum queue's `delivery-limit`) is the backstop for those.
/// [`Deduplicator::reset_attempts`] deletes them (before replaying a dead letter).
///
/// Every store call has a deadline, [`DedupOptions::store_timeout`].
///
/// Ids are keys when they are 1 to 255 printable ASCII characters; any other non-empty id
/// is replaced by `blake3:` and the hex BLAKE3 hash of its bytes.
///
/// # Guarantees
///
/// - A message whose handler **completed** never runs again within
///   [`DedupOptions::retention`], on any consumer sharing the store and scope (across
///   restarts, with a durable store). After retention a duplicate runs again.
/// - A consumer that dies **mid-handler** holds the id until its lease ends; a redelivery
///   after that runs the handler again (at least once). The same holds for a handler whose
///   outcome could not be stored ([`Outcome::Unrecorded`]): no redelivery runs it again
///   before its lease ends. Effects that must not repeat even then belong in the same
///   database transaction as the claim: see [`Inbox`](crate::inbox::Inbox).
///
/// ```
/// use bytes::Bytes;
/// use idem_core::{MemoryStore, Scope};
/// use idem_queue::{Deduplicator, Outcome};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dedup = Deduplicator::new(MemoryStore::new(), Scope::new("billing-consumers"));
///
/// let first = dedup.process("msg-1", || async { Ok(Bytes::from("charged")) }).await?;
/// assert!(matches!(first, Outcome::Processed { .. }));
///
/// // A redelivery: the handler does not run, the first output comes back.
/// let again = dedup.process("msg-1", || async { Ok("never runs twice") }).await?;
/// let Outcome::Duplicate(replay) = again else { panic!("expected a duplicate") };
/// assert_eq!(replay.output().unwrap(), "charged");
/// # Ok(()) }
/// ```
pub struct Deduplicator<S> {
    pub(crate) inner: Arc<Inner<S>>,
}

impl<S> Clone for Deduplicator<S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Deduplicator<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deduplicator")
            .field("store", &self.inner.store)
            .field("scope", &self.inner.scope)
            .field("dead_letter_scope", &self.inner.dead_letter_scope)
            .field("attempts_scope", &self.inner.attempts_scope)
            .field("options", &self.inner.options)
            .field("panic_policy", &self.inner.panic_policy)
            .finish()
    }
}

/// The fingerprint of every message processed without one: ids alone decide duplicates.
fn default_fingerprint() -> Fingerprint {
    Fingerprint::builder()
        .part("idem-queue", b"message id only")
        .finish()
}

impl<S: Store> Deduplicator<S> {
    /// A deduplicator with the default [`DedupOptions`].
    pub fn new(store: S, scope: Scope) -> Self {
        Self::build(store, scope, DedupOptions::default())
    }

    /// A deduplicator with these options, once they [validate](DedupOptions::validate).
    ///
    /// ```
    /// use std::time::Duration;
    /// use idem_core::{MemoryStore, Scope};
    /// use idem_queue::{DedupOptions, Deduplicator};
    ///
    /// let options = DedupOptions { lease: Duration::from_secs(5), ..DedupOptions::default() };
    /// let dedup = Deduplicator::with_options(MemoryStore::new(), Scope::new("orders"), options)?;
    /// assert_eq!(dedup.dead_letter_scope().as_str(), "orders.dead-letter");
    /// # Ok::<(), idem_queue::OptionsError>(())
    /// ```
    pub fn with_options(
        store: S,
        scope: Scope,
        options: DedupOptions,
    ) -> Result<Self, OptionsError> {
        options.validate()?;
        Ok(Self::build(store, scope, options))
    }

    fn build(store: S, scope: Scope, options: DedupOptions) -> Self {
        let dead_letter_scope = options
            .dead_letter_scope
            .clone()
            .unwrap_or_else(|| Scope::new(format!("{}.dead-letter", scope.as_str())));
        let attempts_scope = Scope::new(format!("{}.attempts", scope.as_str()));
        Self {
            inner: Arc::new(Inner {
                store: Arc::new(TimeoutStore::new(store, options.store_timeout)),
                scope,
                dead_letter_scope,
                attempts_scope,
                options,
                fingerprint: default_fingerprint(),
                panic_policy: PanicPolicy::default(),
            }),
        }
    }

    /// The same deduplicator, with `policy` for handlers that panic.
    ///
    /// ```
    /// use idem_core::{MemoryStore, Scope};
    /// use idem_queue::{Deduplicator, PanicPolicy};
    ///
    /// let dedup = Deduplicator::new(MemoryStore::new(), Scope::new("s")).with_panic_policy(PanicPolicy::Hold);
    /// assert_eq!(dedup.panic_policy(), PanicPolicy::Hold);
    /// ```
    pub fn with_panic_policy(self, policy: PanicPolicy) -> Self {
        let inner = &self.inner;
        Self {
            inner: Arc::new(Inner {
                store: Arc::clone(&inner.store),
                scope: inner.scope.clone(),
                dead_letter_scope: inner.dead_letter_scope.clone(),
                attempts_scope: inner.attempts_scope.clone(),
                options: inner.options.clone(),
                fingerprint: inner.fingerprint,
                panic_policy: policy,
            }),
        }
    }

    /// What becomes of a claim whose handler panicked.
    pub fn panic_policy(&self) -> PanicPolicy {
        self.inner.panic_policy
    }

    /// The scope failed runs are counted in (see [Counting attempts](Self#counting-attempts)).
    pub fn attempts_scope(&self) -> &Scope {
        &self.inner.attempts_scope
    }

    /// The store, without the deadlines the deduplicator puts on its own calls.
    pub fn store(&self) -> &S {
        self.inner.store.get_ref()
    }

    /// The scope message ids live in.
    pub fn scope(&self) -> &Scope {
        &self.inner.scope
    }

    /// The scope dead-letter records live in.
    pub fn dead_letter_scope(&self) -> &Scope {
        &self.inner.dead_letter_scope
    }

    /// The options.
    pub fn options(&self) -> &DedupOptions {
        &self.inner.options
    }

    /// The record key for a message id in `scope`.
    pub(crate) fn key_in(scope: &Scope, id: &str) -> Result<ScopedKey, DedupError> {
        let key = match Key::new(id) {
            Ok(key) => key,
            Err(KeyError::Empty) => return Err(DedupError::InvalidId(KeyError::Empty)),
            Err(_) => {
                let hash = blake3::hash(id.as_bytes());
                Key::new(&format!("blake3:{}", hash.to_hex())).map_err(DedupError::InvalidId)?
            }
        };
        Ok(ScopedKey::new(scope.clone(), key))
    }

    /// The record key a message id maps to.
    ///
    /// ```
    /// use idem_core::{MemoryStore, Scope};
    /// use idem_queue::Deduplicator;
    ///
    /// let dedup = Deduplicator::new(MemoryStore::new(), Scope::new("s"));
    /// assert_eq!(dedup.key("order-1").unwrap().key().as_str(), "order-1");
    /// assert!(dedup.key("caf\u{e9}").unwrap().key().as_str().starts_with("blake3:"));
    /// assert!(dedup.key("").is_err());
    /// ```
    pub fn key(&self, id: &str) -> Result<ScopedKey, DedupError> {
        Self::key_in(&self.inner.scope, id)
    }

    /// Claims message `id` (with `fingerprint`, if the payload should be checked too).
    ///
    /// Most callers want [`Deduplicator::process`]; `claim` is for adapters that must look
    /// at the answer before deciding to run anything.
    pub async fn claim(
        &self,
        id: &str,
        fingerprint: Option<&Fingerprint>,
    ) -> Result<Claim<S>, DedupError> {
        let key = self.key(id)?;
        let fingerprint = fingerprint.unwrap_or(&self.inner.fingerprint);
        let begin = self
            .inner
            .store
            .begin(&key, fingerprint, self.inner.options.lease)
            .await
            .map_err(DedupError::Store)?;
        Ok(match begin {
            Begin::Acquired(lease) => {
                // Counted before the renewal starts: `Holder::start` yields so its task gets a
                // first turn just before the handler runs, which a store round trip in
                // between would undo (a handler that blocks its thread could starve it).
                let failures = match self.failed_attempts(id).await {
                    Ok(failures) => failures,
                    Err(error) => {
                        // Nothing ran: give the message back for a later delivery.
                        if let Err(release) = self.inner.store.release(&key, lease.token).await {
                            tracing::warn!(%id, error = %release, "releasing a claim failed");
                        }
                        return Err(error);
                    }
                };
                let holder = Holder::start(
                    Arc::clone(&self.inner.store),
                    key,
                    lease,
                    self.inner.options.hold_options(),
                )
                .await;
                Claim::Acquired(Held {
                    dedup: self.clone(),
                    holder,
                    lease,
                    id: id.to_owned(),
                    failures,
                })
            }
            Begin::Completed { stored, expires_at } => {
                Claim::Duplicate(Replay { stored, expires_at })
            }
            Begin::InFlight { retry_after } => Claim::InFlight { retry_after },
            Begin::Mismatch => Claim::Mismatch,
        })
    }

    /// Runs `handler` for message `id` unless it already ran: a first delivery with no
    /// delivery limit and no fingerprint. See [`Deduplicator::process_with`].
    pub async fn process<F, Fut, T>(&self, id: &str, handler: F) -> Result<Outcome, DedupError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, HandlerError>>,
        T: Into<Bytes>,
    {
        self.process_with(id, None, DeliveryAttempt::first(), handler)
            .await
    }

    /// Runs `handler` for message `id` unless it already ran or another consumer holds it.
    ///
    /// `fingerprint` binds the id to the message's content (a re-use of the id with another
    /// payload is then [`Outcome::Mismatch`]); `attempt` says whether a transient failure
    /// now is the last allowed one.
    ///
    /// ```
    /// use idem_core::{MemoryStore, Scope};
    /// use idem_queue::{DeliveryAttempt, DeadLetterReason, Deduplicator, HandlerError, Outcome};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dedup = Deduplicator::new(MemoryStore::new(), Scope::new("s"));
    /// let fail = || async { Err::<&str, _>(HandlerError::transient("downstream busy")) };
    ///
    /// // A transient failure before the last delivery releases the claim...
    /// let outcome = dedup.process_with("m", None, DeliveryAttempt::new(1, Some(2)), fail).await?;
    /// assert!(matches!(outcome, Outcome::Released { .. }));
    /// // ...and on the last one it is stored as given up, never to run again.
    /// let outcome = dedup.process_with("m", None, DeliveryAttempt::new(2, Some(2)), fail).await?;
    /// assert!(matches!(outcome, Outcome::Failed { reason: DeadLetterReason::MaxDeliveries, .. }));
    /// # Ok(()) }
    /// ```
    pub async fn process_with<F, Fut, T>(
        &self,
        id: &str,
        fingerprint: Option<&Fingerprint>,
        attempt: DeliveryAttempt,
        handler: F,
    ) -> Result<Outcome, DedupError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, HandlerError>>,
        T: Into<Bytes>,
    {
        self.process_in_context(id, fingerprint, attempt, |_| handler())
            .await
    }

    /// Like [`process_with`](Self::process_with), for a handler that wants its
    /// [`MessageContext`]: the id, the attempt number, and the signal that fires if the
    /// claim is lost while it runs.
    pub async fn process_in_context<F, Fut, T>(
        &self,
        id: &str,
        fingerprint: Option<&Fingerprint>,
        attempt: DeliveryAttempt,
        handler: F,
    ) -> Result<Outcome, DedupError>
    where
        F: FnOnce(MessageContext) -> Fut,
        Fut: Future<Output = Result<T, HandlerError>>,
        T: Into<Bytes>,
    {
        match self.claim(id, fingerprint).await? {
            Claim::Acquired(held) => held.run_in_context(attempt, handler).await,
            Claim::Duplicate(replay) => Ok(Outcome::Duplicate(replay)),
            Claim::InFlight { retry_after } => Ok(Outcome::InFlight { retry_after }),
            Claim::Mismatch => Ok(Outcome::Mismatch),
        }
    }

    /// The live record for message `id`, if any.
    pub async fn record(&self, id: &str) -> Result<Option<Record>, DedupError> {
        let key = self.key(id)?;
        self.inner.store.get(&key).await.map_err(DedupError::Store)
    }

    fn attempt_key(&self, id: &str, n: u64) -> Result<ScopedKey, DedupError> {
        Self::key_in(&self.inner.attempts_scope, &format!("{n}:{id}"))
    }

    async fn attempt_recorded(&self, id: &str, n: u64) -> Result<bool, DedupError> {
        let key = self.attempt_key(id, n)?;
        let record = self
            .inner
            .store
            .get(&key)
            .await
            .map_err(DedupError::Store)?;
        Ok(record.is_some())
    }

    /// How many runs of message `id` failed (transiently, or by panicking) and were
    /// recorded, within [`DedupOptions::retention`]. See
    /// [Counting attempts](Self#counting-attempts).
    ///
    /// ```
    /// use idem_core::{MemoryStore, Scope};
    /// use idem_queue::{Deduplicator, HandlerError};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dedup = Deduplicator::new(MemoryStore::new(), Scope::new("s"));
    /// for _ in 0..3 {
    ///     dedup.process("m", || async { Err::<&str, _>(HandlerError::transient("busy")) }).await?;
    /// }
    /// assert_eq!(dedup.failed_attempts("m").await?, 3);
    /// dedup.reset_attempts("m").await?;
    /// assert_eq!(dedup.failed_attempts("m").await?, 0);
    /// # Ok(()) }
    /// ```
    pub async fn failed_attempts(&self, id: &str) -> Result<u64, DedupError> {
        // Records 1..=n exist and none above: find n with doubling probes, then bisect.
        if !self.attempt_recorded(id, 1).await? {
            return Ok(0);
        }
        let (mut present, mut absent) = (1u64, 2u64);
        while absent < MAX_COUNTED_ATTEMPTS && self.attempt_recorded(id, absent).await? {
            present = absent;
            absent = absent.saturating_mul(2);
        }
        while absent - present > 1 {
            let middle = present + (absent - present) / 2;
            if self.attempt_recorded(id, middle).await? {
                present = middle;
            } else {
                absent = middle;
            }
        }
        Ok(present)
    }

    /// Deletes the failed runs counted for message `id`, so its next run is attempt 1 again
    /// (for replaying a dead letter after fixing its cause). Returns how many there were.
    pub async fn reset_attempts(&self, id: &str) -> Result<u64, DedupError> {
        let failures = self.failed_attempts(id).await?;
        // From the top, so an interrupted reset leaves a shorter run of records, not a gap.
        for n in (1..=failures).rev() {
            let key = self.attempt_key(id, n)?;
            self.inner
                .store
                .delete(&key)
                .await
                .map_err(DedupError::Store)?;
        }
        Ok(failures)
    }

    /// Records failed run `n` of message `id`; the caller holds the message's claim.
    async fn record_failure(&self, id: &str, n: u64, error: &str) {
        let store = &self.inner.store;
        let options = &self.inner.options;
        let written = async {
            let key = self.attempt_key(id, n)?;
            if let Begin::Acquired(claim) = store
                .begin(&key, &self.inner.fingerprint, options.lease)
                .await
                .map_err(DedupError::Store)?
            {
                let stored = Stored::new(ATTEMPT_FAILED).with_header("error", error.to_owned());
                store
                    .complete(&key, claim.token, &stored, options.retention)
                    .await
                    .map_err(DedupError::Store)?;
            }
            // Otherwise a consumer that took the message over already recorded this run.
            Ok::<_, DedupError>(())
        };
        if let Err(error) = written.await {
            tracing::warn!(%id, attempt = n, %error, "recording a failed run failed; it is not counted");
        }
    }
}

/// The text of a caught panic.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|text| (*text).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text panic payload".to_owned())
}

/// A claimed message: run it, or give it back.
///
/// Its lease is renewed on a task of its own from the moment it is claimed. Dropping a
/// `Held` without [`run`](Held::run), [`complete`](Held::complete) or
/// [`release`](Held::release) stops the renewal and leaves the message in flight until its
/// lease ends.
#[derive(Debug)]
pub struct Held<S: Store> {
    dedup: Deduplicator<S>,
    holder: Holder<Arc<TimeoutStore<S>>>,
    lease: Lease,
    id: String,
    failures: u64,
}

impl<S: Store> Held<S> {
    /// The record key.
    pub fn key(&self) -> &ScopedKey {
        self.holder.key()
    }

    /// The message id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The lease as first granted.
    pub fn lease(&self) -> Lease {
        self.lease
    }

    /// Which run this would be by the deduplicator's own count: failed runs recorded, plus
    /// one.
    pub fn attempt(&self) -> u64 {
        self.failures.saturating_add(1)
    }

    /// Whether the claim was lost: a renewal found another consumer's claim (or the lease
    /// ended) while this one held the message.
    pub fn is_lost(&self) -> bool {
        self.holder.is_lost()
    }

    /// Runs `handler` while the lease is renewed beside it, and stores or releases according
    /// to its result (see [`Deduplicator`]).
    pub async fn run<F, Fut, T>(
        self,
        attempt: DeliveryAttempt,
        handler: F,
    ) -> Result<Outcome, DedupError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, HandlerError>>,
        T: Into<Bytes>,
    {
        self.run_in_context(attempt, |_| handler()).await
    }

    /// Like [`run`](Self::run), handing the handler its [`MessageContext`]. Its
    /// cancellation fires, from a task of its own, when a renewal finds the claim lost.
    /// A panic in the handler is caught (see [`PanicPolicy`]).
    pub async fn run_in_context<F, Fut, T>(
        self,
        attempt: DeliveryAttempt,
        handler: F,
    ) -> Result<Outcome, DedupError>
    where
        F: FnOnce(MessageContext) -> Fut,
        Fut: Future<Output = Result<T, HandlerError>>,
        T: Into<Bytes>,
    {
        let number = attempt.delivered.max(self.attempt());
        let attempt = DeliveryAttempt::new(number, attempt.max_deliveries);
        let cancellation = Cancellation::new();
        let context = MessageContext {
            id: self.id.clone(),
            attempt: number,
            max_attempts: attempt.max_deliveries,
            cancellation: cancellation.clone(),
        };
        let Held {
            dedup,
            holder,
            lease,
            id,
            failures,
        } = self;

        // The lost signal is relayed by a task of its own, so a handler that blocks its
        // thread still sees `is_cancelled()` turn true.
        let holder = Arc::new(holder);
        let relay = tokio::spawn({
            let holder = Arc::clone(&holder);
            async move {
                holder.lost().await;
                cancellation.cancel();
            }
        });
        // A task spawned last runs next on this worker and cannot be stolen from it: give
        // the relay its first turn before a handler that may block this thread.
        tokio::task::yield_now().await;
        let result = AssertUnwindSafe(async move { handler(context).await.map(Into::into) })
            .catch_unwind()
            .await;
        relay.abort();
        let _ = relay.await;
        let mut holder = holder;
        let holder = loop {
            match Arc::try_unwrap(holder) {
                Ok(holder) => break holder,
                // The aborted relay drops its reference when its task is torn down.
                Err(shared) => {
                    holder = shared;
                    tokio::task::yield_now().await;
                }
            }
        };
        let held = Held {
            dedup,
            holder,
            lease,
            id,
            failures,
        };

        let (error, panicked) = match result {
            Ok(Ok(output)) => {
                let stored = Stored::new(status::OK).with_body(output.clone());
                return Ok(match held.store(&stored).await {
                    Ok(()) => Outcome::Processed { output },
                    Err(StoreError::LeaseLost) => Outcome::LeaseLost { result: Ok(output) },
                    Err(error) => Outcome::Unrecorded {
                        result: Ok(output),
                        error,
                    },
                });
            }
            Ok(Err(error)) => (error, false),
            Err(payload) => {
                let text = panic_text(&*payload);
                tracing::error!(id = %held.id, attempt = number, panic = %text, "a message handler panicked");
                (
                    HandlerError::transient(format!("the handler panicked: {text}")),
                    true,
                )
            }
        };

        if error.is_permanent() || attempt.is_final() {
            let reason = if error.is_permanent() {
                DeadLetterReason::Permanent
            } else {
                DeadLetterReason::MaxDeliveries
            };
            let stored = Stored::new(reason.code())
                .with_header("error", error.to_string())
                .with_header("deliveries", number.to_string());
            return Ok(match held.store(&stored).await {
                Ok(()) => Outcome::Failed { error, reason },
                Err(StoreError::LeaseLost) => Outcome::LeaseLost { result: Err(error) },
                Err(store) => Outcome::Unrecorded {
                    result: Err(error),
                    error: store,
                },
            });
        }

        if held.is_lost() {
            // Another consumer took the message over: its run counts, not this one.
            return Ok(Outcome::LeaseLost { result: Err(error) });
        }
        held.dedup
            .record_failure(&held.id, number, &error.to_string())
            .await;
        let key = held.key().clone();
        let keep = panicked && held.dedup.inner.panic_policy == PanicPolicy::Hold;
        if keep {
            // Stop renewing: redeliveries are "in flight" until the lease ends.
            held.holder.hold();
        } else if let Err(release) = held.holder.release().await {
            // The lease ends by itself; until then redeliveries see the message in flight.
            tracing::warn!(?key, error = %release, "releasing a failed message's claim failed");
        }
        Ok(if panicked {
            Outcome::Panicked {
                error,
                released: !keep,
            }
        } else {
            Outcome::Released { error }
        })
    }

    /// Completes the claim with `output` without running anything (the work was done
    /// elsewhere). On [`DedupError::Unrecorded`] the claim stays held until its lease ends.
    pub async fn complete(self, output: impl Into<Bytes>) -> Result<(), DedupError> {
        let stored = Stored::new(status::OK).with_body(output.into());
        self.store(&stored).await.map_err(DedupError::Unrecorded)
    }

    /// Gives the message back unrun: a redelivery may run it.
    pub async fn release(self) -> Result<(), DedupError> {
        self.holder.release().await.map_err(DedupError::Store)
    }

    /// Stores an outcome through the [`Holder`]: a failing store is retried for
    /// [`DedupOptions::complete_for`] while the lease is still renewed, since the handler has
    /// run and giving up early would let a redelivery run it again. Even on failure the
    /// claim is not released.
    async fn store(self, stored: &Stored) -> Result<(), StoreError> {
        let key = self.key().clone();
        let retention = self.dedup.inner.options.retention;
        match self.holder.complete(stored, retention).await {
            Ok(_) => Ok(()),
            Err(StoreError::LeaseLost) => {
                tracing::warn!(
                    ?key,
                    "the message was taken over while its handler ran; its outcome is not stored"
                );
                Err(StoreError::LeaseLost)
            }
            Err(error) => {
                tracing::error!(
                    ?key,
                    %error,
                    "the handler ran but its outcome could not be stored; the message stays \
                     claimed until its lease ends, and a redelivery after that runs it again"
                );
                Err(error)
            }
        }
    }
}
