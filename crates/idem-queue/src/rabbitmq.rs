//! RabbitMQ: exactly-once effects for consumers with manual acknowledgement.
//!
//! [`RabbitConsumer::handle`] takes one [`Delivery`] and a handler, runs the handler through
//! a [`Deduplicator`] and then settles the delivery:
//!
//! | outcome | sent to the broker |
//! |---|---|
//! | processed now ([`Outcome::Processed`]) | `basic.ack`, only after the outcome is stored |
//! | duplicate of a completed message | `basic.ack` (the handler does not run) |
//! | held by another consumer, store unreachable, claim taken over ([`Settlement::Defer`]) | held for a delay (for a held message, the holder's lease time left within [`RetryPolicy`]'s bounds; at most [`RabbitOptions::max_hold`]), then `basic.nack` with requeue: uses up no attempt, and RabbitMQ 4.3+ does not count it in `x-delivery-count` |
//! | transient handler error or panic before the last attempt ([`Settlement::Retry`]) | the failed run is counted in the store; held for [`RetryPolicy::backoff`] (at most `max_hold`), then `basic.reject` with requeue (which RabbitMQ 4.3+ counts in `x-delivery-count`, so a quorum queue's `delivery-limit` counts failures too) |
//! | the handler ran but its outcome could not be stored, even retried for [`DedupOptions::complete_for`](crate::DedupOptions::complete_for) ([`Outcome::Unrecorded`]) | as the outcome it could not store: `basic.ack` after a success, dead letter after a failure for good. Not redelivered after a success: the claim stays held until its lease ends and then lapses without a record, so a redelivery would only run the handler again |
//! | permanent error, a transient one on attempt ≥ [`RetryPolicy::max_attempts`], id re-used with another payload, no id under [`MissingId::DeadLetter`] | dead-letter record, then: with [`RabbitOptions::dead_letter_copy`], the copy published and **confirmed**, then `basic.ack`; without, `basic.reject` without requeue (the queue's own dead-letter exchange, if it has one, receives the message) |
//! | duplicate of a message that was dead-lettered | dead-letter record ensured; with `dead_letter_copy` the copy published again (at least once), then `basic.ack`; without, `basic.ack` (a second reject would send a second copy to the dead-letter exchange) |
//!
//! **Every settlement is checked**: lapin answers `Ok(false)` for an ack, nack or reject on
//! a channel that closed (or a delivery already settled); the adapter reports that as
//! [`SettleError`] ([`SettleFailure::ChannelClosed`]) instead of a [`Handled`] that never
//! happened. The broker requeues the delivery and the redelivery is deduplicated.
//!
//! **Dead-letter copies**: `basic.reject` to a queue's dead-letter exchange is at most once
//! on classic queues (and on quorum queues unless `dead-letter-strategy` is
//! `at-least-once`): a copy lost there is gone, though the dead-letter record in the store
//! remains. [`RabbitOptions::dead_letter_copy`] publishes the copy itself, on a confirming
//! [`Publisher`], and acknowledges the original only after the broker confirmed the copy:
//! at least once (a crash in between publishes a second copy, with the same `message_id`).
//!
//! RabbitMQ has no delayed requeue: the adapter holds a delivery for the delay before
//! requeueing it, which keeps one prefetch slot busy meanwhile. Size `basic.qos` with that
//! in mind, or keep `max_hold` short.
//!
//! AMQP has no progress acknowledgement: a handler that holds a delivery longer than the
//! broker's `consumer_timeout` (30 minutes by default) gets its channel closed and the
//! message requeued. The deduplicator still renews its own lease meanwhile, so the
//! redelivery waits as "in flight" until the handler finishes and then is a duplicate.
//!
//! **Attempts** are counted by the deduplicator, per message id, in the store
//! ([counting attempts](crate::Deduplicator#counting-attempts)), on every queue type:
//! classic queues count nothing (only a `redelivered` flag), and before RabbitMQ 4.3 quorum
//! queues also count the requeues of messages bounced because another consumer held them.
//! [`DeliveryCount`] only feeds [`Handled::delivered`], for logs. A quorum queue's
//! `delivery-limit` stays a backstop for messages that crash the process before any
//! outcome is stored; set it well above `max_attempts`.
//!
//! **Message ids** come from the `message_id` property by default ([`RabbitIdSource`]); a
//! delivery without one follows [`MissingId`]: by default it is dead-lettered as permanent
//! without running (its record keyed `no-message-id:` and the BLAKE3 hash of its body), or
//! keyed by a header, or by the hash of its body. Publish with [`Publisher`], which sets
//! `message_id`, makes messages persistent and waits for the broker's confirm.
//!
//! ```no_run
//! use futures_util::StreamExt;
//! use idem_core::{MemoryStore, Scope};
//! use idem_queue::Deduplicator;
//! use idem_queue::rabbitmq::{RabbitConsumer, RabbitOptions};
//! use lapin::options::{BasicConsumeOptions, BasicQosOptions};
//! use lapin::types::FieldTable;
//! use lapin::{Connection, ConnectionProperties};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let connection =
//!     Connection::connect("amqp://guest:guest@127.0.0.1:5672/%2f", ConnectionProperties::default()).await?;
//! let channel = connection.create_channel().await?;
//! channel.basic_qos(32, BasicQosOptions::default()).await?;
//! let mut deliveries = channel
//!     .basic_consume("orders".into(), "billing".into(), BasicConsumeOptions::default(), FieldTable::default())
//!     .await?;
//!
//! let dedup = Deduplicator::new(MemoryStore::new(), Scope::new("orders/billing"));
//! let adapter = RabbitConsumer::new(dedup, RabbitOptions::default());
//! while let Some(delivery) = deliveries.next().await {
//!     let delivery = delivery?;
//!     let handled = adapter
//!         .handle(&delivery, |delivery, context| async move {
//!             // charge the order in delivery.data, with context.id() as the idempotency key
//!             Ok(format!("charged {} bytes on attempt {}", delivery.data.len(), context.attempt()))
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

