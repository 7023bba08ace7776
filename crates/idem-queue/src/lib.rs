//! # idem-queue: exactly-once effects for message consumers
//!
//! Brokers deliver at least once: a consumer that dies before its ack, an ack lost on the
//! wire, a producer that re-publishes after a timeout: each hands a handler the same
//! message again. This crate makes the *effects* of those deliveries happen once.
//!
//! - [`Deduplicator`]: over any idem [`Store`](idem_core::Store) (memory, redb, Redis,
//!   Postgres), runs a message's handler once per message id, stores its outcome, and
//!   answers duplicates from it. Long handlers keep their claim alive; failed runs are
//!   counted in the store (any broker, any queue type) and retried or, when permanent or
//!   out of attempts, dead-lettered. Handlers get a [`MessageContext`] (id, attempt,
//!   cancellation on a lost claim); panics are caught.
//! - [`jetstream`] (feature `jetstream`): the NATS JetStream adapter: ids from
//!   `Nats-Msg-Id` (or the stream, sequence and timestamp), confirmed `+ACK` after the
//!   outcome is stored, `-NAK` with delay, `+WPI` progress, `+TERM` and a dead-letter record
//!   (and confirmed copy) after the last attempt; and a publish helper that sets
//!   `Nats-Msg-Id`.
//! - [`rabbitmq`] (feature `rabbitmq`): the RabbitMQ adapter: ids from `message_id` (a
//!   delivery without one is dead-lettered, or keyed by a header or its body), checked
//!   `basic.ack` after the outcome is stored, delayed `basic.reject` for failed runs and
//!   `basic.nack` for deliveries that never ran, a dead-letter record and a copy confirmed
//!   before the original is acked, or a reject to the queue's dead-letter exchange; and a
//!   confirming publisher.
//! - [`inbox`] (feature `postgres`): the transactional inbox: the message's id is inserted
//!   in the same Postgres transaction as the handler's writes.
//! - [`runner`]: the consumer loop for either broker, over an adapter or the inbox:
//!   bounded concurrency, retry delays that do not block other messages, reconnection
//!   with backoff, and a graceful drain on shutdown.
//!
//! ## What is exactly once, and what is not
//!
//! | effect | guarantee |
//! |---|---|
//! | writes in the same Postgres transaction as the [`inbox::Inbox`] claim | **exactly once**, whatever crashes where: the id and the writes commit together or not at all, and a redelivery after the commit finds the id |
//! | anything a [`Deduplicator`] handler does, after it **completed** | **never again** within the retention window, on every consumer sharing the store and scope (across restarts with a durable store) |
//! | a handler still running when its process dies | its claim holds until the lease ends (renewal stops with the process); a redelivery after that runs it **again**: at least once, not exactly once. Make such effects idempotent downstream (pass the message id on as an idempotency key) or move them into the inbox transaction |
//! | the broker ack after the outcome is stored | may be lost (crash between store and ack): the redelivery is recognised as a duplicate and acked, with no second effect |
//! | a duplicate arriving after the retention window | indistinguishable from a new message: it **runs again** |
//! | a handler whose lease was lost mid-run (store unreachable for renewals longer than the lease) | reported as [`Outcome::LeaseLost`], nothing stored; another consumer may have run it too. A handler that is merely slow or CPU-bound keeps its lease: renewal runs on a task of its own. One that blocks its thread must do so inside [`tokio::task::block_in_place`] or [`tokio::task::spawn_blocking`]: a tokio worker blocked without them can stop the runtime's timers and I/O (renewals included) for as long as it blocks, about 1 run in 100 with two workers in our measurements |
//! | a handler whose outcome the store does not take (outage, timeout, full disk) | retried with backoff for [`DedupOptions::complete_for`] (default 30 s) while the lease is renewed; if it still fails the claim is **not released**: it stays held until its lease ends, so redeliveries until then are in flight and do not run the handler. Reported as [`Outcome::Unrecorded`] and logged at error level; the adapters settle it as the outcome (ack a success). A redelivery after the lease ended runs it again |
//! | a store call that hangs (paused server, partition) | fails after [`DedupOptions::store_timeout`] (default 5 s) like any store error: every call has a client-side deadline |
//!
//! ## The retention window
//!
//! Completed ids are remembered for [`DedupOptions::retention`] (default 7 days); inbox rows
//! until [`inbox::Inbox::cleanup`] removes them. **Retention must be at least the longest
//! redelivery or replay horizon**: the longest a message can stay unacked or be retried
//! (RabbitMQ message TTL, JetStream `max_age` if consumers are ever reset or recreated to
//! replay a stream), plus how long producers may re-publish after a timeout. Shorter, and a
//! late duplicate runs again; longer costs only storage.
//!
//! ## Leases
//!
//! A claim is a lease ([`DedupOptions::lease`], default 30 s), renewed every third of it
//! while the handler runs, by the core crate's [`idem_core::Holder`] on a task of its own (so
//! the renewal does not depend on the handler's future being polled). Another consumer
//! receiving the message meanwhile is told it is in flight and redelivers it later. If a
//! consumer dies, its messages are taken over when the lease ends; keep the lease short
//! enough for that to be prompt and long enough that a healthy consumer can always renew
//! (a few store round trips, each bounded by [`DedupOptions::store_timeout`]).
//!
//! ```
//! use bytes::Bytes;
//! use idem_core::{MemoryStore, Scope};
//! use idem_queue::{DeliveryAttempt, Deduplicator, HandlerError, Outcome};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dedup = Deduplicator::new(MemoryStore::new(), Scope::new("orders/shipping"));
//!
//! // The first delivery fails transiently: released, so the redelivery runs it again.
//! let outcome = dedup
//!     .process_with("order-7", None, DeliveryAttempt::new(1, Some(5)), || async {
//!         Err::<Bytes, _>(HandlerError::transient("warehouse API timed out"))
//!     })
//!     .await?;
//! assert!(matches!(outcome, Outcome::Released { .. }));
//!
//! // The second succeeds and is stored...
//! let outcome = dedup
//!     .process_with("order-7", None, DeliveryAttempt::new(2, Some(5)), || async { Ok("shipment s-1") })
//!     .await?;
//! assert!(matches!(outcome, Outcome::Processed { .. }));
//!
//! // ...so a third (the ack was lost) runs nothing.
//! let outcome = dedup.process("order-7", || async { Ok("shipment s-2") }).await?;
//! let Outcome::Duplicate(replay) = outcome else { panic!() };
//! assert_eq!(replay.output().unwrap(), "shipment s-1");
//! # Ok(()) }
//! ```

mod context;
mod dead_letter;
mod dedup;
mod error;
mod options;
mod outcome;
mod settle;

#[cfg(feature = "postgres")]
pub mod inbox;
#[cfg(feature = "jetstream")]
pub mod jetstream;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
#[cfg(any(feature = "jetstream", feature = "rabbitmq"))]
pub mod runner;

pub use context::{Cancellation, MessageContext, PanicPolicy};
pub use dead_letter::{DeadLetter, DeadLetterEntry, DeadLetterReason};
pub use dedup::{Claim, Deduplicator, DeliveryAttempt, Held};
pub use error::{DedupError, HandlerError, ResultExt};
pub use options::{DedupOptions, OptionsError};
pub use outcome::{Outcome, Replay, status};
pub use settle::{Handled, RetryPolicy, Settlement};

#[cfg(feature = "jetstream")]
pub use async_nats;
pub use idem_core;
#[cfg(feature = "rabbitmq")]
pub use lapin;
#[cfg(feature = "postgres")]
pub use sqlx;
