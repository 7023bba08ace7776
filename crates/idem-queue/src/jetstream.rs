//! NATS JetStream: exactly-once effects for pull or push consumers with explicit acks.
//!
//! [`JetStreamConsumer::handle`] takes one delivered [`Message`] and a handler, runs the
//! handler through a [`Deduplicator`] and then tells the server what became of it:
//!
//! | outcome | sent to the server |
//! |---|---|
//! | processed now ([`Outcome::Processed`]) | `+ACK`, only after the outcome is stored |
//! | duplicate of a completed message | `+ACK` (the handler does not run) |
//! | held by another consumer, store unreachable, claim taken over ([`Settlement::Defer`]) | `-NAK` with a delay (for a held message, the holder's lease time left within [`RetryPolicy::in_flight_min`]..[`RetryPolicy::in_flight_max`]); uses up no attempt |
//! | transient handler error or panic before the last attempt ([`Settlement::Retry`]) | `-NAK` with [`RetryPolicy::backoff`] of the attempt; the failed run is counted in the store |
//! | the handler ran but its outcome could not be stored, even retried for [`DedupOptions::complete_for`](crate::DedupOptions::complete_for) ([`Outcome::Unrecorded`]) | as the outcome it could not store: `+ACK` after a success, dead letter and `+TERM` after a failure for good. Not redelivered: the claim stays held until its lease ends and then lapses without a record, so a redelivery would only run the handler again |
//! | permanent error, or a transient one on attempt ≥ [`RetryPolicy::max_attempts`], or id re-used with another payload, or no id under [`MissingId::DeadLetter`] | dead-letter record, the copy on [`JetStreamOptions::dead_letter_subject`] published and its `PubAck` awaited, then `+TERM` |
//! | duplicate of a message that was dead-lettered | dead-letter record and copy ensured (the copy's `Nats-Msg-Id` lets the DLQ stream drop a second one), then `+TERM` |
//! | handler still running | `+WPI` (progress) every [`JetStreamOptions::progress_every`], from a task of its own, so `AckWait` never expires under it |
//!
//! Every acknowledgement is checked: with [`JetStreamOptions::confirm_acks`] (the default)
//! the adapter waits for the server's reply to each `+ACK`, `-NAK` and `+TERM`, so
//! [`Handled`] never reports a settlement the server did not get; a failure is
//! [`JetStreamError::Settle`] and the message comes back after `AckWait`, where the
//! deduplicator recognises it.
//!
//! **Attempts** are counted by the deduplicator, per message id, in the store
//! ([counting attempts](crate::Deduplicator#counting-attempts)), not taken from the
//! server's `delivered`, which also counts the `-NAK`s of messages bounced because another
//! consumer held them. Give the consumer a server-side `max_deliver` of `-1` (or well
//! above [`RetryPolicy::max_attempts`] plus the bounces you expect), so the last attempt
//! reaches the handler and can be dead-lettered; the server's limit then only stops
//! messages that crash the process before any outcome is stored.
//!
//! **Dead letters** are records in the [`Store`], under the deduplicator's dead-letter scope
//! (read them with [`Deduplicator::dead_letter_record`]). With
//! [`JetStreamOptions::dead_letter_subject`] the message is also published there, with its
//! id as `Nats-Msg-Id` and `Idem-Dead-Letter-*` headers, for a DLQ stream to keep; the
//! publication is confirmed (`PubAck`) before the original is terminated, so the copy is
//! published at least once (a crash in between publishes it again; the DLQ stream's
//! duplicate window drops the second one).
//!
//! **Message ids** come from the `Nats-Msg-Id` header by default ([`IdSource`]). A message
//! without one is, by default ([`MissingId::StreamPosition`]), keyed by its position:
//! `js:<stream>:<sequence>:<timestamp>`, where the timestamp is the server's own for the
//! stored message (nanoseconds since the epoch). The stream name keeps two streams on one
//! scope apart; the timestamp keeps a recreated stream's sequence 1 apart from the old
//! stream's sequence 1. That catches redeliveries, not re-publications (a second copy has
//! another sequence). Choose [`MissingId::DeadLetter`] to refuse id-less messages instead,
//! or [`MissingId::PayloadHash`] to key them by their content. Publish with [`publish`],
//! which sets `Nats-Msg-Id`, so the stream's own duplicate window drops re-publications
//! before they are even stored.
//!
//! ```no_run
//! use futures_util::StreamExt;
//! use idem_core::{MemoryStore, Scope};
//! use idem_queue::Deduplicator;
//! use idem_queue::jetstream::{JetStreamConsumer, JetStreamOptions};
//! use async_nats::jetstream::{self, consumer::pull};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let client = async_nats::connect("127.0.0.1:4222").await?;
//! let js = jetstream::new(client);
//! let stream = js.get_stream("ORDERS").await?;
//! let consumer = stream
//!     .get_or_create_consumer("billing", pull::Config {
//!         durable_name: Some("billing".into()),
//!         ..Default::default()
//!     })
//!     .await?;
//!
//! let dedup = Deduplicator::new(MemoryStore::new(), Scope::new("ORDERS/billing"));
//! let adapter = JetStreamConsumer::new(dedup, JetStreamOptions::default());
//! let mut messages = consumer.messages().await?;
//! while let Some(message) = messages.next().await {
//!     let message = message?;
//!     let handled = adapter
//!         .handle(&message, |message, context| async move {
//!             // charge the order in message.payload, passing context.id() on as the
//!             // payment provider's idempotency key ...
//!             Ok(format!("charged {} bytes on attempt {}", message.payload.len(), context.attempt()))
//!         })
//!         .await?;
//!     println!("{} -> {:?}", handled.id, handled.settlement);
//! }
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::context::{PublishAckFuture, PublishError};
use async_nats::jetstream::message::{AckKind, PublishMessage};
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{Context, Message};
use bytes::Bytes;
use idem_core::{Fingerprint, Store};

