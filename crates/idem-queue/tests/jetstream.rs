//! The JetStream adapter against a real NATS server (`NATS_URL`, default 127.0.0.1:4222),
//! with effects counted in Postgres (`DATABASE_URL`). Each test uses its own stream.
#![cfg(all(feature = "jetstream", feature = "postgres"))]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use idem_core::testing::FailingStore;
use idem_core::{MemoryStore, Scope};
use idem_queue::async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use idem_queue::async_nats::jetstream::{self, Context, stream};
use idem_queue::inbox::{Inbox, InboxOutcome};
use idem_queue::jetstream::{JetStreamConsumer, JetStreamOptions, MissingId, publish_with_headers};
use idem_queue::{
    Claim, DeadLetterReason, DedupOptions, Deduplicator, HandlerError, Outcome, RetryPolicy,
    Settlement, async_nats,
};
use idem_redb::RedbStore;

use common::{Cleanup, Effects, drop_tables_on_drop, eventually, nats_url, pg_pool, suffix};

const PATIENCE: Duration = Duration::from_secs(20);

async fn jetstream() -> Context {
    let url = nats_url();
    let client = async_nats::connect(&url)
        .await
        .unwrap_or_else(|error| panic!("cannot connect to NATS at {url}: {error}"));
    jetstream::new(client)
}

/// A memory-storage stream on `<prefix>.>` that is deleted when the guard drops.
async fn test_stream(
    js: &Context,
    name: &str,
    prefix: &str,
    duplicate_window: Duration,
) -> Cleanup {
    let guard = {
        let name = name.to_owned();
        Cleanup::new(move || async move {
            if let Ok(client) = async_nats::connect(nats_url()).await {
                let _ = jetstream::new(client).delete_stream(&name).await;
            }
        })
    };
    js.create_stream(stream::Config {
        name: name.to_owned(),
        subjects: vec![format!("{prefix}.>")],
        storage: stream::StorageType::Memory,
        duplicate_window,
        ..Default::default()
    })
    .await
    .expect("create the stream");
    guard
}

async fn durable(js: &Context, stream: &str, name: &str, ack_wait: Duration) -> PullConsumer {
    js.get_stream(stream)
        .await
        .expect("stream")
        .get_or_create_consumer(
            name,
            pull::Config {
                durable_name: Some(name.to_owned()),
                ack_policy: AckPolicy::Explicit,
                ack_wait,
                max_deliver: -1,
                max_ack_pending: 10_000,
                ..Default::default()
            },
        )
        .await
        .expect("create the consumer")
}

