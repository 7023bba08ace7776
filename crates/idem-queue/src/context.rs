//! What a handler knows while it runs: the message id, which attempt this is, and a signal
//! that fires when its claim is lost.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// A signal a handler can poll or wait for; it fires when the message's claim is lost (a
/// renewal found the lease ended or taken over), so the handler's outcome will not be
/// stored and another consumer may be running the same message.
///
/// It is set from a task of its own, so a handler that blocks its thread (inside
/// [`tokio::task::block_in_place`]) still sees [`is_cancelled`](Self::is_cancelled) turn
/// `true`.
///
/// ```
/// use idem_queue::Cancellation;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let cancel = Cancellation::new();
/// assert!(!cancel.is_cancelled());
/// cancel.cancel();
/// cancel.cancelled().await; // at once: it already fired
/// assert!(cancel.is_cancelled());
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct Cancellation {
    inner: Arc<Signal>,
}

#[derive(Debug, Default)]
struct Signal {
    fired: AtomicBool,
    notify: Notify,
}

impl Cancellation {
    /// A signal that has not fired.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fires the signal (idempotent).
    pub fn cancel(&self) {
        self.inner.fired.store(true, Ordering::SeqCst);
        self.inner.notify.notify_waiters();
    }

    /// Whether the signal fired.
    pub fn is_cancelled(&self) -> bool {
        self.inner.fired.load(Ordering::SeqCst)
    }

    /// Resolves once the signal fired (at once if it already did).
    pub fn cancelled(&self) -> impl Future<Output = ()> + Send + 'static {
        let inner = Arc::clone(&self.inner);
        async move {
            loop {
                let notified = inner.notify.notified();
                if inner.fired.load(Ordering::SeqCst) {
                    return;
                }
                notified.await;
            }
        }
    }
}

/// What a handler is told about the message it runs for.
///
/// `attempt` counts the runs of this message's handler, from 1, as the deduplicator's own
/// records saw them (failed runs are recorded per message id in the store, whatever the
/// broker or queue type): deliveries answered "in flight elsewhere" and store errors before
/// the handler ran do not count.
///
/// ```
/// use idem_core::{MemoryStore, Scope};
/// use idem_queue::{Deduplicator, DeliveryAttempt, HandlerError, Outcome};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dedup = Deduplicator::new(MemoryStore::new(), Scope::new("s"));
/// let limit = DeliveryAttempt::new(1, Some(3));
/// for expected in 1..=2 {
///     let outcome = dedup
///         .process_in_context("m", None, limit, |context| async move {
///             assert_eq!((context.id(), context.attempt()), ("m", expected));
///             assert!(!context.is_last_attempt() && !context.is_cancelled());
///             Err::<&str, _>(HandlerError::transient("not yet"))
///         })
///         .await?;
///     assert!(matches!(outcome, Outcome::Released { .. }));
/// }
/// let outcome = dedup
///     .process_in_context("m", None, limit, |context| async move {
///         assert!(context.attempt() == 3 && context.is_last_attempt());
///         Ok("third time lucky")
///     })
///     .await?;
/// assert!(matches!(outcome, Outcome::Processed { .. }));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct MessageContext {
    pub(crate) id: String,
    pub(crate) attempt: u64,
    pub(crate) max_attempts: Option<u64>,
    pub(crate) cancellation: Cancellation,
}

impl MessageContext {
    /// The message id the run is deduplicated by.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Which run of this message's handler this is, from 1.
    pub fn attempt(&self) -> u64 {
        self.attempt
    }

    /// After this many runs a transient failure dead-letters the message; `None`: never.
    pub fn max_attempts(&self) -> Option<u64> {
        self.max_attempts
    }

    /// Whether a transient failure now dead-letters the message.
    pub fn is_last_attempt(&self) -> bool {
        self.max_attempts.is_some_and(|max| self.attempt >= max)
    }

    /// The signal that fires when the claim is lost.
    pub fn cancellation(&self) -> &Cancellation {
        &self.cancellation
    }

    /// Whether the claim was lost: stop if you can, the outcome will not be stored.
    pub fn is_cancelled(&self) -> bool {
        self.cancellation.is_cancelled()
    }

    /// Resolves once the claim is lost; `select!` on it to stop a long handler.
    pub fn cancelled(&self) -> impl Future<Output = ()> + Send + 'static {
        self.cancellation.cancelled()
    }
}

/// What becomes of a message's claim when its handler panics. Either way the panic is
/// caught, counted as a failed attempt, and the message negatively acknowledged (or, on the
/// last attempt, dead-lettered).
///
/// ```
/// use idem_core::{MemoryStore, Scope};
/// use idem_queue::{Deduplicator, Outcome, PanicPolicy};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// assert_eq!(PanicPolicy::default(), PanicPolicy::Release);
/// let dedup = Deduplicator::new(MemoryStore::new(), Scope::new("s")).with_panic_policy(PanicPolicy::Hold);
/// let outcome = dedup
///     .process("m", || async {
///         if true {
///             panic!("after the effect?");
///         }
///         Ok("")
///     })
///     .await?;
/// assert!(matches!(outcome, Outcome::Panicked { released: false, .. }));
/// // Held until the lease ends: a redelivery meanwhile does not run it.
/// let again = dedup.process("m", || async { Ok("not yet") }).await?;
/// assert!(matches!(again, Outcome::InFlight { .. }));
/// assert_eq!(dedup.failed_attempts("m").await?, 1);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum PanicPolicy {
    /// Release the claim: the redelivery may run the handler again at once.
    #[default]
    Release,
    /// Keep the claim until its lease ends: for handlers that may panic after an effect,
    /// so that a redelivery within the lease is answered "in flight" instead of running it.
    Hold,
}
