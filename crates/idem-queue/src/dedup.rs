//! The broker-independent part: claim a message id, run the handler once, keep its outcome.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use idem::{
    Begin, BoxError, Fingerprint, HoldOptions, Holder, Key, KeyError, Lease, Record, RecordState,
    Scope, ScopedKey, Store, StoreError, Stored, TimeoutStore,
};

/// The `status` values this crate writes into a [`Stored`] outcome.
///
/// A message's record holds [`OK`](status::OK) and the handler's output as its body, or one
/// of the failure codes (the same codes as [`DeadLetterReason::code`]) and the error text in
/// an `error` header.
pub mod status {
    /// The handler succeeded; the body is its output.
    pub const OK: u16 = 0;
    /// The handler failed with an error it marked permanent.
    pub const FAILED: u16 = 1;
    /// The handler failed on the last allowed delivery.
    pub const GAVE_UP: u16 = 2;
    /// Only in dead-letter records: the id came back with another fingerprint.
    pub const MISMATCH: u16 = 3;
}

/// Lease, renewal, store deadlines and retention for a [`Deduplicator`].
///
/// The defaults suit handlers that take up to a few seconds and brokers that redeliver
/// within days:
///
/// | field | default | meaning |
/// |---|---|---|
/// | `lease` | 30 s | how long a claim holds without renewal; after it, another consumer may take the message over (10 ms to 1 day) |
/// | `renew_every` | `lease / 3` | how often a held message's lease is renewed, on a task of its own |
/// | `retention` | 7 days | how long a completed message is remembered (at least `lease`, at most 100 years) |
/// | `dead_letter_retention` | 30 days | how long a dead-letter record is kept (at most 100 years) |
/// | `store_timeout` | 5 s | the deadline of every store call; a call that takes longer fails with [`StoreError::Timeout`] (at most 10 minutes) |
/// | `complete_for` | 30 s | how long storing a handler's outcome is retried, with backoff and the lease still renewed, when the store fails (at most 1 day) |
///
/// If an outcome still cannot be stored after `complete_for`, the claim is **not**
/// released: it stays held until its lease ends, so a redelivery meanwhile is answered
/// [`Outcome::InFlight`] instead of running the handler again (see
/// [`Outcome::Unrecorded`]).
///
/// **The retention window must cover the longest redelivery or replay horizon**: a
/// duplicate that arrives after `retention` is indistinguishable from a new message and runs
/// again. Set it at least to the broker's longest redelivery delay plus the age of the
/// oldest message that can still be redelivered or replayed: the stream's `max_age` on
/// JetStream if consumers may be reset or recreated, the queue's message TTL or the longest
/// a message may sit unacked on RabbitMQ, and the producer's own retry horizon for
/// re-published messages.
///
/// ```
/// use std::time::Duration;
/// use idem_queue::DedupOptions;
///
/// let options = DedupOptions {
///     lease: Duration::from_secs(60),
///     retention: Duration::from_secs(3 * 24 * 3600),
///     store_timeout: Duration::from_secs(2),
///     ..DedupOptions::default()
/// };
/// options.validate().unwrap();
/// assert_eq!(options.renew_interval(), Duration::from_secs(20));
/// assert_eq!(options.complete_for, Duration::from_secs(30));
/// ```
#[derive(Debug, Clone)]
pub struct DedupOptions {
    /// How long a claim holds without renewal.
    pub lease: Duration,
    /// How often a held message's lease is renewed; `None` means `lease / 3`.
    pub renew_every: Option<Duration>,
    /// How long a completed message is remembered (and its duplicates suppressed).
    pub retention: Duration,
    /// Where dead-letter records live; `None` means the scope's name plus `.dead-letter`.
    pub dead_letter_scope: Option<Scope>,
    /// How long a dead-letter record is kept.
    pub dead_letter_retention: Duration,
    /// The client-side deadline of every call to the store.
    pub store_timeout: Duration,
    /// How long storing an outcome is retried after the handler ran, before the claim is
    /// left held until its lease ends.
    pub complete_for: Duration,
}

