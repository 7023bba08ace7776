//! The RabbitMQ adapter against a real broker (`AMQP_URL`, default guest@127.0.0.1:5672),
//! with effects counted in Postgres (`DATABASE_URL`). Each test uses its own queues.
#![cfg(all(feature = "rabbitmq", feature = "postgres"))]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use idem::{MemoryStore, Scope};
use idem_queue::inbox::{Inbox, InboxOutcome};
use idem_queue::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicQosOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use idem_queue::lapin::protocol::BasicProperties;
use idem_queue::lapin::types::{AMQPValue, FieldTable, ShortString};
use idem_queue::lapin::{Channel, Connection, ConnectionProperties, Consumer};
use idem_queue::rabbitmq::{Publisher, RabbitConsumer, RabbitOptions};
use idem_queue::{
    Claim, DeadLetterReason, DedupOptions, Deduplicator, HandlerError, Outcome, RetryPolicy,
    Settlement,
};
use idem_redis::{RedisOptions, RedisStore};

use common::{
    Cleanup, Effects, amqp_url, delete_redis_prefix, drop_tables_on_drop, eventually, pg_pool,
    redis_url, suffix,
};

const PATIENCE: Duration = Duration::from_secs(20);

async fn connect() -> Connection {
    let url = amqp_url();
    Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|error| panic!("cannot connect to RabbitMQ at {url}: {error}"))
}

/// Deletes `queues` when dropped.
fn delete_queues_on_drop(queues: Vec<String>) -> Cleanup {
    Cleanup::new(move || async move {
        let Ok(connection) =
            Connection::connect(&amqp_url(), ConnectionProperties::default()).await
        else {
            return;
        };
        if let Ok(channel) = connection.create_channel().await {
            for queue in queues {
                let _ = channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
        }
        let _ = connection.close(200, "bye".into()).await;
    })
}

async fn declare(channel: &Channel, queue: &str, arguments: &[(&str, AMQPValue)]) {
    let mut table = FieldTable::default();
    for (name, value) in arguments {
        table.insert((*name).into(), value.clone());
    }
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            table,
        )
        .await
        .expect("declare the queue");
}

fn quorum() -> (&'static str, AMQPValue) {
    ("x-queue-type", AMQPValue::LongString("quorum".into()))
}

