//! The RabbitMQ adapter against a real broker (`AMQP_URL`, default guest@127.0.0.1:5672),
//! with effects counted in Postgres (`DATABASE_URL`). Each test uses its own queues.
#![cfg(all(feature = "rabbitmq", feature = "postgres"))]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use idem_core::testing::{FailingStore, FaultyStore};
use idem_core::{MemoryStore, Scope};
use idem_queue::inbox::{Inbox, InboxOutcome};
use idem_queue::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicQosOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use idem_queue::lapin::protocol::BasicProperties;
use idem_queue::lapin::types::{AMQPValue, FieldTable, ShortString};
use idem_queue::lapin::{Channel, Connection, ConnectionProperties, Consumer};
use idem_queue::rabbitmq::{
    DeadLetterCopy, MissingId, Publisher, RabbitConsumer, RabbitOptions, SettleFailure,
};
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
        max_attempts: Some(3),
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
                        .handle(&delivery, |_, _| async move {
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
                            .handle(&delivery, |_, _| async move {
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
                .handle(&delivery, |delivery, _| async move {
                    match delivery.data.as_slice() {
                        b"poison" => Err(HandlerError::transient("the poison fails every time")),
                        b"malformed" => Err(HandlerError::permanent("cannot parse")),
                        _ => Ok(Bytes::from_static(b"ok")),
                    }
                })
                .await
                .unwrap();
            if handled.id == "poison" {
                poison_deliveries.push(handled.attempt.expect("the handler ran"));
            }
            settlements.push((handled.id, handled.settlement));
        }
    })
    .await;
    assert!(finished.is_ok(), "settled: {settlements:?}");
    assert_eq!(poison_deliveries, vec![1, 2, 3], "counted in the store");
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

/// Publishes `body` without a `message_id`, confirmed.
async fn publish_without_id(publisher: &Publisher, queue: &str, body: &[u8]) {
    use idem_queue::lapin::options::BasicPublishOptions;
    let confirm = publisher
        .channel()
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
}

async fn next_delivery(deliveries: &mut Consumer) -> idem_queue::lapin::message::Delivery {
    tokio::time::timeout(PATIENCE, deliveries.next())
        .await
        .expect("a delivery in time")
        .expect("consumer open")
        .expect("delivery")
}

/// A classic queue with a dead-letter exchange routing to `<queue>-dlq`; returns both names.
async fn classic_with_dlq(publisher: &Publisher, name: &str) -> (String, String, Cleanup) {
    let queue = format!("idemq-{name}");
    let dlq = format!("idemq-{name}-dlq");
    let guard = delete_queues_on_drop(vec![queue.clone(), dlq.clone()]);
    declare(publisher.channel(), &dlq, &[]).await;
    declare(
        publisher.channel(),
        &queue,
        &[
            ("x-dead-letter-exchange", AMQPValue::LongString("".into())),
            (
                "x-dead-letter-routing-key",
                AMQPValue::LongString(dlq.as_str().into()),
            ),
        ],
    )
    .await;
    (queue, dlq, guard)
}

// Fails before the store counted attempts: a classic queue only has the `redelivered`
// flag, so the delivery number never passed 2 and a limit of 3 was never reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classic_queue_poison_message_reaches_the_dead_letter_after_the_limit() {
    let connection = connect().await;
    let publisher = Publisher::new(connection.create_channel().await.unwrap())
        .await
        .unwrap();
    let (queue, dlq, _queues) =
        classic_with_dlq(&publisher, &format!("classic-poison-{}", suffix())).await;
    publisher
        .publish("", &queue, "poison", b"p", BasicProperties::default())
        .await
        .unwrap();

    let dedup = Deduplicator::new(Arc::new(MemoryStore::new()), Scope::new(queue.clone()));
    let adapter = RabbitConsumer::new(
        dedup.clone(),
        RabbitOptions {
            retry: fast_retries(),
            ..RabbitOptions::default()
        },
    );
    let (channel, mut deliveries) = consume(&connection, &queue, 1).await;
    let mut seen = Vec::new();
    loop {
        let delivery = next_delivery(&mut deliveries).await;
        let handled = adapter
            .handle(&delivery, |_, context| async move {
                Err::<Bytes, _>(HandlerError::transient(format!(
                    "fails on attempt {}",
                    context.attempt()
                )))
            })
            .await
            .unwrap();
        seen.push((handled.attempt, handled.delivered, handled.settlement));
        if matches!(handled.settlement, Settlement::DeadLetter { .. }) || seen.len() > 5 {
            break;
        }
        assert!(
            matches!(handled.settlement, Settlement::Retry { .. }),
            "{seen:?}"
        );
    }
    let attempts: Vec<_> = seen.iter().map(|(attempt, ..)| *attempt).collect();
    assert_eq!(attempts, vec![Some(1), Some(2), Some(3)], "{seen:?}");
    assert!(
        seen.iter().all(|(_, delivered, _)| *delivered <= 2),
        "a classic queue only knows `redelivered`: {seen:?}"
    );
    assert_eq!(
        seen[2].2,
        Settlement::DeadLetter {
            reason: DeadLetterReason::MaxDeliveries
        }
    );
    let letter = dedup.dead_letter_record("poison").await.unwrap().unwrap();
    assert_eq!(letter.deliveries, 3);
    assert!(letter.error.unwrap().contains("attempt 3"));
    assert!(
        eventually(PATIENCE, || async {
            message_count(&channel, &dlq).await == 1
        })
        .await
    );
    assert_eq!(message_count(&channel, &queue).await, 0);
}