impl Default for DedupOptions {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            renew_every: None,
            retention: Duration::from_secs(7 * DAY_SECS),
            dead_letter_scope: None,
            dead_letter_retention: Duration::from_secs(30 * DAY_SECS),
            store_timeout: Duration::from_secs(5),
            complete_for: Duration::from_secs(30),
        }
    }
}

const DAY_SECS: u64 = 24 * 3600;
/// Bounds that keep every duration far from overflowing the stores' time arithmetic.
const MAX_LEASE: Duration = Duration::from_secs(DAY_SECS);
const MAX_RETENTION: Duration = Duration::from_secs(100 * 365 * DAY_SECS);
const MAX_STORE_TIMEOUT: Duration = Duration::from_secs(600);
const MAX_COMPLETE_FOR: Duration = Duration::from_secs(DAY_SECS);

/// A [`DedupOptions`] field with a value that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid option `{field}`: {reason}")]
pub struct ConfigError {
    /// The field's name.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl DedupOptions {
    /// The effective renewal interval.
    pub fn renew_interval(&self) -> Duration {
        self.renew_every.unwrap_or(self.lease / 3)
    }

    /// The lease lifecycle these options ask for, as the core crate's [`Holder`] takes it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use idem_queue::DedupOptions;
    ///
    /// let hold = DedupOptions::default().hold_options();
    /// assert_eq!(hold.renew_every, Duration::from_secs(10));
    /// assert_eq!(hold.complete_for, Duration::from_secs(30));
    /// ```
    pub fn hold_options(&self) -> HoldOptions {
        HoldOptions {
            lease: self.lease,
            renew_every: self.renew_interval(),
            complete_for: self.complete_for,
        }
    }

    /// Checks that the options can work together; the error names the bad field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, reason: &str| {
            Err(ConfigError {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.lease < Duration::from_millis(10) || self.lease > MAX_LEASE {
            return bad("lease", "must be between 10 ms and 1 day");
        }
        let renew = self.renew_interval();
        if renew.is_zero() || renew >= self.lease {
            return bad("renew_every", "must be above zero and below `lease`");
        }
        if self.retention < self.lease {
            return bad(
                "retention",
                "must be at least `lease` (and should cover the broker's redelivery horizon)",
            );
        }
        if self.retention > MAX_RETENTION {
            return bad("retention", "must be at most 100 years");
        }
        if self.dead_letter_retention.is_zero() || self.dead_letter_retention > MAX_RETENTION {
            return bad(
                "dead_letter_retention",
                "must be above zero and at most 100 years",
            );
        }
        if self.store_timeout.is_zero() || self.store_timeout > MAX_STORE_TIMEOUT {
            return bad("store_timeout", "must be above zero and at most 10 minutes");
        }
        if self.complete_for.is_zero() || self.complete_for > MAX_COMPLETE_FOR {
            return bad("complete_for", "must be above zero and at most 1 day");
        }
        Ok(())
    }
}

/// A handler's failure, and whether retrying could help.
///
/// Any error converts into a *transient* one with `?`: the claim is released and the broker
/// redelivers. Mark an error [permanent](HandlerError::permanent) when retrying cannot help
/// (a malformed message, a rejected business rule): the message is then completed with a
/// failure outcome, dead-lettered and never run again.
///
/// ```
/// use idem_queue::{HandlerError, ResultExt};
///
/// fn parse(payload: &[u8]) -> Result<u64, HandlerError> {
///     let text = std::str::from_utf8(payload).permanent()?;
///     Ok(text.parse::<u64>().permanent()?)
/// }
/// assert!(parse(b"x").unwrap_err().is_permanent());
/// assert!(!HandlerError::transient("database busy").is_permanent());
/// ```
pub struct HandlerError {
    source: BoxError,
    permanent: bool,
}

impl HandlerError {
    /// A failure that may go away: the message is retried.
    pub fn transient(source: impl Into<BoxError>) -> Self {
        Self {
            source: source.into(),
            permanent: false,
        }
    }

    /// A failure that retrying cannot fix: the message is dead-lettered.
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        Self {
            source: source.into(),
            permanent: true,
        }
    }

    /// Whether the handler marked this failure permanent.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    /// The underlying error.
    pub fn error(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.source
    }

    /// The underlying error, owned.
    pub fn into_source(self) -> BoxError {
        self.source
    }
}