/// Whether the consumer has nothing left to deliver or to be acked.
async fn drained(consumer: &PullConsumer) -> bool {
    match consumer.get_info().await {
        Ok(info) => info.num_pending == 0 && info.num_ack_pending == 0,
        Err(_) => false,
    }
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

async fn publish_all(
    js: &Context,
    subject: &str,
    ids: impl Iterator<Item = usize>,
    with_id: bool,
) -> (u64, u64) {
    let mut acks = Vec::new();
    for i in ids {
        let payload = Bytes::from(format!("payload {i}"));
        let ack = if with_id {
            publish_with_headers(js, subject, &format!("m-{i}"), Default::default(), payload).await
        } else {
            js.publish(subject.to_owned(), payload).await
        };
        acks.push(ack.expect("publish"));
    }
    let (mut stored, mut duplicate) = (0, 0);
    for ack in acks {
        if ack.await.expect("publish ack").duplicate {
            duplicate += 1;
        } else {
            stored += 1;
        }
    }
    (stored, duplicate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_messages_delivered_many_times_have_one_effect_each() {
    let name = suffix();
    let (stream_name, prefix) = (format!("IDEMQ_{name}"), format!("idemq.{name}"));
    let subject = format!("{prefix}.orders");
    let js = jetstream().await;
    let pool = pg_pool().await;
    let _tables = drop_tables_on_drop(vec![format!("idemq_effects_{name}")]);
    let effects = Arc::new(Effects::create(&pool, &name).await);
    let _stream = test_stream(&js, &stream_name, &prefix, Duration::from_millis(500)).await;

    // 1,000 messages; 100 of them published twice within the duplicate window (the server
    // drops those); then, past the window, 334 published again with the same ids (the
    // server keeps those: only the consumer can catch them).
    let (stored, dropped) = publish_all(&js, &subject, 0..1000, true).await;
    assert_eq!((stored, dropped), (1000, 0));
    let (stored, dropped) = publish_all(&js, &subject, (0..1000).step_by(10), true).await;
    assert_eq!(
        (stored, dropped),
        (0, 100),
        "the broker's own window drops these"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (stored, dropped) = publish_all(&js, &subject, (0..1000).step_by(3), true).await;
    assert_eq!(
        (stored, dropped),
        (334, 0),
        "past the window the broker keeps them"
    );

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RedbStore::open(dir.path().join("idem.redb")).unwrap());
    let options = DedupOptions {
        lease: Duration::from_millis(800),
        ..DedupOptions::default()
    };
    let dedup =
        Deduplicator::with_options(store, Scope::new(format!("{stream_name}/workers")), options)
            .unwrap();
    let jet_options = JetStreamOptions {
        retry: fast_retries(),
        progress_every: Some(Duration::from_millis(300)),
        ..JetStreamOptions::default()
    };
    let ack_wait = Duration::from_secs(1);

    // Consumer A handles 300 deliveries, then dies: of every ten, seven are handled
    // normally, two are completed but never acked (a crash between store and ack), and one
    // is claimed and abandoned mid-handler (a crash while running). Everything else it had
    // pulled is never acked either.
    let a_settled = {
        let js_a = jetstream().await;
        let consumer = durable(&js_a, &stream_name, "workers", ack_wait).await;
        let adapter = JetStreamConsumer::new(dedup.clone(), jet_options.clone());
        let mut messages = consumer.messages().await.expect("messages");
        let mut settled = 0u64;
        for n in 0..300 {
            let message = tokio::time::timeout(PATIENCE, messages.next())
                .await
                .expect("consumer A receives")
                .expect("stream open")
                .expect("message");
            let id = adapter.message_id(&message).unwrap();
            match n % 10 {
                0..=6 => {
                    let effects = Arc::clone(&effects);
                    let handled = adapter
                        .handle(&message, |_, _| async move {
                            effects.record(&effects.pool, &id, "A").await?;
                            Ok::<_, HandlerError>(Bytes::new())
                        })
                        .await
                        .unwrap();
                    if handled.settlement == Settlement::Ack {
                        settled += 1;
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
        drop(messages);
        drop(consumer);
        // The connection goes down with A's context.
        settled
    };

    // Consumer B takes over the same durable consumer and handles everything, 16 at once.
    let js_b = jetstream().await;
    let consumer = durable(&js_b, &stream_name, "workers", ack_wait).await;
    let adapter = JetStreamConsumer::new(dedup.clone(), jet_options);
    let counters = Arc::new([(); 5].map(|()| AtomicU64::new(0)));
    let worker = {
        let (effects, counters) = (Arc::clone(&effects), Arc::clone(&counters));
        let messages = consumer.messages().await.expect("messages");
        tokio::spawn(async move {
            messages
                .for_each_concurrent(16, |message| {
                    let (adapter, effects, counters) = (&adapter, &effects, &counters);
                    async move {
                        let Ok(message) = message else { return };
                        let id = adapter.message_id(&message).unwrap();
                        let handled = adapter
                            .handle(&message, |_, _| async move {
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
                        counters[4].fetch_add(1, Ordering::Relaxed);
                    }
                })
                .await;
        })
    };
    let done = eventually(PATIENCE, || async {
        effects.counts().await.1 == 1000 && drained(&consumer).await
    })
    .await;
    worker.abort();
    let (rows, distinct, repeated) = effects.counts().await;
    let [processed, duplicates, in_flight, other, deliveries] =
        counters.each_ref().map(|c| c.load(Ordering::Relaxed));
    eprintln!(
        "A acked {a_settled}; B saw {deliveries} deliveries: {processed} processed, \
         {duplicates} duplicates, {in_flight} in flight elsewhere, {other} other"
    );
    assert!(done, "all messages handled and acked within {PATIENCE:?}");
    assert_eq!(
        (rows, distinct, repeated),
        (1000, 1000, 0),
        "exactly one effect per message"
    );
    assert!(
        duplicates >= 334,
        "the re-published copies and A's unacked completions are duplicates"
    );
    assert_eq!(other, 0);
    assert!(deliveries >= 1334 - a_settled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_effects_survive_a_crash_between_commit_and_ack() {
    let name = suffix();
    let (stream_name, prefix) = (format!("IDEMQ_{name}"), format!("idemq.{name}"));
    let subject = format!("{prefix}.inbox");
    let js = jetstream().await;
    let pool = pg_pool().await;
    let inbox_table = format!("idemq_inbox_{name}");
    let _tables = drop_tables_on_drop(vec![format!("idemq_effects_{name}"), inbox_table.clone()]);
    let effects = Arc::new(Effects::create(&pool, &name).await);
    let inbox = Inbox::new(pool.clone())
        .with_table(&inbox_table)
        .unwrap()
        .with_scope(format!("{stream_name}/inbox"));
    inbox.migrate().await.unwrap();
    let _stream = test_stream(&js, &stream_name, &prefix, Duration::from_secs(60)).await;
    publish_all(&js, &subject, 0..20, true).await;

    let process = |message: &jetstream::Message| {
        let (inbox, effects) = (inbox.clone(), Arc::clone(&effects));
        let id = idem_queue::jetstream::message_id(message, &Default::default()).unwrap();
        async move {
            inbox
                .process(&id, |tx| {
                    let (effects, id) = (Arc::clone(&effects), id.clone());
                    Box::pin(async move { effects.record(&mut *tx, &id, "x").await })
                })
                .await
                .unwrap()
        }
    };

    // The first consumer commits every message's effects, acks only the even ones, and dies.
    {
        let js_a = jetstream().await;
        let consumer = durable(&js_a, &stream_name, "inbox", Duration::from_secs(1)).await;
        let mut messages = consumer.messages().await.unwrap();
        for n in 0..20 {
            let message = tokio::time::timeout(PATIENCE, messages.next())
                .await
                .expect("receives")
                .unwrap()
                .unwrap();
            assert!(matches!(
                process(&message).await,
                InboxOutcome::Processed(())
            ));
            if n % 2 == 0 {
                message.ack().await.unwrap();
            }
        }
    }

    // The redeliveries find their ids committed: nothing runs, and they are acked.
    let consumer = durable(&js, &stream_name, "inbox", Duration::from_secs(1)).await;
    let mut messages = consumer.messages().await.unwrap();
    let mut redelivered = 0;
    while redelivered < 10 {
        let message = tokio::time::timeout(PATIENCE, messages.next())
            .await
            .expect("redelivery")
            .unwrap()
            .unwrap();
        assert!(message.info().unwrap().delivered >= 2);
        assert_eq!(process(&message).await, InboxOutcome::Duplicate);
        message.ack().await.unwrap();
        redelivered += 1;
    }
    assert!(eventually(PATIENCE, || drained(&consumer)).await);
    assert_eq!(effects.counts().await, (20, 20, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_after_max_deliveries() {
    let name = suffix();
    let (stream_name, prefix) = (format!("IDEMQ_{name}"), format!("idemq.{name}"));
    let js = jetstream().await;
    let _stream = test_stream(&js, &stream_name, &prefix, Duration::from_secs(60)).await;
    // The dead letters go to a stream of their own (in one stream, the shared
    // `Nats-Msg-Id` would make the server drop them as duplicates of the originals).
    let dlq_subject = format!("idemqdlq.{name}.dead");
    let _dlq = test_stream(
        &js,
        &format!("IDEMQ_DLQ_{name}"),
        &format!("idemqdlq.{name}"),
        Duration::from_secs(60),
    )
    .await;

    publish_all(&js, &format!("{prefix}.work"), 0..5, true).await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("kind", "poison");
    publish_with_headers(
        &js,
        format!("{prefix}.work"),
        "poison",
        headers.clone(),
        "p".into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    headers.insert("kind", "malformed");
    publish_with_headers(
        &js,
        format!("{prefix}.work"),
        "malformed",
        headers,
        "m".into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    let dedup = Deduplicator::new(
        Arc::new(MemoryStore::new()),
        Scope::new(stream_name.clone()),
    );
    let adapter = JetStreamConsumer::new(
        dedup.clone(),
        JetStreamOptions {
            retry: fast_retries(),
            dead_letter_subject: Some(dlq_subject.clone()),
            ..JetStreamOptions::default()
        },
    );
    let consumer = js
        .get_stream(&stream_name)
        .await
        .unwrap()
        .get_or_create_consumer(
            "work",
            pull::Config {
                durable_name: Some("work".into()),
                filter_subject: format!("{prefix}.work"),
                ack_wait: Duration::from_secs(2),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut poison_deliveries = Vec::new();
    let mut settlements = Vec::new();
    let finished = tokio::time::timeout(PATIENCE, async {
        while !(settlements.len() >= 9 && drained(&consumer).await) {
            let Ok(Some(message)) =
                tokio::time::timeout(Duration::from_millis(500), messages.next()).await
            else {
                continue;
            };
            let message = message.unwrap();
            let kind = message
                .headers
                .as_ref()
                .and_then(|h| h.get("kind"))
                .map(|v| v.as_str().to_owned());
            let handled = adapter
                .handle(&message, |_, _| async move {
                    match kind.as_deref() {
                        Some("poison") => {
                            Err(HandlerError::transient("the poison fails every time"))
                        }
                        Some("malformed") => Err(HandlerError::permanent("cannot parse")),
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
    assert_eq!(poison_deliveries, vec![1, 2, 3]);
    let dead: Vec<_> = settlements
        .iter()
        .filter(|(_, s)| matches!(s, Settlement::DeadLetter { .. }))
        .collect();
    assert_eq!(dead.len(), 2, "{settlements:?}");

    let letter = dedup
        .dead_letter_record("poison")
        .await
        .unwrap()
        .expect("dead letter");
    assert_eq!(letter.reason, DeadLetterReason::MaxDeliveries);
    assert_eq!(letter.deliveries, 3);
    assert_eq!(letter.payload, "p");
    assert!(letter.error.unwrap().contains("fails every time"));
    assert!(letter.origin.contains(&stream_name));
    let letter = dedup
        .dead_letter_record("malformed")
        .await
        .unwrap()
        .expect("dead letter");
    assert_eq!(
        (letter.reason, letter.deliveries),
        (DeadLetterReason::Permanent, 1)
    );

    // Both were also published to the dead-letter subject.
    let stream = js.get_stream(format!("IDEMQ_DLQ_{name}")).await.unwrap();
    assert_eq!(stream.get_info().await.unwrap().state.messages, 2);
    let last = stream
        .get_last_raw_message_by_subject(&dlq_subject)
        .await
        .unwrap();
    let headers = last.headers;
    assert!(["poison", "malformed"].contains(&headers.get("Nats-Msg-Id").unwrap().as_str()));
    assert!(headers.get("Idem-Dead-Letter-Reason").is_some());

    // A later duplicate of the dead-lettered message is terminated without running.
    let Outcome::Duplicate(replay) = dedup.process("poison", || async { Ok("") }).await.unwrap()
    else {
        panic!("expected a duplicate")
    };
    assert_eq!(replay.failure(), Some(DeadLetterReason::MaxDeliveries));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_handler_sends_progress_and_is_not_redelivered() {
    let name = suffix();
    let (stream_name, prefix) = (format!("IDEMQ_{name}"), format!("idemq.{name}"));
    let js = jetstream().await;
    let _stream = test_stream(&js, &stream_name, &prefix, Duration::from_secs(60)).await;
    publish_all(&js, &format!("{prefix}.slow"), 0..1, true).await;
    let consumer = durable(&js, &stream_name, "slow", Duration::from_secs(1)).await;
    let options = DedupOptions {
        lease: Duration::from_millis(600),
        ..DedupOptions::default()
    };
    let dedup = Deduplicator::with_options(
        Arc::new(MemoryStore::new()),
        Scope::new(stream_name.clone()),
        options,
    )
    .unwrap();
    let adapter = JetStreamConsumer::new(
        dedup,
        JetStreamOptions {
            progress_every: Some(Duration::from_millis(300)),
            ..JetStreamOptions::default()
        },
    );
    let mut messages = consumer.messages().await.unwrap();
    let message = tokio::time::timeout(PATIENCE, messages.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // Three times AckWait, and five leases.
    let handled = adapter
        .handle(&message, |_, _| async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Ok("slow but done")
        })
        .await
        .unwrap();
    assert!(matches!(handled.outcome, Ok(Outcome::Processed { .. })));
    assert_eq!(handled.settlement, Settlement::Ack);
    // No redelivery happened meanwhile, and none follows.
    assert!(
        tokio::time::timeout(Duration::from_millis(1_500), messages.next())
            .await
            .is_err()
    );
    let info = consumer.get_info().await.unwrap();
    assert_eq!((info.num_redelivered, info.num_ack_pending), (0, 0));
}

async fn next_message(messages: &mut pull::Stream) -> jetstream::Message {
    tokio::time::timeout(PATIENCE, messages.next())
        .await
        .expect("a message in time")
        .expect("stream open")
        .expect("message")
}

/// Publishes `payload` to `subject` without `Nats-Msg-Id`.
async fn publish_without_id(js: &Context, subject: &str, payload: &'static str) {
    js.publish(subject.to_owned(), payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

// Fails with the old fallback `seq:<n>`: a recreated stream's first message, and another
// stream's first message on the same scope, were acked as duplicates and never handled;
// and fails when every id-less message is keyed alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_without_an_id_are_keyed_by_stream_and_incarnation() {
    let name = suffix();
    let (stream_name, prefix) = (format!("IDEMQ_NOID_{name}"), format!("idemq.noid.{name}"));
    let (other_name, other_prefix) = (format!("IDEMQ_NOID2_{name}"), format!("idemq.noid2.{name}"));
    let js = jetstream().await;
    let dedup = Deduplicator::new(Arc::new(MemoryStore::new()), Scope::new("shared"));
    let adapter = JetStreamConsumer::new(dedup.clone(), JetStreamOptions::default());
    let mut ids = Vec::new();

    let handle_one = async |stream: &str, prefix: &str, payload: &'static str| {
        publish_without_id(&js, &format!("{prefix}.x"), payload).await;
        let consumer = durable(&js, stream, "c", Duration::from_secs(5)).await;
        let mut messages = consumer.messages().await.unwrap();
        let message = next_message(&mut messages).await;
        assert_eq!(message.info().unwrap().stream_sequence, 1);
        let handled = adapter
            .handle(&message, |message, context| async move {
                assert_eq!(context.attempt(), 1);
                Ok::<_, HandlerError>(message.payload.clone())
            })
            .await
            .unwrap();
        assert!(
            matches!(handled.outcome, Ok(Outcome::Processed { .. })),
            "{payload}: {handled:?}"
        );
        handled.id
    };

    {
        let _stream = test_stream(&js, &stream_name, &prefix, Duration::from_secs(60)).await;
        ids.push(handle_one(&stream_name, &prefix, "first incarnation").await);
    }
    // The guard deleted the stream; the same name again, sequence 1 again.
    {
        let _stream = test_stream(&js, &stream_name, &prefix, Duration::from_secs(60)).await;
        ids.push(handle_one(&stream_name, &prefix, "second incarnation").await);
    }
    {
        let _stream = test_stream(&js, &other_name, &other_prefix, Duration::from_secs(60)).await;
        ids.push(handle_one(&other_name, &other_prefix, "another stream").await);
    }
    assert!(ids.iter().all(|id| id.starts_with("js:")), "{ids:?}");
    assert!(
        ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2],
        "{ids:?}"
    );
    assert!(ids[2].contains(&other_name));
}

// `MissingId::DeadLetter`: refused without running, with a dead letter of its own each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_without_an_id_can_be_refused_each_with_its_own_dead_letter() {
    let name = suffix();
    let (stream_name, prefix) = (format!("IDEMQ_{name}"), format!("idemq.{name}"));
    let js = jetstream().await;
    let _stream = test_stream(&js, &stream_name, &prefix, Duration::from_secs(60)).await;
    publish_without_id(&js, &format!("{prefix}.x"), "one").await;
    publish_without_id(&js, &format!("{prefix}.x"), "two").await;
    let dedup = Deduplicator::new(
        Arc::new(MemoryStore::new()),
        Scope::new(stream_name.clone()),
    );
    let adapter = JetStreamConsumer::new(
        dedup.clone(),
        JetStreamOptions {
            missing_id: MissingId::DeadLetter,
            ..JetStreamOptions::default()
        },
    );
    let consumer = durable(&js, &stream_name, "c", Duration::from_secs(5)).await;
    let mut messages = consumer.messages().await.unwrap();
    let mut ids = Vec::new();
    for payload in ["one", "two"] {
        let message = next_message(&mut messages).await;
        let handled = adapter
            .handle(&message, |_, _| async {
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
        let letter = dedup
            .dead_letter_record(&handled.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(letter.payload, payload);
        assert!(letter.error.unwrap().contains("no id"));
        ids.push(handled.id);
    }
    assert_ne!(ids[0], ids[1]);
    assert!(eventually(PATIENCE, || drained(&consumer)).await);
}

// Fails when the server's `delivered` decides the limit: four `-NAK`s while another consumer
// held the message would leave the handler no attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn naks_while_another_consumer_holds_the_message_use_no_attempts() {
    let name = suffix();
    let (stream_name, prefix) = (format!("IDEMQ_{name}"), format!("idemq.{name}"));
    let js = jetstream().await;
    let _stream = test_stream(&js, &stream_name, &prefix, Duration::from_secs(60)).await;
    publish_all(&js, &format!("{prefix}.x"), 0..1, true).await;
    let dedup = Deduplicator::new(
        Arc::new(MemoryStore::new()),
        Scope::new(stream_name.clone()),
    );
    let Claim::Acquired(elsewhere) = dedup.claim("m-0", None).await.unwrap() else {
        panic!("claimed")
    };
    let adapter = JetStreamConsumer::new(
        dedup.clone(),
        JetStreamOptions {
            retry: RetryPolicy {
                max_attempts: Some(2),
                ..fast_retries()
            },
            ..JetStreamOptions::default()
        },
    );
    let consumer = durable(&js, &stream_name, "c", Duration::from_secs(5)).await;
    let mut messages = consumer.messages().await.unwrap();
    for _ in 0..4 {
        let message = next_message(&mut messages).await;
        let handled = adapter
            .handle(&message, |_, _| async { Ok::<_, HandlerError>("never") })
            .await
            .unwrap();
        assert!(
            matches!(handled.settlement, Settlement::Defer { .. }),
            "{handled:?}"
        );
    }
    elsewhere.release().await.unwrap();
    let mut seen = Vec::new();
    loop {
        let message = next_message(&mut messages).await;
        let handled = adapter
            .handle(&message, |_, _| async {
                Err::<Bytes, _>(HandlerError::transient("down"))
            })
            .await
            .unwrap();
        seen.push((handled.attempt, handled.delivered, handled.settlement));
        if matches!(handled.settlement, Settlement::DeadLetter { .. }) {
            break;
        }
    }
    assert_eq!(
        seen.iter().map(|s| s.0).collect::<Vec<_>>(),
        vec![Some(1), Some(2)],
        "{seen:?}"
    );
    assert_eq!(seen[0].1, 5, "the server counted the naks");
    assert_eq!(
        dedup
            .dead_letter_record("m-0")
            .await
            .unwrap()
            .unwrap()
            .deliveries,
        2
    );
}

// A handler that panics is caught: the attempt counts, the claim is released, the message
// is nak'ed and its next attempt runs. Fails when a panic takes the consumer down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_panics_is_caught_counted_and_retried() {
    let name = suffix();
    let (stream_name, prefix) = (format!("IDEMQ_{name}"), format!("idemq.{name}"));
    let js = jetstream().await;
    let _stream = test_stream(&js, &stream_name, &prefix, Duration::from_secs(60)).await;
    publish_all(&js, &format!("{prefix}.x"), 0..1, true).await;
    let dedup = Deduplicator::new(
        Arc::new(MemoryStore::new()),
        Scope::new(stream_name.clone()),
    );
    let adapter = JetStreamConsumer::new(
        dedup.clone(),
        JetStreamOptions {
            retry: fast_retries(),
            ..JetStreamOptions::default()
        },
    );
    let consumer = durable(&js, &stream_name, "c", Duration::from_secs(5)).await;
    let mut messages = consumer.messages().await.unwrap();
    let message = next_message(&mut messages).await;
    let handled = adapter
        .handle(&message, |_, context| async move {
            if context.attempt() == 1 {
                panic!("bug on attempt {}", context.attempt());
            }
            Ok::<_, HandlerError>("fine")
        })
        .await
        .unwrap();
    match &handled.outcome {
        Ok(Outcome::Panicked { error, released }) => {
            assert!(error.to_string().contains("bug on attempt 1"), "{error}");
            assert!(released);
        }
        other => panic!("expected a caught panic, got {other:?}"),
    }
    assert!(matches!(handled.settlement, Settlement::Retry { .. }));
    assert_eq!(dedup.failed_attempts("m-0").await.unwrap(), 1);

    let message = next_message(&mut messages).await;
    let handled = adapter
        .handle(&message, |_, context| async move {
            assert_eq!(context.attempt(), 2);
            Ok::<_, HandlerError>("fine")
        })
        .await
        .unwrap();
    assert!(matches!(handled.outcome, Ok(Outcome::Processed { .. })));
    assert_eq!(handled.settlement, Settlement::Ack);
    assert!(eventually(PATIENCE, || drained(&consumer)).await);
}

// A store that cannot be reached: nothing runs, nothing is acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_be_reached_naks_and_runs_nothing() {
    let name = suffix();
    let (stream_name, prefix) = (format!("IDEMQ_{name}"), format!("idemq.{name}"));
    let js = jetstream().await;
    let _stream = test_stream(&js, &stream_name, &prefix, Duration::from_secs(60)).await;
    publish_all(&js, &format!("{prefix}.x"), 0..1, true).await;
    let adapter = JetStreamConsumer::new(
        Deduplicator::new(FailingStore::default(), Scope::new(stream_name.clone())),
        JetStreamOptions {
            retry: fast_retries(),
            ..JetStreamOptions::default()
        },
    );
    let consumer = durable(&js, &stream_name, "c", Duration::from_secs(5)).await;
    let mut messages = consumer.messages().await.unwrap();
    for delivered in 1..=3 {
        let message = next_message(&mut messages).await;
        let handled = adapter
            .handle(&message, |_, _| async {
                panic!("must not run without a claim");
                #[allow(unreachable_code)]
                Ok::<_, HandlerError>("")
            })
            .await
            .unwrap();
        assert_eq!(handled.delivered, delivered);
        assert!(
            matches!(handled.settlement, Settlement::Defer { .. }),
            "{handled:?}"
        );
    }
    let info = consumer.get_info().await.unwrap();
    assert_eq!(info.num_ack_pending as u64 + info.num_pending, 1);
}

// The cancellation is relayed from a task of its own: a handler that blocks its thread
// (polling `is_cancelled`) still learns that its claim was taken over. Fails when the lost
// signal reaches the handler only through its own future.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_blocks_its_thread_still_sees_its_claim_lost() {
    let shared = Arc::new(MemoryStore::new());
    let faulty = Arc::new(idem_core::testing::FaultyStore::new(Arc::clone(&shared)));
    let options = DedupOptions {
        lease: Duration::from_millis(300),
        store_timeout: Duration::from_millis(50),
        complete_for: Duration::from_millis(200),
        ..DedupOptions::default()
    };
    let scope = Scope::new(format!("blocking-{}", suffix()));
    let a =
        Deduplicator::with_options(Arc::clone(&faulty), scope.clone(), options.clone()).unwrap();
    let b = Deduplicator::with_options(shared, scope, options).unwrap();
    let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The handler blocks until told, or until the test gives up on it: measured from the
    // takeover, not from the handler's start, so a slow start cannot pass for a lost signal.
    let give_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let running = {
        let (faulty, started, give_up) = (
            Arc::clone(&faulty),
            Arc::clone(&started),
            Arc::clone(&give_up),
        );
        tokio::spawn(async move {
            a.process_in_context("k", None, Default::default(), |context| async move {
                faulty.stall_everything(true);
                started.store(true, Ordering::SeqCst);
                // Blocking the way tokio asks for: a worker blocked without `block_in_place`
                // also stops tokio's timers and I/O now and then (~1 run in 100 with two
                // workers), renewals included, which no task of idem's can get around.
                tokio::task::block_in_place(|| {
                    while !context.is_cancelled() && !give_up.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                });
                Ok::<_, HandlerError>(if context.is_cancelled() {
                    "cancelled"
                } else {
                    "not told"
                })
            })
            .await
        })
    };
    assert!(eventually(PATIENCE, || async { started.load(Ordering::SeqCst) }).await);
    let began = std::time::Instant::now();
    let taken = eventually(PATIENCE, || async {
        match b.claim("k", None).await {
            Ok(Claim::Acquired(held)) => held.complete("b").await.is_ok(),
            _ => false,
        }
    })
    .await;
    assert!(taken, "B takes the message over once A's lease ended");
    let taken_after = began.elapsed();
    faulty.stall_everything(false);
    let told = eventually(PATIENCE, || async { running.is_finished() }).await;
    give_up.store(true, Ordering::SeqCst);
    let outcome = tokio::time::timeout(PATIENCE, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        told && matches!(&outcome, Outcome::LeaseLost { result: Ok(output) } if output == "cancelled"),
        "B took over {taken_after:?} after A's handler started; A's handler was told within \
         {PATIENCE:?} after that: {told}; {outcome:?}"
    );
}
