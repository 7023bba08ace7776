//! Exactly-once effects for a RabbitMQ consumer, with poison messages dead-lettered.
//!
//! ```sh
//! cargo run -p idem-queue --example rabbitmq          # needs RabbitMQ on 127.0.0.1:5672 (guest/guest)
//! AMQP_URL=amqp://user:pass@host:5672/%2f cargo run -p idem-queue --example rabbitmq
//! ```
//!
//! Declares a classic queue `idem-example-orders` (classic queues count no deliveries: the
//! deduplicator counts failed attempts in its own store) whose dead-letter exchange routes
//! to `idem-example-orders-dlq`,
//! and publishes 10 orders with a confirming [`Publisher`] that sets `message_id`; then
//! every other order again, as a producer retrying after a lost confirm would. A consumer
//! with a [`Deduplicator`] over a redb file charges each order once and acks the
//! duplicates without running anything. Order 3's handler fails transiently on every
//! delivery: after three attempts it is rejected (the broker moves it to the DLQ) and a
//! dead-letter record is written. Both queues are deleted at the end.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use idem::Scope;
use idem_queue::rabbitmq::{Publisher, RabbitConsumer, RabbitOptions};
use idem_queue::{Deduplicator, HandlerError, Outcome, RetryPolicy, Settlement};
use idem_redb::RedbStore;
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::protocol::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};

const QUEUE: &str = "idem-example-orders";
const DLQ: &str = "idem-example-orders-dlq";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let connection = Connection::connect(&url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    for queue in [QUEUE, DLQ] {
        channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await?;
    }
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(DLQ.into(), durable, FieldTable::default())
        .await?;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(DLQ.into()),
    );
    channel
        .queue_declare(QUEUE.into(), durable, arguments)
        .await?;

    let result = run(&connection).await;
    for queue in [QUEUE, DLQ] {
        channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await?;
    }
    connection.close(200, "done".into()).await?;
    result
}

async fn run(connection: &Connection) -> Result<(), Box<dyn std::error::Error>> {
    let publisher = Publisher::new(connection.create_channel().await?).await?;
    let ids: Vec<u32> = (0..10).chain((0..10).step_by(2)).collect();
    for &n in &ids {
        let body = format!("{{\"order\":{n},\"cents\":{}}}", (n + 1) * 100);
        publisher
            .publish(
                "",
                QUEUE,
                &format!("order-{n}"),
                body.as_bytes(),
                BasicProperties::default(),
            )
            .await?;
    }
    println!("published {} messages (confirmed) for 10 orders", ids.len());

    let dir = tempfile::tempdir()?;
    let dedup = Deduplicator::new(
        RedbStore::open(dir.path().join("idem.redb"))?,
        Scope::new(format!("{QUEUE}/billing")),
    );
    let options = RabbitOptions {
        retry: RetryPolicy {
            max_attempts: Some(3),
            backoff_initial: Duration::from_millis(100),
            ..RetryPolicy::default()
        },
        ..RabbitOptions::default()
    };
    let adapter = RabbitConsumer::new(dedup.clone(), options);
    let channel = connection.create_channel().await?;
    channel.basic_qos(8, BasicQosOptions::default()).await?;
    let mut deliveries = channel
        .basic_consume(
            QUEUE.into(),
            "billing".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;

    let mut charged = BTreeMap::new();
    let mut settled = 0;
    // 15 messages, plus two extra deliveries of the failing order.
    while settled < 15 {
        let delivery = tokio::time::timeout(Duration::from_secs(10), deliveries.next())
            .await?
            .ok_or("the consumer was cancelled")??;
        let charged = &mut charged;
        let handled = adapter
            .handle(&delivery, |_delivery, context| async move {
                if context.id() == "order-3" {
                    return Err(HandlerError::transient(format!(
                        "payment provider timed out (attempt {})",
                        context.attempt()
                    )));
                }
                *charged.entry(context.id().to_owned()).or_insert(0) += 1;
                Ok(Bytes::from("charged"))
            })
            .await?;
        let what = match &handled.outcome {
            Ok(Outcome::Processed { .. }) => "charged".to_owned(),
            Ok(Outcome::Duplicate(_)) => "duplicate, not run again".to_owned(),
            Ok(Outcome::Released { error }) => format!("failed ({error})"),
            Ok(Outcome::Failed { error, reason }) => format!("failed for good, {reason} ({error})"),
            other => format!("{other:?}"),
        };
        let settlement = match handled.settlement {
            Settlement::Ack => "basic.ack".to_owned(),
            Settlement::Retry { delay } => format!("basic.reject requeue after {delay:?}"),
            Settlement::Defer { delay } => format!("basic.nack requeue after {delay:?}"),
            Settlement::DeadLetter { .. } => "basic.reject, to the dead-letter exchange".to_owned(),
        };
        if !matches!(
            handled.settlement,
            Settlement::Retry { .. } | Settlement::Defer { .. }
        ) {
            settled += 1;
        }
        let attempt = handled.attempt.map_or("-".to_owned(), |n| n.to_string());
        println!(
            "{:<8} attempt {attempt} -> {what} [{settlement}]",
            handled.id
        );
    }

    assert!(
        charged.values().all(|&n| n == 1),
        "every order charged at most once"
    );
    println!("charged {} orders, each exactly once", charged.len());
    let letter = dedup
        .dead_letter_record("order-3")
        .await?
        .ok_or("no dead letter")?;
    println!(
        "dead letter for {}: {} after {} deliveries: {}",
        letter.id,
        letter.reason,
        letter.deliveries,
        letter.error.unwrap_or_default()
    );
    Ok(())
}