// Fails when deliveries bounced because another consumer held the message count as
// attempts (the broker's count): four bounces would leave no attempt for the handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_bounced_while_another_consumer_holds_the_message_use_no_attempts() {
    let name = suffix();
    let queue = format!("idemq-bounce-{name}");
    let _queues = delete_queues_on_drop(vec![queue.clone()]);
    let connection = connect().await;
    let publisher = Publisher::new(connection.create_channel().await.unwrap())
        .await
        .unwrap();
    declare(publisher.channel(), &queue, &[quorum()]).await;
    publisher
        .publish("", &queue, "busy", b"b", BasicProperties::default())
        .await
        .unwrap();

    let dedup = Deduplicator::new(Arc::new(MemoryStore::new()), Scope::new(queue.clone()));
    // Another consumer holds the message.
    let Claim::Acquired(elsewhere) = dedup.claim("busy", None).await.unwrap() else {
        panic!("claimed")
    };
    let adapter = RabbitConsumer::new(
        dedup.clone(),
        RabbitOptions {
            retry: RetryPolicy {
                max_attempts: Some(2),
                ..fast_retries()
            },
            ..RabbitOptions::default()
        },
    );
    let (_channel, mut deliveries) = consume(&connection, &queue, 1).await;
    for _ in 0..4 {
        let delivery = next_delivery(&mut deliveries).await;
        let handled = adapter
            .handle(&delivery, |_, _| async { Ok::<_, HandlerError>("never") })
            .await
            .unwrap();
        assert!(matches!(handled.outcome, Ok(Outcome::InFlight { .. })));
        assert!(matches!(handled.settlement, Settlement::Defer { .. }));
        assert_eq!(handled.attempt, None);
    }
    elsewhere.release().await.unwrap();

    let mut attempts = Vec::new();
    loop {
        let delivery = next_delivery(&mut deliveries).await;
        let handled = adapter
            .handle(&delivery, |_, _| async {
                Err::<Bytes, _>(HandlerError::transient("down"))
            })
            .await
            .unwrap();
        attempts.push((handled.attempt, handled.delivered));
        if matches!(handled.settlement, Settlement::DeadLetter { .. }) {
            break;
        }
    }
    assert_eq!(
        attempts.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
        vec![Some(1), Some(2)]
    );
    assert!(
        attempts[0].1 >= 5,
        "the broker counted the bounces: {attempts:?}"
    );
}