use bytes::Bytes;
use idem_core::{Fingerprint, Store};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicNackOptions, BasicPublishOptions, BasicRejectOptions,
    ConfirmSelectOptions,
};
use lapin::protocol::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Confirmation};

use crate::settle::{Handled, RetryPolicy, Settlement, dead_letter_error};
use crate::{
    Claim, DeadLetter, DeadLetterReason, Deduplicator, DeliveryAttempt, HandlerError,
    MessageContext, Outcome,
};

/// The header quorum queues count deliveries in.
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// A function that finds a message's id.
pub type DeliveryIdFn = Arc<dyn Fn(&Delivery) -> Option<String> + Send + Sync>;

/// Where a delivery's id comes from.
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum RabbitIdSource {
    /// The `message_id` property (the default).
    #[default]
    MessageId,
    /// A header (string or integer value).
    Header(String),
    /// Your own function of the delivery.
    Custom(DeliveryIdFn),
}

impl RabbitIdSource {
    /// Ids from your own function.
    ///
    /// ```
    /// use idem_queue::rabbitmq::RabbitIdSource;
    ///
    /// let source = RabbitIdSource::custom(|d| d.properties.correlation_id().as_ref().map(|id| id.to_string()));
    /// # let _ = source;
    /// ```
    pub fn custom(extract: impl Fn(&Delivery) -> Option<String> + Send + Sync + 'static) -> Self {
        Self::Custom(Arc::new(extract))
    }

    fn extract(&self, delivery: &Delivery) -> Option<String> {
        match self {
            Self::MessageId => delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_owned()),
            Self::Header(name) => {
                header(delivery.properties.headers().as_ref(), name).and_then(value_text)
            }
            Self::Custom(extract) => extract(delivery),
        }
        .filter(|id| !id.is_empty())
    }
}

impl fmt::Debug for RabbitIdSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MessageId => f.write_str("MessageId"),
            Self::Header(name) => f.debug_tuple("Header").field(name).finish(),
            Self::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// What becomes of a delivery its [`RabbitIdSource`] yields no id for. Never a silent drop.