use crate::settle::{Handled, RetryPolicy, Settlement, dead_letter_error};
use crate::{
    Claim, DeadLetter, DeadLetterReason, Deduplicator, DeliveryAttempt, HandlerError,
    MessageContext, Outcome,
};

/// The header JetStream deduplicates publications by.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// A function that finds a message's id.
pub type MessageIdFn = Arc<dyn Fn(&Message) -> Option<String> + Send + Sync>;

/// Where a message's id comes from. A message it yields no id for is handled by
/// [`MissingId`].
#[derive(Clone)]
#[non_exhaustive]
pub enum IdSource {
    /// A header (by default `Nats-Msg-Id`).
    Header(String),
    /// No id of the message's own: every message goes to [`MissingId`] (with the default,
    /// its stream position). Redeliveries are deduplicated, re-publications are not.
    StreamSequence,
    /// Your own function of the message (a field of the payload, a subject token).
    Custom(MessageIdFn),
}

impl IdSource {
    /// Ids from your own function.
    ///
    /// ```
    /// use idem_queue::jetstream::IdSource;
    ///
    /// // The last subject token: `orders.created.o-17` is message `o-17`.
    /// let source = IdSource::custom(|m| m.subject.split('.').next_back().map(str::to_owned));
    /// # let _ = source;
    /// ```
    pub fn custom(extract: impl Fn(&Message) -> Option<String> + Send + Sync + 'static) -> Self {
        Self::Custom(Arc::new(extract))
    }

    fn extract(&self, message: &Message) -> Option<String> {
        match self {
            Self::Header(name) => message
                .headers
                .as_ref()?
                .get(name.as_str())
                .map(|value| value.as_str().to_owned()),
            Self::StreamSequence => None,
            Self::Custom(extract) => extract(message),
        }
        .filter(|id| !id.is_empty())
    }
}

impl Default for IdSource {
    fn default() -> Self {
        Self::Header(MSG_ID_HEADER.to_owned())
    }
}

impl fmt::Debug for IdSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Header(name) => f.debug_tuple("Header").field(name).finish(),
            Self::StreamSequence => f.write_str("StreamSequence"),
            Self::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// What becomes of a message its [`IdSource`] yields no id for.
///
/// ```
/// use idem_queue::jetstream::{JetStreamOptions, MissingId};
///
/// assert_eq!(JetStreamOptions::default().missing_id, MissingId::StreamPosition);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum MissingId {
    /// Keyed by its position, `js:<stream>:<sequence>:<timestamp>` (the server's timestamp
    /// of the stored message, in nanoseconds since the epoch): unique across streams and
    /// across a stream's deletion and re-creation. Redeliveries are deduplicated,
    /// re-publications are not.
    #[default]
    StreamPosition,
    /// Keyed by `payload:` and the BLAKE3 hash of the subject and payload: a re-published
    /// copy is a duplicate, and so is any other message with the same subject and payload.
    PayloadHash,
    /// Refused: dead-lettered ([`DeadLetterReason::Permanent`], the error says the id is
    /// missing) without running the handler, its record keyed `no-message-id:` and the
    /// BLAKE3 hash of the subject and payload.
    DeadLetter,
}