// Fails when a duplicate of a dead-lettered message is rejected again (the dead-letter
// exchange would get a second copy), and when dead-letter records expire with the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_of_a_dead_letter_is_acked_and_the_record_outlives_the_lease() {
    let connection = connect().await;
    let publisher = Publisher::new(connection.create_channel().await.unwrap())
        .await
        .unwrap();
    let (queue, dlq, _queues) =
        classic_with_dlq(&publisher, &format!("dead-dup-{}", suffix())).await;
    for _ in 0..2 {
        publisher
            .publish("", &queue, "bad", b"x", BasicProperties::default())
            .await
            .unwrap();
    }
    let lease = Duration::from_millis(100);
    let dedup = Deduplicator::with_options(
        Arc::new(MemoryStore::new()),
        Scope::new(queue.clone()),
        DedupOptions {
            lease,
            ..DedupOptions::default()
        },
    )
    .unwrap();
    let adapter = RabbitConsumer::new(dedup.clone(), RabbitOptions::default());
    let (channel, mut deliveries) = consume(&connection, &queue, 1).await;
    let runs = Arc::new(AtomicU64::new(0));
    let mut settled = Vec::new();
    for _ in 0..2 {
        let delivery = next_delivery(&mut deliveries).await;
        let runs = Arc::clone(&runs);
        let handled = adapter
            .handle(&delivery, |_, _| async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Err::<Bytes, _>(HandlerError::permanent("cannot parse"))
            })
            .await
            .unwrap();
        settled.push((
            handled.settlement,
            matches!(handled.outcome, Ok(Outcome::Duplicate(_))),
        ));
    }
    let dead = Settlement::DeadLetter {
        reason: DeadLetterReason::Permanent,
    };
    assert_eq!(settled, vec![(dead, false), (dead, true)]);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // One copy in the dead-letter queue: the duplicate was acked, not rejected again.
    assert!(
        eventually(PATIENCE, || async {
            message_count(&channel, &dlq).await == 1
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(message_count(&channel, &dlq).await, 1);
    assert_eq!(message_count(&channel, &queue).await, 0);
    // Five leases later the dead-letter record is still there.
    let letter = dedup.dead_letter_record("bad").await.unwrap();
    assert_eq!(letter.map(|l| l.reason), Some(DeadLetterReason::Permanent));
}

// Fails when every id-less message shares one key: the second would find the first's dead
// letter (or, keyed by body, its outcome) and never get its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_without_an_id_are_dead_lettered_or_keyed_by_body_never_dropped() {
    let connection = connect().await;
    let publisher = Publisher::new(connection.create_channel().await.unwrap())
        .await
        .unwrap();
    let (queue, dlq, _queues) = classic_with_dlq(&publisher, &format!("no-id-{}", suffix())).await;
    for body in [b"first".as_slice(), b"second"] {
        publish_without_id(&publisher, &queue, body).await;
    }

    // The default: refused, each with a dead-letter record of its own; nothing runs.
    let dedup = Deduplicator::new(Arc::new(MemoryStore::new()), Scope::new(queue.clone()));
    let adapter = RabbitConsumer::new(dedup.clone(), RabbitOptions::default());
    let (channel, mut deliveries) = consume(&connection, &queue, 1).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let delivery = next_delivery(&mut deliveries).await;
        assert_eq!(adapter.message_id(&delivery), None);
        let handled = adapter
            .handle(&delivery, |_, _| async {
                panic!("an id-less message must not run");
                #[allow(unreachable_code)]
                Ok::<_, HandlerError>("")
            })
            .await
            .unwrap();
        assert_eq!(
            handled.settlement,
            Settlement::DeadLetter {
                reason: DeadLetterReason::Permanent
            }
        );
        ids.push(handled.id);
    }
    assert_ne!(ids[0], ids[1]);
    for (id, body) in ids.iter().zip(["first", "second"]) {
        let letter = dedup
            .dead_letter_record(id)
            .await
            .unwrap()
            .expect("its own dead letter");
        assert_eq!(letter.payload, body);
        assert!(letter.error.unwrap().contains("no id"));
    }
    assert!(
        eventually(PATIENCE, || async {
            message_count(&channel, &dlq).await == 2
        })
        .await
    );

    // Keyed by body hash: both run, once each; a copy of the first is a duplicate.
    for body in [b"first".as_slice(), b"second", b"first"] {
        publish_without_id(&publisher, &queue, body).await;
    }
    let adapter = RabbitConsumer::new(
        dedup.clone(),
        RabbitOptions {
            missing_id: MissingId::BodyHash,
            ..RabbitOptions::default()
        },
    );
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        let delivery = next_delivery(&mut deliveries).await;
        let handled = adapter
            .handle(&delivery, |delivery, _| async move {
                Ok::<_, HandlerError>(Bytes::copy_from_slice(&delivery.data))
            })
            .await
            .unwrap();
        assert_eq!(handled.settlement, Settlement::Ack);
        outcomes.push(matches!(handled.outcome, Ok(Outcome::Processed { .. })));
    }
    assert_eq!(outcomes, vec![true, true, false]);
}

