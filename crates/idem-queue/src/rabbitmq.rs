//! RabbitMQ: exactly-once effects for consumers with manual acknowledgement.
//!
//! [`RabbitConsumer::handle`] takes one [`Delivery`] and a handler, runs the handler through
//! a [`Deduplicator`] and then settles the delivery:
//!
//! | outcome | sent to the broker |
//! |---|---|
//! | processed now ([`Outcome::Processed`]) | `basic.ack`, only after the outcome is stored |
//! | duplicate of a completed message | `basic.ack` (the handler does not run) |
//! | held by another consumer | held for the holder's lease time left (bounded by [`RetryPolicy`] and [`RabbitOptions::max_hold`]), then `basic.nack` with requeue |
//! | transient handler error, store error, lease lost | held for [`RetryPolicy::backoff`] (at most `max_hold`), then `basic.nack` with requeue |
//! | the handler ran but its outcome could not be stored, even retried for [`DedupOptions::complete_for`](crate::DedupOptions::complete_for) ([`Outcome::Unrecorded`]) | as the outcome it could not store: `basic.ack` after a success, dead-letter record and `basic.reject` after a failure for good. Not redelivered: the claim stays held until its lease ends and then lapses without a record, so a redelivery would only run the handler again |
//! | permanent error, or any error on delivery ≥ `max_deliveries`, or id re-used with another payload | dead-letter record, then `basic.reject` without requeue (the queue's own dead-letter exchange, if it has one, receives the message) |
//! | duplicate of a message that was dead-lettered | dead-letter record ensured, then `basic.ack` (a second reject would send a second copy to the dead-letter exchange) |
//!
//! RabbitMQ has no delayed requeue: the adapter holds a delivery for the delay before
//! nacking it, which keeps one prefetch slot busy meanwhile. Size `basic.qos` with that in
//! mind, or keep `max_hold` short.
//!
//! AMQP has no progress acknowledgement: a handler that holds a delivery longer than the
//! broker's `consumer_timeout` (30 minutes by default) gets its channel closed and the
//! message requeued. The deduplicator still renews its own lease meanwhile, so the
//! redelivery waits as "in flight" until the handler finishes and then is a duplicate.
//!
//! **Delivery counts** ([`DeliveryCount`]) come from the `x-delivery-count` header that
//! quorum queues add to redelivered messages; without it (classic queues) only the
//! `redelivered` flag is known, so a delivery counts as the first or the second. Use quorum
//! queues (or a header of your own) when `max_deliveries` matters.
//!
//! **Message ids** come from the `message_id` property by default ([`RabbitIdSource`]);
//! a delivery without one cannot be deduplicated and is dead-lettered as permanent (its
//! record keyed `no-message-id:` and the BLAKE3 hash of its body). Publish
//! with [`Publisher`], which sets `message_id`, makes messages persistent and waits for the
//! broker's confirm.
//!
//! ```no_run
//! use futures_util::StreamExt;
//! use idem::{MemoryStore, Scope};
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
//!         .handle(&delivery, |delivery| async move {
//!             // charge the order in delivery.data ...
//!             Ok(format!("charged {} bytes", delivery.data.len()))
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
use idem::{Fingerprint, Store};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicNackOptions, BasicPublishOptions, BasicRejectOptions,
    ConfirmSelectOptions,
};
use lapin::protocol::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Confirmation};

use crate::settle::{Handled, RetryPolicy, Settlement, dead_letter_error};
use crate::{Claim, DeadLetter, Deduplicator, HandlerError, Outcome};

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

/// Where a delivery's number comes from.
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
    /// Where delivery numbers come from (default: `x-delivery-count`).
    pub delivery_count: DeliveryCount,
    /// Redelivery delays and the delivery limit.
    pub retry: RetryPolicy,
    /// The longest a delivery is held before being nacked for redelivery (default 5 s).
    pub max_hold: Duration,
    /// Bind the id to the routing key and payload: a re-used id with another payload is
    /// dead-lettered as a mismatch instead of acknowledged as a duplicate.
    pub fingerprint_payload: bool,
}

