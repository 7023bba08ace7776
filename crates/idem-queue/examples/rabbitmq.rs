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
//! with a [`Deduplicator`] over a redb file, run by [`runner::rabbitmq::run`] (four
//! handlers at a time, its own connection, reconnecting if it breaks, drained at the end,
//! surviving an ack that cannot be sent), charges each order once and acks the
//! duplicates without running anything. Order 3's handler fails transiently on every
//! delivery: after three attempts it is rejected (the broker moves it to the DLQ) and a
//! dead-letter record is written. Both queues are deleted at the end.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use idem_core::Scope;
use idem_queue::rabbitmq::{Publisher, RabbitConsumer, RabbitOptions};
use idem_queue::runner::{self, BoxError, RunOptions};
use idem_queue::{Deduplicator, HandlerError, RetryPolicy};
use idem_redb::RedbStore;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
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

    let result = run(&connection, &url).await;
    for queue in [QUEUE, DLQ] {
        channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await?;
    }
    connection.close(200, "done".into()).await?;
    result
}

async fn run(connection: &Connection, url: &str) -> Result<(), Box<dyn std::error::Error>> {
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
            // A copy of an order that is running elsewhere comes back soon: held at most
            // this long (RabbitMQ has no delayed requeue), then requeued, then a duplicate.
            in_flight_max: Duration::from_millis(300),
            ..RetryPolicy::default()
        },
        ..RabbitOptions::default()
    };
    let adapter = RabbitConsumer::new(dedup.clone(), options);

    // Consume, with the runner: four handlers at a time, its own connection (opened again,
    // with backoff, if it breaks), until both queues show every message settled (a real
    // consumer would stop on a signal); then it drains and closes.
    let charged = Arc::new(Mutex::new(BTreeMap::new()));
    let counts = connection.create_channel().await?;
    let everything_settled = async move {
        let ready = |queue: &'static str| {
            let counts = counts.clone();
            async move {
                let passive = QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                };
                counts
                    .queue_declare(queue.into(), passive, FieldTable::default())
                    .await
                    .map(|queue| queue.message_count())
                    .ok()
            }
        };
        // Nothing left to deliver and order 3 in the dead-letter queue, for a second: longer
        // than any hold (the ready count does not show deliveries held unacknowledged).
        let mut quiet = 0;
        while quiet < 5 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if ready(QUEUE).await == Some(0) && ready(DLQ).await == Some(1) {
                quiet += 1;
            } else {
                quiet = 0;
            }
        }
    };
    let url = url.to_owned();
    let report = runner::rabbitmq::run(
        adapter,
        move || {
            let url = url.clone();
            async move {
                Ok::<_, BoxError>(Connection::connect(&url, ConnectionProperties::default()).await?)
            }
        },
        QUEUE,
        "billing",
        RunOptions::with_concurrency(4),
        everything_settled,
        {
            let charged = Arc::clone(&charged);
            move |_delivery, context| {
                let charged = Arc::clone(&charged);
                async move {
                    if context.id() == "order-3" {
                        println!(
                            "{:<8} attempt {} -> failed",
                            context.id(),
                            context.attempt()
                        );
                        return Err(HandlerError::transient(format!(
                            "payment provider timed out (attempt {})",
                            context.attempt()
                        )));
                    }
                    // The effect: here, a line in a map; in real life, a charge that passes
                    // `context.id()` on as the payment provider's idempotency key.
                    *charged
                        .lock()
                        .unwrap()
                        .entry(context.id().to_owned())
                        .or_insert(0) += 1;
                    println!(
                        "{:<8} attempt {} -> charged",
                        context.id(),
                        context.attempt()
                    );
                    Ok(Bytes::from("charged"))
                }
            }
        },
    )
    .await;
    // Duplicates were acked without running the handler; a settle error (an ack lost with
    // the connection) would be counted here, not end the consumer: the broker requeues the
    // delivery and the redelivery is a duplicate.
    println!(
        "settled: {} acked (duplicates included), {} retried, {} deferred, {} dead-lettered, \
         {} settle errors",
        report.acked, report.retried, report.deferred, report.dead_lettered, report.settle_errors
    );
    let charged = charged.lock().unwrap().clone();

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