///
/// ```
/// use idem_queue::rabbitmq::{MissingId, RabbitOptions};
///
/// assert_eq!(RabbitOptions::default().missing_id, MissingId::DeadLetter);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum MissingId {
    /// Dead-lettered as permanent without running the handler; its dead-letter record is
    /// keyed `no-message-id:` and the BLAKE3 hash of its body, and its error says why.
    #[default]
    DeadLetter,
    /// Keyed by this header (string or integer value); a delivery without it either is
    /// dead-lettered.
    Header(String),
    /// Keyed by `body:` and the BLAKE3 hash of the body: a re-published copy is a
    /// duplicate, and so is any other message with the same body.
    BodyHash,
}

/// Where a delivery's number comes from (for [`Handled::delivered`] only: attempts are
/// counted by the deduplicator).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeliveryCount {
    /// `x-delivery-count` (earlier deliveries, set by quorum queues); absent means the
    /// `redelivered` flag decides between 1 and 2.
    #[default]
    Quorum,
    /// A header of your own holding the number of earlier deliveries (as
    /// `x-delivery-count` does); absent means the `redelivered` flag decides.
    Header(String),
    /// Only the `redelivered` flag: 1 or 2.
    Redelivered,
}

impl DeliveryCount {
    fn delivered(&self, delivery: &Delivery) -> u64 {
        let headers = delivery.properties.headers().as_ref();
        let earlier = match self {
            Self::Quorum => header(headers, DELIVERY_COUNT_HEADER).and_then(value_number),
            Self::Header(name) => header(headers, name).and_then(value_number),
            Self::Redelivered => None,
        };
        match earlier {
            Some(earlier) => earlier.saturating_add(1),
            None if delivery.redelivered => 2,
            None => 1,
        }
    }
}

fn header<'a>(headers: Option<&'a FieldTable>, name: &str) -> Option<&'a AMQPValue> {
    headers?.inner().get(name)
}

fn value_number(value: &AMQPValue) -> Option<u64> {
    match value {
        AMQPValue::ShortShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::Timestamp(n) => Some(*n),
        other => value_text(other)?.trim().parse().ok(),
    }
}

fn value_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ByteArray(b) => Some(String::from_utf8_lossy(b.as_slice()).into_owned()),
        AMQPValue::ShortShortInt(_)
        | AMQPValue::ShortShortUInt(_)
        | AMQPValue::ShortInt(_)
        | AMQPValue::ShortUInt(_)
        | AMQPValue::LongInt(_)
        | AMQPValue::LongUInt(_)
        | AMQPValue::LongLongInt(_) => value_number(value).map(|n| n.to_string()),
        _ => None,
    }
}

/// How a [`RabbitConsumer`] identifies, counts, retries and gives up on deliveries.
#[derive(Debug, Clone)]
pub struct RabbitOptions {
    /// Where ids come from (default: the `message_id` property).
    pub id: RabbitIdSource,
    /// What becomes of a delivery without an id (default: dead-lettered).
    pub missing_id: MissingId,
    /// Where delivery numbers for [`Handled::delivered`] come from (default:
    /// `x-delivery-count`).
    pub delivery_count: DeliveryCount,
    /// Redelivery delays and the attempt limit.
    pub retry: RetryPolicy,
    /// The longest a delivery is held before being nacked for redelivery (default 5 s).
    pub max_hold: Duration,
    /// Bind the id to the routing key and payload: a re-used id with another payload is
    /// dead-lettered as a mismatch instead of acknowledged as a duplicate.
    pub fingerprint_payload: bool,
    /// Publish dead letters here yourself, confirmed, before acknowledging the original
    /// (default: none; `basic.reject` hands them to the queue's dead-letter exchange).
    pub dead_letter_copy: Option<DeadLetterCopy>,
}

/// Where a [`RabbitConsumer`] publishes dead-letter copies: on a confirming [`Publisher`],
/// with the original's `message_id`, body and headers plus `x-idem-dead-letter-reason`,
/// `-deliveries`, `-origin` and `-error`.
///
/// ```no_run
/// use idem_queue::rabbitmq::{DeadLetterCopy, Publisher, RabbitOptions};
/// use lapin::{Connection, ConnectionProperties};
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let connection =
///     Connection::connect("amqp://guest:guest@127.0.0.1:5672/%2f", ConnectionProperties::default()).await?;
/// let publisher = Publisher::new(connection.create_channel().await?).await?;
/// let options = RabbitOptions {
///     dead_letter_copy: Some(DeadLetterCopy::new(publisher, "", "orders.dead")),
///     ..RabbitOptions::default()
/// };
/// # let _ = options;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct DeadLetterCopy {
    /// The confirming publisher.
    pub publisher: Publisher,
    /// The exchange (`""`: the default exchange, routing by queue name).
    pub exchange: String,
    /// The routing key.
    pub routing_key: String,
}