impl<E: StdError + Send + Sync + 'static> From<E> for HandlerError {
    fn from(error: E) -> Self {
        Self::transient(error)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("permanent", &self.permanent)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.permanent {
            "permanent"
        } else {
            "transient"
        };
        write!(f, "{kind} handler error: {}", self.source)
    }
}

/// Marks a `Result`'s error as a permanent or transient [`HandlerError`].
pub trait ResultExt<T> {
    /// The error, if any, becomes a permanent [`HandlerError`].
    fn permanent(self) -> Result<T, HandlerError>;
    /// The error, if any, becomes a transient [`HandlerError`].
    fn transient(self) -> Result<T, HandlerError>;
}

impl<T, E: Into<BoxError>> ResultExt<T> for Result<T, E> {
    fn permanent(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::permanent)
    }
    fn transient(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::transient)
    }
}

/// Why the deduplicator could not decide or record a message's fate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DedupError {
    /// The message id is empty.
    #[error("message id is not usable as a key")]
    InvalidId(#[source] KeyError),
    /// The store failed or missed its deadline ([`DedupOptions::store_timeout`]) before
    /// anything ran; the message may be retried.
    #[error("the idempotency store failed; the handler did not run")]
    Store(#[source] StoreError),
    /// [`Held::complete`] could not store the outcome, even retried for
    /// [`DedupOptions::complete_for`]. The claim was not released: it stays held until its
    /// lease ends, so redeliveries meanwhile are [in flight](Outcome::InFlight).
    #[error("the outcome could not be stored; the message stays claimed until its lease ends")]
    Unrecorded(#[source] StoreError),
}

/// How many times the broker has delivered this message, and how many it may.
///
/// ```
/// use idem_queue::Attempt;
///
/// assert!(!Attempt::new(2, Some(3)).is_final());
/// assert!(Attempt::new(3, Some(3)).is_final());
/// assert!(!Attempt::first().is_final());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// This delivery's number, from 1.
    pub delivered: u64,
    /// After this many deliveries a transient failure is final; `None` means never.
    pub max_deliveries: Option<u64>,
}

impl Attempt {
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

    /// Whether a transient failure now exhausts the deliveries.
    pub fn is_final(&self) -> bool {
        self.max_deliveries.is_some_and(|max| self.delivered >= max)
    }
}

impl Default for Attempt {
    fn default() -> Self {
        Self::first()
    }
}

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterReason {
    /// The handler failed with a permanent error.
    Permanent,
    /// The handler failed on the last allowed delivery.
    MaxDeliveries,
    /// The id was seen before with another fingerprint (another payload).
    Mismatch,
}

impl DeadLetterReason {
    /// The code kept as the record's `status` (see [`status`]).
    pub fn code(self) -> u16 {
        match self {
            Self::Permanent => status::FAILED,
            Self::MaxDeliveries => status::GAVE_UP,
            Self::Mismatch => status::MISMATCH,
        }
    }

    /// The reason for a status code, if it names one.
    pub fn from_code(code: u16) -> Option<Self> {
        match code {
            status::FAILED => Some(Self::Permanent),
            status::GAVE_UP => Some(Self::MaxDeliveries),
            status::MISMATCH => Some(Self::Mismatch),
            _ => None,
        }
    }

    /// A short name: `permanent`, `max-deliveries` or `mismatch`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Permanent => "permanent",
            Self::MaxDeliveries => "max-deliveries",
            Self::Mismatch => "mismatch",
        }
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message given up on, kept in the store under the dead-letter scope so it can be
/// inspected and replayed by hand.
///
/// ```
/// use bytes::Bytes;
/// use idem_queue::{DeadLetter, DeadLetterReason};
///
/// let letter = DeadLetter {
///     id: "order-7".into(),
///     reason: DeadLetterReason::MaxDeliveries,
///     deliveries: 5,
///     error: Some("inventory service unreachable".into()),
///     origin: "nats stream=ORDERS seq=42 subject=orders.created".into(),
///     payload: Bytes::from_static(b"{\"order\":7}"),
/// };
/// assert_eq!(DeadLetter::from_stored(&letter.to_stored()), Some(letter));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The message id.
    pub id: String,
    /// Why it was given up on.
    pub reason: DeadLetterReason,
    /// The delivery on which it was given up.
    pub deliveries: u64,
    /// The handler's last error, as text.
    pub error: Option<String>,
    /// Where it came from (broker, stream or queue, position).
    pub origin: String,
    /// The message body.
    pub payload: Bytes,
}

