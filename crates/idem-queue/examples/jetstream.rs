//! Exactly-once effects for a NATS JetStream consumer.
//!
//! ```sh
//! cargo run -p idem-queue --example jetstream          # needs NATS with JetStream on 127.0.0.1:4222
//! NATS_URL=nats://host:4222 cargo run -p idem-queue --example jetstream
//! ```
//!
//! Creates a stream `IDEM_EXAMPLE_ORDERS` (a memory stream with a 1 s duplicate window), and
//! publishes 10 orders with [`publish`], which sets `Nats-Msg-Id`. It publishes every
//! order a second time at once (the server drops those itself) and, after the window,
//! every other order a third time (the server keeps those). A consumer with a
//! [`Deduplicator`] over a redb file then charges each order exactly once, acking
//! duplicates without running the handler, and terminating an order the handler rejects
//! permanently, with a dead-letter record. The stream is deleted at the end.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use idem::Scope;
use idem_queue::jetstream::{JetStreamConsumer, JetStreamOptions, publish};
use idem_queue::{Deduplicator, HandlerError, Outcome, ResultExt, Settlement};
use idem_redb::RedbStore;

const STREAM: &str = "IDEM_EXAMPLE_ORDERS";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".to_owned());
    let js = jetstream::new(async_nats::connect(&url).await?);
    let _ = js.delete_stream(STREAM).await;
    js.create_stream(stream::Config {
        name: STREAM.to_owned(),
        subjects: vec!["idem-example.orders.>".to_owned()],
        storage: stream::StorageType::Memory,
        duplicate_window: Duration::from_secs(1),
        ..Default::default()
    })
    .await?;
    let result = run(&js).await;
    js.delete_stream(STREAM).await?;
    result
}

async fn run(js: &jetstream::Context) -> Result<(), Box<dyn std::error::Error>> {
    // Publish: order 7 carries an amount the handler will refuse.
    let order = |n: u32| {
        let cents = if n == 7 {
            "lots".to_owned()
        } else {
            ((n + 1) * 100).to_string()
        };
        Bytes::from(cents)
    };
    let mut published = 0;
    for n in 0..10 {
        publish(
            js,
            "idem-example.orders.new",
            &format!("order-{n}"),
            order(n),
        )
        .await?;
        let again = publish(
            js,
            "idem-example.orders.new",
            &format!("order-{n}"),
            order(n),
        )
        .await?;
        assert!(again.duplicate, "the broker drops a copy inside its window");
        published += 2;
    }
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    for n in (0..10).step_by(2) {
        publish(
            js,
            "idem-example.orders.new",
            &format!("order-{n}"),
            order(n),
        )
        .await?;
        published += 1;
    }
    println!("published {published} times; the stream kept 15 messages for 10 orders");

    // Consume.
    let dir = tempfile::tempdir()?;
    let store = RedbStore::open(dir.path().join("idem.redb"))?;
    let dedup = Deduplicator::new(store, Scope::new(format!("{STREAM}/billing")));
    let adapter = JetStreamConsumer::new(dedup.clone(), JetStreamOptions::default());
    let consumer = js
        .get_stream(STREAM)
        .await?
        .get_or_create_consumer(
            "billing",
            pull::Config {
                durable_name: Some("billing".to_owned()),
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer.messages().await?;
    let mut charged = BTreeMap::new();
    for _ in 0..15 {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await?
            .ok_or("the consumer ended")??;
        let charged = &mut charged;
        let handled = adapter
            .handle(&message, |message, context| async move {
                let text = std::str::from_utf8(&message.payload).permanent()?;
                let cents: u32 = text.parse().permanent()?;
                // The effect: here, a line in a map; in real life, a charge that passes
                // `context.id()` on as the payment provider's idempotency key.
                *charged.entry(context.id().to_owned()).or_insert(0) += 1;
                Ok::<_, HandlerError>(format!("charged {cents} cents"))
            })
            .await?;
        let what = match &handled.outcome {
            Ok(Outcome::Processed { output }) => String::from_utf8_lossy(output).into_owned(),
            Ok(Outcome::Duplicate(replay)) => format!(
                "duplicate, not run again (first run: {})",
                String::from_utf8_lossy(replay.output().map(|b| &b[..]).unwrap_or(b"failed"))
            ),
            Ok(Outcome::Failed { error, .. }) => format!("not charged: {error}"),
            other => format!("{other:?}"),
        };
        let settled = match handled.settlement {
            Settlement::Ack => "ack".to_owned(),
            Settlement::Retry { delay } => format!("nak, retry in {delay:?}"),
            Settlement::Defer { delay } => format!("nak, held elsewhere; again in {delay:?}"),
            Settlement::DeadLetter { reason } => format!("term, dead-lettered ({reason})"),
        };
        println!(
            "{:<8} delivery {} -> {what} [{settled}]",
            handled.id, handled.delivered
        );
    }

    assert!(
        charged.values().all(|&n| n == 1),
        "every order charged at most once"
    );
    println!("charged {} orders, each exactly once", charged.len());
    if let Some(letter) = dedup.dead_letter_record("order-7").await? {
        println!(
            "dead letter for {}: {} ({})",
            letter.id,
            letter.reason,
            letter.error.unwrap_or_default()
        );
    }
    Ok(())
}