impl DeadLetterCopy {
    /// Copies to `exchange` with `routing_key`, on `publisher`.
    pub fn new(publisher: Publisher, exchange: &str, routing_key: &str) -> Self {
        Self {
            publisher,
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
        }
    }
}

impl Default for RabbitOptions {
    fn default() -> Self {
        Self {
            id: RabbitIdSource::default(),
            missing_id: MissingId::default(),
            delivery_count: DeliveryCount::default(),
            retry: RetryPolicy::default(),
            max_hold: Duration::from_secs(5),
            fingerprint_payload: false,
            dead_letter_copy: None,
        }
    }
}

/// The delivery's outcome was decided, but settling it with the broker failed (the channel
/// closed): the broker requeues it, and the redelivery is deduplicated.
#[derive(Debug, thiserror::Error)]
#[error("settling message {id} as {settlement:?} failed")]
pub struct SettleError {
    /// The message id.
    pub id: String,
    /// What was being sent.
    pub settlement: Settlement,
    /// Why it failed.
    #[source]
    pub source: SettleFailure,
}

/// Why a settlement did not reach the broker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettleFailure {
    /// lapin answered `Ok(false)`: the channel is closed (or the delivery was settled
    /// before), so nothing was sent.
    #[error("the channel is closed (or the delivery was already settled): nothing was sent")]
    ChannelClosed,
    /// The channel or connection failed while sending.
    #[error("the broker connection failed")]
    Broker(#[source] lapin::Error),
}

/// lapin's answer to an ack, nack or reject, checked.
fn settled(answer: Result<bool, lapin::Error>) -> Result<(), SettleFailure> {
    match answer {
        Ok(true) => Ok(()),
        Ok(false) => Err(SettleFailure::ChannelClosed),
        Err(error) => Err(SettleFailure::Broker(error)),
    }
}

/// Handles RabbitMQ deliveries exactly once in effect. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct RabbitConsumer<S> {
    dedup: Deduplicator<S>,
    options: RabbitOptions,
}

impl<S: Store> RabbitConsumer<S> {
    /// An adapter around `dedup`.
    pub fn new(dedup: Deduplicator<S>, options: RabbitOptions) -> Self {
        Self { dedup, options }
    }

    /// The deduplicator.
    pub fn dedup(&self) -> &Deduplicator<S> {
        &self.dedup
    }

    /// The options.
    pub fn options(&self) -> &RabbitOptions {
        &self.options
    }

    /// The id `delivery` is deduplicated by, if it has one (after [`MissingId`]).
    pub fn message_id(&self, delivery: &Delivery) -> Option<String> {
        self.options
            .id
            .extract(delivery)
            .or_else(|| match &self.options.missing_id {
                MissingId::DeadLetter => None,
                MissingId::Header(name) => header(delivery.properties.headers().as_ref(), name)
                    .and_then(value_text)
                    .filter(|id| !id.is_empty()),
                MissingId::BodyHash => {
                    Some(format!("body:{}", blake3::hash(&delivery.data).to_hex()))
                }
            })
    }

    /// Which delivery of its message this is, from 1, by [`DeliveryCount`] (for logs).
    pub fn delivered(&self, delivery: &Delivery) -> u64 {
        self.options.delivery_count.delivered(delivery)
    }