impl DeadLetter {
    /// The record's stored form: `status` is the reason's code, the fields are headers and
    /// the payload is the body.
    pub fn to_stored(&self) -> Stored {
        let mut stored = Stored::new(self.reason.code())
            .with_header("id", self.id.clone())
            .with_header("reason", self.reason.as_str())
            .with_header("deliveries", self.deliveries.to_string())
            .with_header("origin", self.origin.clone())
            .with_body(self.payload.clone());
        if let Some(error) = &self.error {
            stored = stored.with_header("error", error.clone());
        }
        stored
    }

    /// Reads a record written by [`DeadLetter::to_stored`].
    pub fn from_stored(stored: &Stored) -> Option<Self> {
        let header = |name: &str| {
            stored
                .headers
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
        };
        Some(Self {
            id: header("id")?,
            reason: DeadLetterReason::from_code(stored.status)?,
            deliveries: header("deliveries")?.parse().ok()?,
            error: header("error"),
            origin: header("origin").unwrap_or_default(),
            payload: stored.body.clone().unwrap_or_default(),
        })
    }
}

/// A completed message's kept outcome, returned for its duplicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    stored: Arc<Stored>,
    expires_at: SystemTime,
}

impl Replay {
    /// Whether the first run succeeded.
    pub fn succeeded(&self) -> bool {
        self.stored.status == status::OK
    }

    /// The stored status ([`status`]).
    pub fn status(&self) -> u16 {
        self.stored.status
    }

    /// The first run's output (or, after a failure, nothing).
    pub fn output(&self) -> Option<&Bytes> {
        self.stored.body.as_ref()
    }

    /// Why the first run failed, if it did.
    pub fn failure(&self) -> Option<DeadLetterReason> {
        DeadLetterReason::from_code(self.stored.status)
    }

    /// The first run's error text, if it failed.
    pub fn error(&self) -> Option<String> {
        self.stored
            .headers
            .iter()
            .find(|(name, _)| name == "error")
            .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
    }

    /// The whole stored outcome.
    pub fn stored(&self) -> &Stored {
        &self.stored
    }

    /// When the message will be forgotten.
    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }
}