// Fails before settlements were checked: lapin answers `Ok(false)` on a closed channel and
// the adapter reported an ack that never happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_on_a_closed_channel_is_an_error_and_the_redelivery_a_duplicate() {
    let name = suffix();
    let queue = format!("idemq-closed-{name}");
    let _queues = delete_queues_on_drop(vec![queue.clone()]);
    let connection = connect().await;
    let publisher = Publisher::new(connection.create_channel().await.unwrap())
        .await
        .unwrap();
    declare(publisher.channel(), &queue, &[]).await;
    publish_all(&publisher, &queue, vec![1]).await;
    let dedup = Deduplicator::new(Arc::new(MemoryStore::new()), Scope::new(queue.clone()));
    let adapter = RabbitConsumer::new(dedup, RabbitOptions::default());
    let runs = Arc::new(AtomicU64::new(0));

    let (channel, mut deliveries) = consume(&connection, &queue, 1).await;
    let delivery = next_delivery(&mut deliveries).await;
    channel.close(200, "gone".into()).await.unwrap();
    let counted = Arc::clone(&runs);
    let error = adapter
        .handle(&delivery, |_, _| async move {
            counted.fetch_add(1, Ordering::SeqCst);
            Ok::<_, HandlerError>("done")
        })
        .await
        .expect_err("the ack cannot have been sent");
    assert!(
        matches!(error.source, SettleFailure::ChannelClosed),
        "{error:?}"
    );
    assert_eq!(error.settlement, Settlement::Ack);

    let (_channel, mut deliveries) = consume(&connection, &queue, 1).await;
    let delivery = next_delivery(&mut deliveries).await;
    let counted = Arc::clone(&runs);
    let handled = adapter
        .handle(&delivery, |_, _| async move {
            counted.fetch_add(1, Ordering::SeqCst);
            Ok::<_, HandlerError>("again")
        })
        .await
        .unwrap();
    assert!(matches!(handled.outcome, Ok(Outcome::Duplicate(_))));
    assert_eq!(handled.settlement, Settlement::Ack);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