fn content_hash(message: &Message) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&(message.subject.len() as u64).to_le_bytes());
    hasher.update(message.subject.as_bytes());
    hasher.update(&message.payload);
    hasher.finalize().to_hex().to_string()
}

/// The id a message without one of its own is keyed by under [`MissingId::StreamPosition`].
fn stream_position(info: &async_nats::jetstream::message::Info<'_>) -> String {
    format!(
        "js:{}:{}:{}",
        info.stream,
        info.stream_sequence,
        info.published.unix_timestamp_nanos()
    )
}

/// `+WPI` for one message every so often, sent from a task of its own until dropped, so that
/// a handler that is slow to yield or blocks its thread (the way tokio asks for: see the
/// crate docs) cannot let `AckWait` run out.
struct ProgressAcks(Option<tokio::task::JoinHandle<()>>);

impl ProgressAcks {
    fn start(message: &Message, every: Option<Duration>) -> Self {
        Self(every.filter(|every| !every.is_zero()).map(|every| {
            let message = message.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    if let Err(error) = message.ack_with(AckKind::Progress).await {
                        tracing::warn!(%error, "sending a progress ack failed");
                    }
                }
            })
        }))
    }
}

impl Drop for ProgressAcks {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// How a [`JetStreamConsumer`] identifies, retries and gives up on messages.
///
/// ```
/// use std::time::Duration;
/// use idem_queue::jetstream::JetStreamOptions;
///
/// // A consumer with a 60 s AckWait: progress every 20 s.
/// let options = JetStreamOptions::for_ack_wait(Duration::from_secs(60));
/// assert_eq!(options.progress_every, Some(Duration::from_secs(20)));
/// ```
#[derive(Debug, Clone)]
pub struct JetStreamOptions {
    /// Where ids come from (default: the `Nats-Msg-Id` header).
    pub id: IdSource,
    /// What becomes of a message without an id (default: keyed by its stream position).
    pub missing_id: MissingId,
    /// Redelivery delays and the attempt limit.
    pub retry: RetryPolicy,
    /// How often to send `+WPI` while the handler runs (from a task of its own); should be
    /// under a third of the consumer's `AckWait`. Default 10 s (the default `AckWait` is
    /// 30 s); `None`: never.
    pub progress_every: Option<Duration>,
    /// Also publish dead letters to this subject (default: none; the store record only).
    pub dead_letter_subject: Option<String>,
    /// Bind the id to the subject and payload: a re-used id with another payload is then
    /// dead-lettered as a mismatch instead of being acknowledged as a duplicate.
    pub fingerprint_payload: bool,
    /// Wait for the server's reply to every acknowledgement (default `true`), so a lost
    /// `+ACK` is an error instead of a settlement reported but not made. `false` sends them
    /// without waiting (one round trip less per message; a lost ack is then only noticed
    /// as a redelivery, which the deduplicator answers as a duplicate).
    pub confirm_acks: bool,
}

impl Default for JetStreamOptions {
    fn default() -> Self {
        Self {
            id: IdSource::default(),
            missing_id: MissingId::default(),
            retry: RetryPolicy::default(),
            progress_every: Some(Duration::from_secs(10)),
            dead_letter_subject: None,
            fingerprint_payload: false,
            confirm_acks: true,
        }
    }
}

impl JetStreamOptions {
    /// Defaults, with progress sent every third of `ack_wait`.
    pub fn for_ack_wait(ack_wait: Duration) -> Self {
        Self {
            progress_every: Some(ack_wait / 3),
            ..Self::default()
        }
    }
}

/// Why a delivery could not be handled or settled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JetStreamError {
    /// The message has no JetStream ack metadata (it did not come from a consumer with
    /// acks), so it cannot be handled here.
    #[error("not a JetStream message with ack metadata")]
    NotJetStream(#[source] async_nats::Error),
    /// The outcome was decided (and stored), but telling the server failed; the server will
    /// redeliver after `AckWait`, and the redelivery is deduplicated.
    #[error("sending {settlement:?} for message {id} failed")]
    Settle {
        /// The message id.
        id: String,
        /// What was being sent.
        settlement: Settlement,
        /// The client's error.
        #[source]
        source: async_nats::Error,
    },
}

/// Handles JetStream deliveries exactly once in effect. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct JetStreamConsumer<S> {
    dedup: Deduplicator<S>,
    options: JetStreamOptions,
}