    /// Runs `handler` for `delivery` unless it already ran, then acks, nacks or rejects it
    /// (see the [module docs](self)). The handler gets the delivery and its
    /// [`MessageContext`]: the id, the attempt number, and a cancellation that fires if the
    /// claim is lost while it runs. A panic in the handler is caught and counted as a failed
    /// attempt. Fails only when the broker could not be told.
    pub async fn handle<'d, F, Fut, T>(
        &self,
        delivery: &'d Delivery,
        handler: F,
    ) -> Result<Handled, SettleError>
    where
        F: FnOnce(&'d Delivery, MessageContext) -> Fut,
        Fut: Future<Output = Result<T, HandlerError>> + 'd,
        T: Into<Bytes>,
    {
        let delivered = self.delivered(delivery);
        let origin = format!(
            "amqp exchange={:?} routing_key={:?} delivery_tag={}",
            delivery.exchange.as_str(),
            delivery.routing_key.as_str(),
            delivery.delivery_tag
        );
        let fingerprint = self.options.fingerprint_payload.then(|| {
            Fingerprint::builder()
                .part("routing_key", delivery.routing_key.as_str().as_bytes())
                .part("payload", &delivery.data)
                .finish()
        });

        let mut attempt = None;
        let (id, has_id, outcome) = match self.message_id(delivery) {
            None => {
                let error = crate::DedupError::InvalidId(idem_core::KeyError::Empty);
                // Keyed by content, so redeliveries of one id-less message share a dead letter.
                let id = format!("no-message-id:{}", blake3::hash(&delivery.data).to_hex());
                (id, false, Err(error))
            }
            Some(id) => {
                let outcome = match self.dedup.claim(&id, fingerprint.as_ref()).await {
                    Ok(Claim::Acquired(held)) => {
                        attempt = Some(held.attempt());
                        held.run_in_context(self.options.retry.limit(), |context| {
                            handler(delivery, context)
                        })
                        .await
                    }
                    Ok(Claim::Duplicate(replay)) => Ok(Outcome::Duplicate(replay)),
                    Ok(Claim::InFlight { retry_after }) => Ok(Outcome::InFlight { retry_after }),
                    Ok(Claim::Mismatch) => Ok(Outcome::Mismatch),
                    Err(error) => Err(error),
                };
                (id, true, outcome)
            }
        };
        let spacing = DeliveryAttempt::new(attempt.unwrap_or(delivered), None);
        let mut settlement = self.options.retry.settlement(spacing, &outcome);
        let defer = Settlement::Defer {
            delay: self.options.retry.backoff(delivered),
        };

        let already_dead = matches!(outcome, Ok(Outcome::Duplicate(_)));
        let mut letter = None;
        if let Settlement::DeadLetter { reason } = settlement {
            let error = if has_id {
                dead_letter_error(&outcome)
            } else {
                Some(format!(
                    "the message has no id ({:?}, then {:?}, found none)",
                    self.options.id, self.options.missing_id
                ))
            };
            let dead = DeadLetter {
                id: id.clone(),
                reason: if has_id {
                    reason
                } else {
                    DeadLetterReason::Permanent
                },
                deliveries: attempt.unwrap_or(delivered),
                error,
                origin,
                payload: Bytes::copy_from_slice(&delivery.data),
            };
            match self.dedup.dead_letter(&dead).await {
                Ok(_) => letter = Some(dead),
                Err(error) => {
                    tracing::warn!(%id, %error, "writing a dead letter failed; the message will be redelivered");
                    settlement = defer;
                }
            }
        }

        let result = match settlement {
            Settlement::Ack => settled(delivery.acker.ack(BasicAckOptions::default()).await),
            Settlement::DeadLetter { .. } => match (&self.options.dead_letter_copy, letter) {
                (Some(copy), Some(letter)) => {
                    // At least once: the copy is confirmed before the original goes.
                    match publish_copy(copy, delivery, &letter).await {
                        Ok(()) => settled(delivery.acker.ack(BasicAckOptions::default()).await),
                        Err(error) => {
                            // Not acknowledged without its copy: requeued, and dead-lettered
                            // again (the record is kept) when it comes back.
                            tracing::warn!(%id, %error, "publishing a dead-letter copy failed; the message is requeued");
                            settlement = defer;
                            settled(
                                delivery
                                    .acker
                                    .nack(BasicNackOptions {
                                        multiple: false,
                                        requeue: true,
                                    })
                                    .await,
                            )
                        }
                    }
                }
                _ if already_dead => settled(delivery.acker.ack(BasicAckOptions::default()).await),
                _ => settled(
                    delivery
                        .acker
                        .reject(BasicRejectOptions { requeue: false })
                        .await,
                ),
            },
            Settlement::Retry { delay } => {
                tokio::time::sleep(delay.min(self.options.max_hold)).await;
                // `reject`: a failed run, which RabbitMQ 4.3+ counts in x-delivery-count.
                settled(
                    delivery
                        .acker
                        .reject(BasicRejectOptions { requeue: true })
                        .await,
                )
            }
            Settlement::Defer { delay } => {
                tokio::time::sleep(delay.min(self.options.max_hold)).await;
                // `nack`: not the message's fault, which RabbitMQ 4.3+ does not count.
                settled(
                    delivery
                        .acker
                        .nack(BasicNackOptions {
                            multiple: false,
                            requeue: true,
                        })
                        .await,
                )
            }
        };
        result.map_err(|source| SettleError {
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
}

/// Publishes `letter` as a copy of `delivery` and waits for the broker's confirm.
async fn publish_copy(
    copy: &DeadLetterCopy,
    delivery: &Delivery,
    letter: &DeadLetter,
) -> Result<(), PublishError> {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    let mut put = |name: &str, value: String| {
        headers.insert(name.into(), AMQPValue::LongString(value.into()));
    };
    put(
        "x-idem-dead-letter-reason",
        letter.reason.as_str().to_owned(),
    );
    put(
        "x-idem-dead-letter-deliveries",
        letter.deliveries.to_string(),
    );
    put("x-idem-dead-letter-origin", letter.origin.clone());
    if let Some(error) = &letter.error {
        put("x-idem-dead-letter-error", error.clone());
    }
    let mut properties = BasicProperties::default().with_headers(headers);
    if let Some(kind) = delivery.properties.content_type() {
        properties = properties.with_content_type(kind.clone());
    }
    copy.publisher
        .publish(
            &copy.exchange,
            &copy.routing_key,
            &letter.id,
            &delivery.data,
            properties,
        )
        .await
}

/// Why a [`Publisher`] could not publish.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The id, exchange or routing key is over AMQP's 255-byte limit for short strings.
    #[error("the {field} is {len} bytes long; AMQP allows at most 255")]
    TooLong {
        /// `message id`, `exchange` or `routing key`.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// The channel or connection failed.
    #[error("publishing failed")]
    Broker(#[source] lapin::Error),
    /// The broker refused the message (`basic.nack` confirm).
    #[error("the broker nacked the message")]
    Nacked,
    /// No queue was bound to receive it (returned as unroutable).
    #[error("the message was unroutable: no queue is bound for it")]
    Unroutable,
}

/// Publishes with publisher confirms and a `message_id`, so consumers can deduplicate.
///
/// Each publication waits for the broker's confirm (and is `mandatory`, so an unroutable
/// message is an error, not silently dropped). A publication that fails or times out can
/// be retried with the same id: consumers apply it once.
///
/// ```no_run
/// use idem_queue::rabbitmq::Publisher;
/// use lapin::{Connection, ConnectionProperties};
/// use lapin::protocol::BasicProperties;
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let connection =
///     Connection::connect("amqp://guest:guest@127.0.0.1:5672/%2f", ConnectionProperties::default()).await?;
/// let publisher = Publisher::new(connection.create_channel().await?).await?;
/// publisher.publish("", "orders", "order-7", b"{}", BasicProperties::default()).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    /// Puts `channel` in confirm mode and publishes on it.
    pub async fn new(channel: Channel) -> Result<Self, lapin::Error> {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self { channel })
    }

    /// The channel.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes `payload` with `message_id = id` (persistent unless `properties` sets a
    /// delivery mode) and waits for the broker's confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        id: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let short = |field, text: &str| {
            ShortString::try_new(text).map_err(|_| PublishError::TooLong {
                field,
                len: text.len(),
            })
        };
        let message_id = short("message id", id)?;
        let mut properties = properties.with_message_id(message_id);
        if properties.delivery_mode().is_none() {
            properties = properties.with_delivery_mode(2);
        }
        let exchange = short("exchange", exchange)?;
        let routing_key = short("routing key", routing_key)?;
        let confirm = self
            .channel
            .basic_publish(
                exchange,
                routing_key,
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                payload,
                properties,
            )
            .await
            .map_err(PublishError::Broker)?
            .await
            .map_err(PublishError::Broker)?;
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable),
            Confirmation::Nack(_) => Err(PublishError::Nacked),
        }
    }
}