// A store that cannot be reached: nothing runs, nothing is acked, no attempt is used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_be_reached_defers_every_delivery_and_runs_nothing() {
    let name = suffix();
    let queue = format!("idemq-nostore-{name}");
    let _queues = delete_queues_on_drop(vec![queue.clone()]);
    let connection = connect().await;
    let publisher = Publisher::new(connection.create_channel().await.unwrap())
        .await
        .unwrap();
    declare(publisher.channel(), &queue, &[]).await;
    publish_all(&publisher, &queue, vec![1]).await;
    let store = FailingStore::default();
    let dedup = Deduplicator::new(store.clone(), Scope::new(queue.clone()));
    let adapter = RabbitConsumer::new(
        dedup,
        RabbitOptions {
            retry: fast_retries(),
            ..RabbitOptions::default()
        },
    );
    let (channel, mut deliveries) = consume(&connection, &queue, 1).await;
    for _ in 0..4 {
        let delivery = next_delivery(&mut deliveries).await;
        let handled = adapter
            .handle(&delivery, |_, _| async {
                panic!("must not run without a claim");
                #[allow(unreachable_code)]
                Ok::<_, HandlerError>("")
            })
            .await
            .unwrap();
        assert!(matches!(
            handled.outcome,
            Err(idem_queue::DedupError::Store(_))
        ));
        assert!(
            matches!(handled.settlement, Settlement::Defer { .. }),
            "{handled:?}"
        );
    }
    assert!(store.calls() >= 4);
    channel.close(200, "done".into()).await.unwrap();
    assert!(
        eventually(PATIENCE, || async {
            message_count(publisher.channel(), &queue).await == 1
        })
        .await
    );
}

// The store takes the claim but not the outcome. A success is acked (a redelivery could only
// run it again once the claim lapses); a failure for good is never acked without its dead
// letter: deferred, and dead-lettered when it comes back after the store recovered.
// Fails when an unrecorded outcome is acked whatever it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_the_store_does_not_take_is_acked_only_after_a_success() {
    let connection = connect().await;
    let publisher = Publisher::new(connection.create_channel().await.unwrap())
        .await
        .unwrap();
    let (queue, dlq, _queues) =
        classic_with_dlq(&publisher, &format!("unrecorded-{}", suffix())).await;
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let options = DedupOptions {
        lease: Duration::from_millis(300),
        complete_for: Duration::from_millis(100),
        store_timeout: Duration::from_millis(100),
        ..DedupOptions::default()
    };
    let dedup =
        Deduplicator::with_options(Arc::clone(&store), Scope::new(queue.clone()), options).unwrap();
    let adapter = RabbitConsumer::new(
        dedup.clone(),
        RabbitOptions {
            retry: fast_retries(),
            ..RabbitOptions::default()
        },
    );
    let (channel, mut deliveries) = consume(&connection, &queue, 1).await;
    let runs = Arc::new(AtomicU64::new(0));
    let handler = |runs: &Arc<AtomicU64>| {
        let runs = Arc::clone(runs);
        move |delivery: &idem_queue::lapin::message::Delivery, _| {
            let good = delivery.data == b"good";
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                if good {
                    Ok(Bytes::from_static(b"done"))
                } else {
                    Err(HandlerError::permanent("cannot parse"))
                }
            }
        }
    };

    store.fail_next_completes(u32::MAX);
    publisher
        .publish("", &queue, "good", b"good", BasicProperties::default())
        .await
        .unwrap();
    let delivery = next_delivery(&mut deliveries).await;
    let handled = adapter.handle(&delivery, handler(&runs)).await.unwrap();
    assert!(matches!(
        handled.outcome,
        Ok(Outcome::Unrecorded { result: Ok(_), .. })
    ));
    assert_eq!(handled.settlement, Settlement::Ack);

    publisher
        .publish("", &queue, "bad", b"bad", BasicProperties::default())
        .await
        .unwrap();
    let delivery = next_delivery(&mut deliveries).await;
    let handled = adapter.handle(&delivery, handler(&runs)).await.unwrap();
    assert!(
        matches!(
            handled.outcome,
            Ok(Outcome::Unrecorded { result: Err(_), .. })
        ),
        "{handled:?}"
    );
    assert!(
        matches!(handled.settlement, Settlement::Defer { .. }),
        "{handled:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);

    store.fail_next_completes(0);
    let finished = tokio::time::timeout(PATIENCE, async {
        loop {
            let delivery = next_delivery(&mut deliveries).await;
            let handled = adapter.handle(&delivery, handler(&runs)).await.unwrap();
            assert_ne!(handled.settlement, Settlement::Ack, "{handled:?}");
            if let Settlement::DeadLetter { reason } = handled.settlement {
                break reason;
            }
        }
    })
    .await;
    assert_eq!(finished.unwrap(), DeadLetterReason::Permanent);
    // It ran again only after its claim lapsed (it left no record), and is dead now.
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    assert!(dedup.dead_letter_record("bad").await.unwrap().is_some());
    assert!(
        eventually(PATIENCE, || async {
            message_count(&channel, &dlq).await == 1
        })
        .await
    );
    assert_eq!(message_count(&channel, &queue).await, 0);
}