impl<S: Store> JetStreamConsumer<S> {
    /// An adapter around `dedup`.
    pub fn new(dedup: Deduplicator<S>, options: JetStreamOptions) -> Self {
        Self { dedup, options }
    }

    /// The deduplicator.
    pub fn dedup(&self) -> &Deduplicator<S> {
        &self.dedup
    }

    /// The options.
    pub fn options(&self) -> &JetStreamOptions {
        &self.options
    }

    /// The id `message` is deduplicated by (under [`MissingId::DeadLetter`], for a message
    /// without one, the key of its dead-letter record).
    pub fn message_id(&self, message: &Message) -> Result<String, JetStreamError> {
        Ok(self.identify(message)?.0)
    }

    /// The message's key, and whether it has one to deduplicate by.
    fn identify(&self, message: &Message) -> Result<(String, bool), JetStreamError> {
        let info = message.info().map_err(JetStreamError::NotJetStream)?;
        if let Some(id) = self.options.id.extract(message) {
            return Ok((id, true));
        }
        Ok(match self.options.missing_id {
            MissingId::StreamPosition => (stream_position(&info), true),
            MissingId::PayloadHash => (format!("payload:{}", content_hash(message)), true),
            MissingId::DeadLetter => (format!("no-message-id:{}", content_hash(message)), false),
        })
    }

    /// Runs `handler` for `message` unless it already ran, then acks, naks or terminates it
    /// (see the [module docs](self)). The handler gets the message and its
    /// [`MessageContext`]: the id, the attempt number, and a cancellation that fires if the
    /// claim is lost while it runs. A panic in the handler is caught and counted as a failed
    /// attempt. Returns what happened; fails only when the message is not a JetStream
    /// delivery or the server could not be told.
    pub async fn handle<'m, F, Fut, T>(
        &self,
        message: &'m Message,
        handler: F,
    ) -> Result<Handled, JetStreamError>
    where
        F: FnOnce(&'m Message, MessageContext) -> Fut,
        Fut: Future<Output = Result<T, HandlerError>> + 'm,
        T: Into<Bytes>,
    {
        let info = message.info().map_err(JetStreamError::NotJetStream)?;
        let (id, has_id) = self.identify(message)?;
        let delivered = u64::try_from(info.delivered).unwrap_or(1).max(1);
        let origin = format!(
            "nats stream={} consumer={} seq={} subject={}",
            info.stream, info.consumer, info.stream_sequence, message.subject
        );
        let fingerprint = self.options.fingerprint_payload.then(|| {
            Fingerprint::builder()
                .part("subject", message.subject.as_bytes())
                .part("payload", &message.payload)
                .finish()
        });

        let mut attempt = None;
        let outcome = if !has_id {
            Err(crate::DedupError::InvalidId(idem_core::KeyError::Empty))
        } else {
            match self.dedup.claim(&id, fingerprint.as_ref()).await {
                Ok(Claim::Acquired(held)) => {
                    attempt = Some(held.attempt());
                    let _progress = ProgressAcks::start(message, self.options.progress_every);
                    // As after a claim: let the progress task take its first turn before a
                    // handler that may block this thread.
                    tokio::task::yield_now().await;
                    held.run_in_context(self.options.retry.limit(), |context| {
                        handler(message, context)
                    })
                    .await
                }
                Ok(Claim::Duplicate(replay)) => Ok(Outcome::Duplicate(replay)),
                Ok(Claim::InFlight { retry_after }) => Ok(Outcome::InFlight { retry_after }),
                Ok(Claim::Mismatch) => Ok(Outcome::Mismatch),
                Err(error) => Err(error),
            }
        };
        let spacing = DeliveryAttempt::new(attempt.unwrap_or(delivered), None);
        let mut settlement = self.options.retry.settlement(spacing, &outcome);

        if let Settlement::DeadLetter { reason } = settlement {
            let error = if has_id {
                dead_letter_error(&outcome)
            } else {
                Some(format!(
                    "the message has no id ({:?} found none); refused by MissingId::DeadLetter",
                    self.options.id
                ))
            };
            let letter = DeadLetter {
                id: id.clone(),
                reason: if has_id {
                    reason
                } else {
                    DeadLetterReason::Permanent
                },
                deliveries: attempt.unwrap_or(delivered),
                error,
                origin,
                payload: message.payload.clone(),
            };
            if let Err(error) = self.dead_letter(message, &letter).await {
                tracing::warn!(%id, %error, "writing a dead letter failed; the message will be redelivered");
                settlement = Settlement::Defer {
                    delay: self.options.retry.backoff(delivered),
                };
            }
        }

        let kind = match settlement {
            Settlement::Ack => AckKind::Ack,
            Settlement::Retry { delay } | Settlement::Defer { delay } => AckKind::Nak(Some(delay)),
            Settlement::DeadLetter { .. } => AckKind::Term,
        };
        let sent = if self.options.confirm_acks {
            message.double_ack_with(kind).await
        } else {
            message.ack_with(kind).await
        };
        sent.map_err(|source| JetStreamError::Settle {
            id: id.clone(),
            settlement,
            source,
        })?;
        Ok(Handled {
            id,
            attempt,
            delivered,
            outcome,
            settlement,
        })
    }

    async fn dead_letter(
        &self,
        message: &Message,
        letter: &DeadLetter,
    ) -> Result<(), async_nats::Error> {
        self.dedup.dead_letter(letter).await?;
        if let Some(subject) = &self.options.dead_letter_subject {
            let mut headers = message.headers.clone().unwrap_or_default();
            headers.insert(MSG_ID_HEADER, letter.id.as_str());
            headers.insert("Idem-Dead-Letter-Reason", letter.reason.as_str());
            headers.insert("Idem-Dead-Letter-Deliveries", letter.deliveries.to_string());
            headers.insert("Idem-Dead-Letter-Origin", letter.origin.as_str());
            if let Some(error) = &letter.error {
                // Header values are one line.
                headers.insert("Idem-Dead-Letter-Error", error.replace(['\r', '\n'], " "));
            }
            message
                .context
                .send_publish(
                    subject.clone(),
                    PublishMessage::build()
                        .payload(message.payload.clone())
                        .headers(headers),
                )
                .await?
                .await?;
        }
        Ok(())
    }
}