impl Default for RabbitOptions {
    fn default() -> Self {
        Self {
            id: RabbitIdSource::default(),
            delivery_count: DeliveryCount::default(),
            retry: RetryPolicy::default(),
            max_hold: Duration::from_secs(5),
            fingerprint_payload: false,
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
    /// lapin's error.
    #[source]
    pub source: lapin::Error,
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

    /// The id `delivery` is deduplicated by, if it has one.
    pub fn message_id(&self, delivery: &Delivery) -> Option<String> {
        self.options.id.extract(delivery)
    }

    /// Which delivery of its message this is, from 1.
    pub fn delivered(&self, delivery: &Delivery) -> u64 {
        self.options.delivery_count.delivered(delivery)
    }

    /// Runs `handler` for `delivery` unless it already ran, then acks, nacks or rejects it
    /// (see the [module docs](self)). Fails only when the broker could not be told.
    pub async fn handle<'d, F, Fut, T>(
        &self,
        delivery: &'d Delivery,
        handler: F,
    ) -> Result<Handled, SettleError>
    where
        F: FnOnce(&'d Delivery) -> Fut,
        Fut: Future<Output = Result<T, HandlerError>> + 'd,
        T: Into<Bytes>,
    {
        let attempt = self.options.retry.attempt(self.delivered(delivery));
        let id = self.message_id(delivery);
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

        let (id, outcome) = match id {
            None => {
                let error = crate::DedupError::InvalidId(idem::KeyError::Empty);
                // Keyed by content, so redeliveries of one id-less message share a dead letter.
                let id = format!("no-message-id:{}", blake3::hash(&delivery.data).to_hex());
                (id, Err(error))
            }
            Some(id) => {
                let outcome = match self.dedup.claim(&id, fingerprint.as_ref()).await {
                    Ok(Claim::Acquired(held)) => held.run(attempt, || handler(delivery)).await,
                    Ok(Claim::Duplicate(replay)) => Ok(Outcome::Duplicate(replay)),
                    Ok(Claim::InFlight { retry_after }) => Ok(Outcome::InFlight { retry_after }),
                    Ok(Claim::Mismatch) => Ok(Outcome::Mismatch),
                    Err(error) => Err(error),
                };
                (id, outcome)
            }
        };
        let mut settlement = self.options.retry.settlement(attempt, &outcome);

        let mut already_dead = false;
        if let Settlement::DeadLetter { reason } = settlement {
            already_dead = matches!(outcome, Ok(Outcome::Duplicate(_)));
            let letter = DeadLetter {
                id: id.clone(),
                reason,
                deliveries: attempt.delivered,
                error: dead_letter_error(&outcome),
                origin,
                payload: Bytes::copy_from_slice(&delivery.data),
            };
            if let Err(error) = self.dedup.dead_letter(&letter).await {
                tracing::warn!(%id, %error, "writing a dead letter failed; the message will be redelivered");
                settlement = Settlement::Retry {
                    delay: self.options.retry.backoff(attempt.delivered),
                };
            }
        }

        let settled = match settlement {
            Settlement::Ack => delivery.acker.ack(BasicAckOptions::default()).await,
            Settlement::DeadLetter { .. } if already_dead => {
                delivery.acker.ack(BasicAckOptions::default()).await
            }
            Settlement::DeadLetter { .. } => {
                delivery
                    .acker
                    .reject(BasicRejectOptions { requeue: false })
                    .await
            }
            Settlement::Retry { delay } => {
                tokio::time::sleep(delay.min(self.options.max_hold)).await;
                delivery
                    .acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    })
                    .await
            }
        };
        settled.map_err(|source| SettleError {
            id: id.clone(),
            settlement,
            source,
        })?;
        Ok(Handled {
            id,
            attempt,
            outcome,
            settlement,
        })
    }
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