async fn consume(connection: &Connection, queue: &str, prefetch: u16) -> (Channel, Consumer) {
    let channel = connection.create_channel().await.unwrap();
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .unwrap();
    let consumer = channel
        .basic_consume(
            queue.into(),
            ShortString::default(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    (channel, consumer)
}

async fn message_count(channel: &Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|q| q.message_count())
        .unwrap_or(u32::MAX)
}

async fn publish_all(publisher: &Publisher, queue: &str, ids: Vec<usize>) {
    futures_util::stream::iter(ids)
        .for_each_concurrent(64, |i| async move {
            publisher
                .publish(
                    "",
                    queue,
                    &format!("m-{i}"),
                    format!("payload {i}").as_bytes(),
                    BasicProperties::default(),
                )
                .await
                .expect("publish");
        })
        .await;
}

fn fast_retries() -> RetryPolicy {
    RetryPolicy {
        max_deliveries: Some(3),
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        in_flight_min: Duration::from_millis(50),
        in_flight_max: Duration::from_millis(500),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_messages_delivered_many_times_have_one_effect_each() {
    let name = suffix();
    let queue = format!("idemq-{name}");
    let prefix = format!("idemq-test-{name}");
    let _queues = delete_queues_on_drop(vec![queue.clone()]);
    let _tables = drop_tables_on_drop(vec![format!("idemq_effects_{name}")]);
    let _keys = {
        let prefix = prefix.clone();
        Cleanup::new(move || async move { delete_redis_prefix(&prefix).await })
    };
    let pool = pg_pool().await;
    let effects = Arc::new(Effects::create(&pool, &name).await);
    let connection = connect().await;
    let publisher = Publisher::new(connection.create_channel().await.unwrap())
        .await
        .unwrap();
    declare(publisher.channel(), &queue, &[quorum()]).await;

    // 1,000 messages; every third published twice and every seventh once more (RabbitMQ has
    // no publish-side deduplication: the consumer must catch them all).
    let copies: Vec<usize> = (0..1000)
        .chain((0..1000).step_by(3))
        .chain((0..1000).step_by(7))
        .collect();
    let total = copies.len() as u64;
    publish_all(&publisher, &queue, copies).await;

    let store = RedisStore::connect_with(
        &redis_url(),
        RedisOptions {
            prefix: prefix.clone(),
            ..RedisOptions::default()
        },
    )
    .await
    .expect("connect to Redis");
    let options = DedupOptions {
        lease: Duration::from_millis(800),
        ..DedupOptions::default()
    };
    let dedup =
        Deduplicator::with_options(Arc::new(store), Scope::new(queue.clone()), options).unwrap();
    let rabbit_options = RabbitOptions {
        retry: fast_retries(),
        ..RabbitOptions::default()
    };
    let settled = Arc::new(AtomicU64::new(0));

    // Consumer A handles 300 deliveries, then its channel dies: of every ten, seven are
    // handled normally, two are completed but never acked (a crash between store and ack),
    // and one is claimed and abandoned mid-handler. What else it had prefetched is requeued.
    {
        let connection_a = connect().await;
        let (channel, mut deliveries) = consume(&connection_a, &queue, 100).await;
        let adapter = RabbitConsumer::new(dedup.clone(), rabbit_options.clone());
        for n in 0..300 {
            let delivery = tokio::time::timeout(PATIENCE, deliveries.next())
                .await
                .expect("consumer A receives")
                .expect("consumer open")
                .expect("delivery");
            let id = adapter.message_id(&delivery).unwrap();
            match n % 10 {
                0..=6 => {
                    let effects = Arc::clone(&effects);
                    let handled = adapter
                        .handle(&delivery, |_| async move {
                            effects.record(&effects.pool, &id, "A").await?;
                            Ok::<_, HandlerError>(Bytes::new())
                        })
                        .await
                        .unwrap();
                    if handled.settlement == Settlement::Ack {
                        settled.fetch_add(1, Ordering::Relaxed);
                    }
                }
                7 | 8 => {
                    let effects = Arc::clone(&effects);
                    let recorded = id.clone();
                    dedup
                        .process(&id, || async move {
                            effects.record(&effects.pool, &recorded, "A").await?;
                            Ok::<_, HandlerError>(Bytes::new())
                        })
                        .await
                        .unwrap();
                }
                _ => {
                    if let Claim::Acquired(held) = dedup.claim(&id, None).await.unwrap() {
                        drop(held);
                    }
                }
            }
        }
        channel.close(200, "crash".into()).await.unwrap();
        connection_a.close(200, "crash".into()).await.unwrap();
    }
    let a_settled = settled.load(Ordering::Relaxed);

    // Consumer B handles everything left, 16 at once.
    let counters = Arc::new([(); 4].map(|()| AtomicU64::new(0)));
    let (channel_b, deliveries) = consume(&connection, &queue, 64).await;
    let worker = {
        let adapter = RabbitConsumer::new(dedup.clone(), rabbit_options);
        let (effects, counters, settled) = (
            Arc::clone(&effects),
            Arc::clone(&counters),
            Arc::clone(&settled),
        );
        tokio::spawn(async move {
            deliveries
                .for_each_concurrent(16, |delivery| {
                    let (adapter, effects, counters, settled) =
                        (&adapter, &effects, &counters, &settled);
                    async move {
                        let Ok(delivery) = delivery else { return };
                        let id = adapter.message_id(&delivery).unwrap();
                        let handled = adapter
                            .handle(&delivery, |_| async move {
                                effects.record(&effects.pool, &id, "B").await?;
                                Ok::<_, HandlerError>(Bytes::new())
                            })
                            .await
                            .unwrap();
                        let slot = match handled.outcome {
                            Ok(Outcome::Processed { .. }) => 0,
                            Ok(Outcome::Duplicate(_)) => 1,
                            Ok(Outcome::InFlight { .. }) => 2,
                            _ => 3,
                        };
                        counters[slot].fetch_add(1, Ordering::Relaxed);
                        if handled.settlement == Settlement::Ack {
                            settled.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
                .await;
        })
    };
    let done = eventually(PATIENCE, || async {
        settled.load(Ordering::Relaxed) == total && effects.counts().await.1 == 1000
    })
    .await;
    worker.abort();
    let [processed, duplicates, in_flight, other] =
        counters.each_ref().map(|c| c.load(Ordering::Relaxed));
    eprintln!(
        "A acked {a_settled}; B: {processed} processed, {duplicates} duplicates, \
         {in_flight} in flight elsewhere, {other} other; {} of {total} acked",
        settled.load(Ordering::Relaxed)
    );
    assert!(done, "every copy acked within {PATIENCE:?}");
    assert_eq!(
        effects.counts().await,
        (1000, 1000, 0),
        "exactly one effect per message"
    );
    assert!(
        duplicates >= total - 1000 - 60,
        "copies and unacked completions are duplicates"
    );
    assert_eq!(other, 0);
    assert_eq!(message_count(&channel_b, &queue).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_effects_survive_a_crash_between_commit_and_ack() {
    let name = suffix();
    let queue = format!("idemq-inbox-{name}");
    let inbox_table = format!("idemq_inbox_{name}");
    let _queues = delete_queues_on_drop(vec![queue.clone()]);
    let _tables = drop_tables_on_drop(vec![format!("idemq_effects_{name}"), inbox_table.clone()]);
    let pool = pg_pool().await;
    let effects = Arc::new(Effects::create(&pool, &name).await);
    let inbox = Inbox::new(pool.clone())
        .with_table(&inbox_table)
        .unwrap()
        .with_scope(queue.clone());
    inbox.migrate().await.unwrap();
    let connection = connect().await;
    let publisher = Publisher::new(connection.create_channel().await.unwrap())
        .await
        .unwrap();
    declare(publisher.channel(), &queue, &[]).await;
    publish_all(&publisher, &queue, (0..20).collect()).await;

    let process = |id: String| {
        let (inbox, effects) = (inbox.clone(), Arc::clone(&effects));
        async move {
            inbox
                .process(&id.clone(), |tx| {
                    Box::pin(async move { effects.record(&mut *tx, &id, "x").await })
                })
                .await
                .unwrap()
        }
    };
    let id_of = |properties: &BasicProperties| {
        properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string())
            .unwrap()
    };

    // The first consumer commits every message's effects, acks the even ones, and its
    // channel dies before acking the odd ones.
    {
        let (channel, mut deliveries) = consume(&connection, &queue, 20).await;
        for n in 0..20 {
            let delivery = tokio::time::timeout(PATIENCE, deliveries.next())
                .await
                .expect("receives")
                .unwrap()
                .unwrap();
            let outcome = process(id_of(&delivery.properties)).await;
            assert_eq!(outcome, InboxOutcome::Processed(()));
            if n % 2 == 0 {
                delivery.ack(BasicAckOptions::default()).await.unwrap();
            }
        }
        channel.close(200, "crash".into()).await.unwrap();
    }

    // The redeliveries find their ids committed: nothing runs, and they are acked.
    let (channel, mut deliveries) = consume(&connection, &queue, 20).await;
    for _ in 0..10 {
        let delivery = tokio::time::timeout(PATIENCE, deliveries.next())
            .await
            .expect("redelivery")
            .unwrap()
            .unwrap();
        assert!(delivery.redelivered);
        assert_eq!(
            process(id_of(&delivery.properties)).await,
            InboxOutcome::Duplicate
        );
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert!(
        eventually(PATIENCE, || async {
            message_count(&channel, &queue).await == 0
        })
        .await
    );
    assert_eq!(effects.counts().await, (20, 20, 0));
    for n in 0..20 {
        assert!(inbox.is_processed(&format!("m-{n}")).await.unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_after_max_deliveries() {
    let name = suffix();
    let queue = format!("idemq-poison-{name}");
    let dlq = format!("idemq-poison-dlq-{name}");
    let _queues = delete_queues_on_drop(vec![queue.clone(), dlq.clone()]);
    let connection = connect().await;
    let publisher = Publisher::new(connection.create_channel().await.unwrap())
        .await
        .unwrap();
    declare(publisher.channel(), &dlq, &[]).await;
    declare(
        publisher.channel(),
        &queue,
        &[
            quorum(),
            ("x-dead-letter-exchange", AMQPValue::LongString("".into())),
            (
                "x-dead-letter-routing-key",
                AMQPValue::LongString(dlq.as_str().into()),
            ),
        ],
    )
    .await;
    publish_all(&publisher, &queue, (0..5).collect()).await;
    for id in ["poison", "malformed"] {
        publisher
            .publish("", &queue, id, id.as_bytes(), BasicProperties::default())
            .await
            .unwrap();
    }

    let dedup = Deduplicator::new(Arc::new(MemoryStore::new()), Scope::new(queue.clone()));
    let adapter = RabbitConsumer::new(
        dedup.clone(),
        RabbitOptions {
            retry: fast_retries(),
            ..RabbitOptions::default()
        },
    );
    let (channel, mut deliveries) = consume(&connection, &queue, 10).await;
    let mut poison_deliveries = Vec::new();
    let mut settlements = Vec::new();
    let finished = tokio::time::timeout(PATIENCE, async {
        while settlements.len() < 9 {
            let delivery = deliveries.next().await.unwrap().unwrap();
            let handled = adapter
                .handle(&delivery, |delivery| async move {
                    match delivery.data.as_slice() {
                        b"poison" => Err(HandlerError::transient("the poison fails every time")),
                        b"malformed" => Err(HandlerError::permanent("cannot parse")),
                        _ => Ok(Bytes::from_static(b"ok")),
                    }
                })
                .await
                .unwrap();
            if handled.id == "poison" {
                poison_deliveries.push(handled.attempt.delivered);
            }
            settlements.push((handled.id, handled.settlement));
        }
    })
    .await;
    assert!(finished.is_ok(), "settled: {settlements:?}");
    assert_eq!(
        poison_deliveries,
        vec![1, 2, 3],
        "counted by x-delivery-count"
    );
    let dead: Vec<_> = settlements
        .iter()
        .filter(|(_, s)| matches!(s, Settlement::DeadLetter { .. }))
        .map(|(id, _)| id.as_str())
        .collect();
    assert_eq!(dead.len(), 2, "{settlements:?}");

    let letter = dedup
        .dead_letter_record("poison")
        .await
        .unwrap()
        .expect("dead letter");
    assert_eq!(
        (letter.reason, letter.deliveries),
        (DeadLetterReason::MaxDeliveries, 3)
    );
    assert_eq!(letter.payload, "poison");
    assert!(letter.error.unwrap().contains("fails every time"));
    let letter = dedup
        .dead_letter_record("malformed")
        .await
        .unwrap()
        .expect("dead letter");
    assert_eq!(
        (letter.reason, letter.deliveries),
        (DeadLetterReason::Permanent, 1)
    );

    // Rejected without requeue, both reached the queue's dead-letter exchange, and nothing
    // is left in the work queue.
    assert!(
        eventually(PATIENCE, || async {
            message_count(&channel, &dlq).await == 2
        })
        .await
    );
    assert_eq!(message_count(&channel, &queue).await, 0);
    let kept = channel
        .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("a dead-lettered message");
    assert!(
        ["poison", "malformed"].contains(
            &kept
                .delivery
                .properties
                .message_id()
                .as_ref()
                .unwrap()
                .as_str()
        )
    );
}