/// The id `message` is deduplicated by under `source`, falling back to its stream position
/// ([`MissingId::StreamPosition`]: `js:<stream>:<sequence>:<timestamp>`).
pub fn message_id(message: &Message, source: &IdSource) -> Result<String, JetStreamError> {
    if let Some(id) = source.extract(message) {
        return Ok(id);
    }
    let info = message.info().map_err(JetStreamError::NotJetStream)?;
    Ok(stream_position(&info))
}

/// Publishes `payload` to `subject` with `Nats-Msg-Id: id` and waits for the stream's
/// acknowledgement. Within the stream's duplicate window a second publication of the same
/// id is dropped by the server (the ack then says `duplicate: true`); after it, the
/// consumer's [`Deduplicator`] still catches it.
///
/// ```no_run
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let js = async_nats::jetstream::new(async_nats::connect("127.0.0.1:4222").await?);
/// let ack = idem_queue::jetstream::publish(&js, "orders.created", "order-7", "{}".into()).await?;
/// let again = idem_queue::jetstream::publish(&js, "orders.created", "order-7", "{}".into()).await?;
/// assert!(again.duplicate && again.sequence == ack.sequence);
/// # Ok(()) }
/// ```
pub async fn publish(
    context: &Context,
    subject: impl Into<String>,
    id: &str,
    payload: Bytes,
) -> Result<PublishAck, PublishError> {
    publish_with_headers(context, subject, id, HeaderMap::new(), payload)
        .await?
        .await
}

/// Like [`publish`] with headers of your own, returning the ack future without waiting, so
/// many publications can be in flight at once. The client holds one in-flight permit per
/// ack future until it is awaited or dropped (5,000 by default), and waits for a free one:
/// await acks as you go, not after an unbounded batch.
pub async fn publish_with_headers(
    context: &Context,
    subject: impl Into<String>,
    id: &str,
    mut headers: HeaderMap,
    payload: Bytes,
) -> Result<PublishAckFuture, PublishError> {
    headers.insert(MSG_ID_HEADER, id);
    context
        .send_publish(
            subject.into(),
            PublishMessage::build().payload(payload).headers(headers),
        )
        .await
}