/// What happened to one delivery.
#[derive(Debug)]
#[non_exhaustive]
pub enum Outcome {
    /// The handler ran now and succeeded; its output is stored. Acknowledge.
    Processed {
        /// The handler's output.
        output: Bytes,
    },
    /// A duplicate of a completed message: the handler did not run. Acknowledge (or, if the
    /// first run failed, treat as dead-lettered).
    Duplicate(Replay),
    /// Another consumer holds the message right now. Redeliver after `retry_after`.
    InFlight {
        /// Time left on the holder's lease.
        retry_after: Duration,
    },
    /// The id was completed or claimed with another fingerprint: the handler did not run.
    Mismatch,
    /// The handler failed transiently; the claim was released, so a redelivery runs it again.
    Released {
        /// The handler's error.
        error: HandlerError,
    },
    /// The handler failed permanently, or transiently on the last allowed delivery; the
    /// failure is stored, so the message is never run again. Dead-letter it.
    Failed {
        /// The handler's error.
        error: HandlerError,
        /// Permanent error or out of deliveries.
        reason: DeadLetterReason,
    },
    /// The claim was lost while the handler ran (its lease ended and another consumer took
    /// the message over), so its outcome was not stored. The handler's result is returned.
    LeaseLost {
        /// What the handler returned.
        result: Result<Bytes, HandlerError>,
    },
    /// The handler ran (succeeded, or failed for good), but its outcome could not be stored,
    /// even retried for [`DedupOptions::complete_for`] with the lease renewed meanwhile.
    ///
    /// The claim is **not released**: it stays held until its lease ends, so a redelivery
    /// until then is answered [`Outcome::InFlight`] and does not run the handler again. A
    /// redelivery after the lease ended finds no record and runs it again, so the adapters
    /// settle this like the outcome it could not store (a success is acknowledged) rather
    /// than ask for a redelivery. Logged at error level.
    Unrecorded {
        /// What the handler returned.
        result: Result<Bytes, HandlerError>,
        /// The store's last error.
        error: StoreError,
    },
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

struct Inner<S> {
    /// The caller's store behind a deadline on every call; shared with the renewal tasks.
    store: Arc<TimeoutStore<S>>,
    scope: Scope,
    dead_letter_scope: Scope,
    options: DedupOptions,
    fingerprint: Fingerprint,
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
///   so a handler that is slow, CPU-bound or blocks its thread keeps its claim; if another
///   consumer took the message over, the result is [`Outcome::LeaseLost`] and nothing is
///   stored;
/// - an outcome the store fails to take is retried with backoff for
///   [`DedupOptions::complete_for`]; if it still cannot be stored the claim is left held
///   until its lease ends, never released ([`Outcome::Unrecorded`]).
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
/// use idem::{MemoryStore, Scope};
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
    inner: Arc<Inner<S>>,
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
            .field("options", &self.inner.options)
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
    /// use idem::{MemoryStore, Scope};
    /// use idem_queue::{DedupOptions, Deduplicator};
    ///
    /// let options = DedupOptions { lease: Duration::from_secs(5), ..DedupOptions::default() };
    /// let dedup = Deduplicator::with_options(MemoryStore::new(), Scope::new("orders"), options)?;
    /// assert_eq!(dedup.dead_letter_scope().as_str(), "orders.dead-letter");
    /// # Ok::<(), idem_queue::ConfigError>(())
    /// ```
    pub fn with_options(
        store: S,
        scope: Scope,
        options: DedupOptions,
    ) -> Result<Self, ConfigError> {
        options.validate()?;
        Ok(Self::build(store, scope, options))
    }