// A real takeover: consumer A's store stops answering mid-handler, its lease ends and
// consumer B takes the message over and runs it; when A's store answers again its renewal
// is refused, its handler is cancelled before its effect, and its delivery is deferred, not
// acked. One effect. Fails when a lost lease is acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_takeover_while_a_handler_runs_cancels_it_and_the_effect_happens_once() {
    let name = suffix();
    let queue = format!("idemq-takeover-{name}");
    let _queues = delete_queues_on_drop(vec![queue.clone()]);
    let connection = connect().await;
    let publisher = Publisher::new(connection.create_channel().await.unwrap())
        .await
        .unwrap();
    declare(publisher.channel(), &queue, &[]).await;
    for _ in 0..2 {
        publisher
            .publish("", &queue, "t", b"t", BasicProperties::default())
            .await
            .unwrap();
    }
    let shared = Arc::new(MemoryStore::new());
    let faulty = Arc::new(FaultyStore::new(Arc::clone(&shared)));
    let options = DedupOptions {
        lease: Duration::from_millis(300),
        store_timeout: Duration::from_millis(50),
        complete_for: Duration::from_millis(200),
        ..DedupOptions::default()
    };
    let scope = Scope::new(queue.clone());
    let rabbit = RabbitOptions {
        retry: fast_retries(),
        ..RabbitOptions::default()
    };
    let adapter_a = RabbitConsumer::new(
        Deduplicator::with_options(Arc::clone(&faulty), scope.clone(), options.clone()).unwrap(),
        rabbit.clone(),
    );
    let adapter_b = RabbitConsumer::new(
        Deduplicator::with_options(shared, scope, options).unwrap(),
        rabbit,
    );
    let effects = Arc::new(AtomicU64::new(0));

    let (_channel_a, mut deliveries_a) = consume(&connection, &queue, 1).await;
    let delivery_a = next_delivery(&mut deliveries_a).await;
    let a = {
        let (faulty, effects) = (Arc::clone(&faulty), Arc::clone(&effects));
        tokio::spawn(async move {
            let handled = adapter_a
                .handle(&delivery_a, |_, context| async move {
                    faulty.stall_everything(true);
                    tokio::select! {
                        () = context.cancelled() => {
                            Err(HandlerError::transient("the claim was lost; stopped before the effect"))
                        }
                        () = tokio::time::sleep(PATIENCE) => {
                            effects.fetch_add(1, Ordering::SeqCst);
                            Ok(Bytes::new())
                        }
                    }
                })
                .await
                .unwrap();
            (handled, delivery_a)
        })
    };

    // B gets the second copy; it is in flight until A's lease ends, then B runs it.
    let (_channel_b, mut deliveries_b) = consume(&connection, &queue, 1).await;
    let b_ran = tokio::time::timeout(PATIENCE, async {
        loop {
            let delivery = next_delivery(&mut deliveries_b).await;
            let effects = Arc::clone(&effects);
            let handled = adapter_b
                .handle(&delivery, |_, _| async move {
                    effects.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, HandlerError>(Bytes::new())
                })
                .await
                .unwrap();
            if matches!(handled.outcome, Ok(Outcome::Processed { .. })) {
                break;
            }
        }
    })
    .await;
    assert!(b_ran.is_ok(), "B took the message over");
    faulty.stall_everything(false);
    let (handled, _) = tokio::time::timeout(PATIENCE, a).await.unwrap().unwrap();
    assert!(
        matches!(handled.outcome, Ok(Outcome::LeaseLost { result: Err(_) })),
        "{handled:?}"
    );
    assert!(
        matches!(handled.settlement, Settlement::Defer { .. }),
        "{handled:?}"
    );

    // A's copy comes back and is a duplicate.
    let redelivered = tokio::time::timeout(PATIENCE, async {
        loop {
            let delivery = tokio::select! {
                Some(Ok(d)) = deliveries_a.next() => d,
                Some(Ok(d)) = deliveries_b.next() => d,
            };
            let handled = adapter_b
                .handle(&delivery, |_, _| async { Ok::<_, HandlerError>("never") })
                .await
                .unwrap();
            if matches!(handled.outcome, Ok(Outcome::Duplicate(_))) {
                break handled.settlement;
            }
        }
    })
    .await;
    assert_eq!(redelivered.unwrap(), Settlement::Ack);
    assert_eq!(effects.load(Ordering::SeqCst), 1, "one effect");
    assert_eq!(message_count(publisher.channel(), &queue).await, 0);
}

