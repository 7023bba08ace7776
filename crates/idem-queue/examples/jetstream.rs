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
//! [`Deduplicator`] over a redb file, run by [`runner::jetstream::run`] (four handlers at
//! a time, drained at the end, reconnecting if the subscription breaks, surviving an ack
//! that cannot be sent), then charges each order exactly once, acking duplicates without
//! running the handler, and terminating an order the handler rejects permanently, with a
//! dead-letter record. The stream is deleted at the end.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use bytes::Bytes;
use idem_core::Scope;
use idem_queue::jetstream::{JetStreamConsumer, JetStreamOptions, publish};
use idem_queue::runner::{self, BoxError, RunOptions};
use idem_queue::{Deduplicator, HandlerError, ResultExt};
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

    // Consume, with the runner: four handlers at a time, until the stream has nothing left
    // for this consumer (a real consumer would stop on a signal); then it drains.
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
    let charged = Arc::new(Mutex::new(BTreeMap::new()));
    let connect = {
        let consumer = consumer.clone();
        // Called again (with backoff) if the subscription breaks.
        move || {
            let consumer = consumer.clone();
            async move { Ok::<_, BoxError>(consumer) }
        }
    };
    let everything_settled = {
        let consumer = consumer.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if let Ok(info) = consumer.get_info().await
                    && info.num_pending == 0
                    && info.num_ack_pending == 0
                {
                    return;
                }
            }
        }
    };
    let report = runner::jetstream::run(
        adapter,
        connect,
        RunOptions::with_concurrency(4),
        everything_settled,
        {
            let charged = Arc::clone(&charged);
            move |message, context| {
                let charged = Arc::clone(&charged);
                async move {
                    let text = std::str::from_utf8(&message.payload).permanent()?;
                    let cents: u32 = text.parse().permanent()?;
                    // The effect: here, a line in a map; in real life, a charge that passes
                    // `context.id()` on as the payment provider's idempotency key.
                    *charged
                        .lock()
                        .unwrap()
                        .entry(context.id().to_owned())
                        .or_insert(0) += 1;
                    println!(
                        "{:<8} attempt {} -> charged {cents} cents",
                        context.id(),
                        context.attempt()
                    );
                    Ok::<_, HandlerError>(format!("charged {cents} cents"))
                }
            }
        },
    )
    .await;
    // Duplicates were acked without running the handler; a settle error (an ack lost with
    // the connection) would be counted here, not end the consumer: the server redelivers
    // and the redelivery is a duplicate.
    println!(
        "settled: {} acked (duplicates included), {} dead-lettered, {} settle errors",
        report.acked, report.dead_lettered, report.settle_errors
    );
    let charged = charged.lock().unwrap().clone();

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