    fn build(store: S, scope: Scope, options: DedupOptions) -> Self {
        let dead_letter_scope = options
            .dead_letter_scope
            .clone()
            .unwrap_or_else(|| Scope::new(format!("{}.dead-letter", scope.as_str())));
        Self {
            inner: Arc::new(Inner {
                store: Arc::new(TimeoutStore::new(store, options.store_timeout)),
                scope,
                dead_letter_scope,
                options,
                fingerprint: default_fingerprint(),
            }),
        }
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
    fn key_in(scope: &Scope, id: &str) -> Result<ScopedKey, DedupError> {
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
    /// use idem::{MemoryStore, Scope};
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
        self.process_with(id, None, Attempt::first(), handler).await
    }

    /// Runs `handler` for message `id` unless it already ran or another consumer holds it.
    ///
    /// `fingerprint` binds the id to the message's content (a re-use of the id with another
    /// payload is then [`Outcome::Mismatch`]); `attempt` says whether a transient failure
    /// now is the last allowed one.
    ///
    /// ```
    /// use idem::{MemoryStore, Scope};
    /// use idem_queue::{Attempt, DeadLetterReason, Deduplicator, HandlerError, Outcome};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dedup = Deduplicator::new(MemoryStore::new(), Scope::new("s"));
    /// let fail = || async { Err::<&str, _>(HandlerError::transient("downstream busy")) };
    ///
    /// // A transient failure before the last delivery releases the claim...
    /// let outcome = dedup.process_with("m", None, Attempt::new(1, Some(2)), fail).await?;
    /// assert!(matches!(outcome, Outcome::Released { .. }));
    /// // ...and on the last one it is stored as given up, never to run again.
    /// let outcome = dedup.process_with("m", None, Attempt::new(2, Some(2)), fail).await?;
    /// assert!(matches!(outcome, Outcome::Failed { reason: DeadLetterReason::MaxDeliveries, .. }));
    /// # Ok(()) }
    /// ```
    pub async fn process_with<F, Fut, T>(
        &self,
        id: &str,
        fingerprint: Option<&Fingerprint>,
        attempt: Attempt,
        handler: F,
    ) -> Result<Outcome, DedupError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, HandlerError>>,
        T: Into<Bytes>,
    {
        match self.claim(id, fingerprint).await? {
            Claim::Acquired(held) => held.run(attempt, handler).await,
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

    /// Forgets message `id`, so its next delivery runs the handler again (to replay a
    /// dead-lettered message after fixing its cause). Says whether a record was there.
    pub async fn forget(&self, id: &str) -> Result<bool, DedupError> {
        let key = self.key(id)?;
        self.inner
            .store
            .delete(&key)
            .await
            .map_err(DedupError::Store)
    }

    /// Writes a dead-letter record for `letter.id` under the dead-letter scope, unless one
    /// is already there. Says whether it wrote one.
    pub async fn dead_letter(&self, letter: &DeadLetter) -> Result<bool, DedupError> {
        let key = Self::key_in(&self.inner.dead_letter_scope, &letter.id)?;
        let store = &self.inner.store;
        let lease = self.inner.options.lease;
        match store
            .begin(&key, &self.inner.fingerprint, lease)
            .await
            .map_err(DedupError::Store)?
        {
            Begin::Acquired(claim) => {
                store
                    .complete(
                        &key,
                        claim.token,
                        &letter.to_stored(),
                        self.inner.options.dead_letter_retention,
                    )
                    .await
                    .map_err(DedupError::Store)?;
                Ok(true)
            }
            Begin::InFlight { .. } => Err(DedupError::Store(StoreError::backend(
                "write a dead-letter record",
                "another consumer is writing this dead-letter record",
            ))),
            _ => Ok(false),
        }
    }

    /// The dead-letter record for message `id`, if there is one.
    pub async fn dead_letter_record(&self, id: &str) -> Result<Option<DeadLetter>, DedupError> {
        let key = Self::key_in(&self.inner.dead_letter_scope, id)?;
        let record = self
            .inner
            .store
            .get(&key)
            .await
            .map_err(DedupError::Store)?;
        Ok(record.and_then(|record| match record.state {
            RecordState::Completed { stored, .. } => DeadLetter::from_stored(&stored),
            _ => None,
        }))
    }
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
}

impl<S: Store> Held<S> {
    /// The record key.
    pub fn key(&self) -> &ScopedKey {
        self.holder.key()
    }

    /// The lease as first granted.
    pub fn lease(&self) -> Lease {
        self.lease
    }

    /// Whether the claim was lost: a renewal found another consumer's claim (or the lease
    /// ended) while this one held the message.
    pub fn is_lost(&self) -> bool {
        self.holder.is_lost()
    }

    /// Runs `handler` while the lease is renewed beside it, and stores or releases according
    /// to its result (see [`Deduplicator`]).
    pub async fn run<F, Fut, T>(self, attempt: Attempt, handler: F) -> Result<Outcome, DedupError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, HandlerError>>,
        T: Into<Bytes>,
    {
        let result = handler().await.map(Into::into);
        match result {
            Ok(output) => {
                let stored = Stored::new(status::OK).with_body(output.clone());
                Ok(match self.store(&stored).await {
                    Ok(()) => Outcome::Processed { output },
                    Err(StoreError::LeaseLost) => Outcome::LeaseLost { result: Ok(output) },
                    Err(error) => Outcome::Unrecorded {
                        result: Ok(output),
                        error,
                    },
                })
            }
            Err(error) if error.is_permanent() || attempt.is_final() => {
                let reason = if error.is_permanent() {
                    DeadLetterReason::Permanent
                } else {
                    DeadLetterReason::MaxDeliveries
                };
                let stored = Stored::new(reason.code())
                    .with_header("error", error.to_string())
                    .with_header("deliveries", attempt.delivered.to_string());
                Ok(match self.store(&stored).await {
                    Ok(()) => Outcome::Failed { error, reason },
                    Err(StoreError::LeaseLost) => Outcome::LeaseLost { result: Err(error) },
                    Err(store) => Outcome::Unrecorded {
                        result: Err(error),
                        error: store,
                    },
                })
            }
            Err(error) => {
                let key = self.key().clone();
                if let Err(release) = self.holder.release().await {
                    // The lease ends by itself; until then redeliveries see the message in flight.
                    tracing::warn!(?key, error = %release, "releasing a failed message's claim failed");
                }
                Ok(Outcome::Released { error })
            }
        }
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