// With `dead_letter_copy` the adapter publishes the copy itself, confirmed, and acks the
// original only then; a duplicate of the dead letter publishes it again (at least once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_copy_is_confirmed_before_the_original_is_acked() {
    let name = suffix();
    let queue = format!("idemq-copy-{name}");
    let dlq = format!("idemq-copy-{name}-dlq");
    let _queues = delete_queues_on_drop(vec![queue.clone(), dlq.clone()]);
    let connection = connect().await;
    let publisher = Publisher::new(connection.create_channel().await.unwrap())
        .await
        .unwrap();
    // No dead-letter exchange on the work queue: a reject would lose the message.
    declare(publisher.channel(), &queue, &[]).await;
    declare(publisher.channel(), &dlq, &[]).await;
    for _ in 0..2 {
        publisher
            .publish("", &queue, "bad", b"x", BasicProperties::default())
            .await
            .unwrap();
    }
    let copies = Publisher::new(connection.create_channel().await.unwrap())
        .await
        .unwrap();
    let dedup = Deduplicator::new(Arc::new(MemoryStore::new()), Scope::new(queue.clone()));
    let adapter = RabbitConsumer::new(
        dedup,
        RabbitOptions {
            dead_letter_copy: Some(DeadLetterCopy::new(copies, "", &dlq)),
            ..RabbitOptions::default()
        },
    );
    let (channel, mut deliveries) = consume(&connection, &queue, 1).await;
    for _ in 0..2 {
        let delivery = next_delivery(&mut deliveries).await;
        let handled = adapter
            .handle(&delivery, |_, _| async {
                Err::<Bytes, _>(HandlerError::permanent("cannot parse"))
            })
            .await
            .unwrap();
        assert!(matches!(handled.settlement, Settlement::DeadLetter { .. }));
    }
    assert!(
        eventually(PATIENCE, || async {
            message_count(&channel, &dlq).await == 2
        })
        .await
    );
    assert_eq!(message_count(&channel, &queue).await, 0);
    let copy = channel
        .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("a copy");
    let properties = &copy.delivery.properties;
    assert_eq!(properties.message_id().as_ref().unwrap().as_str(), "bad");
    let headers = properties.headers().as_ref().unwrap();
    assert!(matches!(
        headers.inner().get("x-idem-dead-letter-reason"),
        Some(AMQPValue::LongString(reason)) if reason.to_string() == "permanent"
    ));
}
