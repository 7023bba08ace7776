//! The consumer runners against real NATS JetStream and RabbitMQ: drain, bounded
//! concurrency, reconnection, retry delays. Effects are counted per message id.
#![cfg(all(feature = "jetstream", feature = "rabbitmq"))]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::{self, Context, stream};
use bytes::Bytes;
use idem_core::{MemoryStore, Scope};
use idem_queue::jetstream::{JetStreamConsumer, JetStreamOptions};
use idem_queue::rabbitmq::{Publisher, RabbitConsumer, RabbitOptions};
use idem_queue::runner::{self, BoxError, RunOptions, RunReport};
use idem_queue::{Deduplicator, HandlerError, RetryPolicy};
use idem_testkit::FaultProxy;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::protocol::BasicProperties;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tokio::sync::oneshot;

use common::{Cleanup, amqp_url, eventually, nats_url, suffix};

const PATIENCE: Duration = Duration::from_secs(20);

/// Effects per message id, and how many handlers ran at once at most.
#[derive(Default)]
struct Counter {
    effects: Mutex<HashMap<String, u32>>,
    started: AtomicUsize,
    running: AtomicUsize,
    most: AtomicUsize,
}

impl Counter {
    /// Runs `work` as one handler: counted as running meanwhile, its effect recorded after.
    async fn handle(&self, id: String, work: Duration) {
        self.started.fetch_add(1, Ordering::SeqCst);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(work).await;
        *self.effects.lock().unwrap().entry(id).or_insert(0) += 1;
        self.running.fetch_sub(1, Ordering::SeqCst);
    }

    fn done(&self) -> usize {
        self.effects.lock().unwrap().len()
    }

    fn total(&self) -> u32 {
        self.effects.lock().unwrap().values().sum()
    }

    fn duplicates(&self) -> usize {
        self.effects
            .lock()
            .unwrap()
            .values()
            .filter(|&&n| n > 1)
            .count()
    }
}

// ---------------------------------------------------------------- JetStream

async fn js_at(url: &str) -> Context {
    jetstream::new(
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(url)
            .await
            .expect("connect to NATS"),
    )
}

/// A memory stream on `<name>.>` with a durable pull consumer `c`; deleted on drop.
async fn js_stream(js: &Context, name: &str, ack_wait: Duration) -> Cleanup {
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
        subjects: vec![format!("{name}.>")],
        storage: stream::StorageType::Memory,
        ..Default::default()
    })
    .await
    .expect("create the stream");
    js.get_stream(name)
        .await
        .unwrap()
        .get_or_create_consumer(
            "c",
            pull::Config {
                durable_name: Some("c".to_owned()),
                ack_policy: AckPolicy::Explicit,
                ack_wait,
                max_deliver: -1,
                ..Default::default()
            },
        )
        .await
        .expect("create the consumer");
    guard
}

async fn js_publish(js: &Context, name: &str, ids: impl IntoIterator<Item = String>) {
    for id in ids {
        idem_queue::jetstream::publish(js, format!("{name}.m"), &id, Bytes::from(id.clone()))
            .await
            .expect("publish");
    }
}

fn js_connect(
    js: Context,
    name: String,
) -> impl FnMut() -> futures_util::future::BoxFuture<'static, Result<PullConsumer, BoxError>> + Send
{
    move || {
        let (js, name) = (js.clone(), name.clone());
        Box::pin(async move {
            let consumer: PullConsumer = js.get_stream(&name).await?.get_consumer("c").await?;
            Ok(consumer)
        })
    }
}

fn msg_id(message: &async_nats::jetstream::Message) -> String {
    String::from_utf8_lossy(&message.payload).into_owned()
}

fn js_adapter(name: &str, retry: RetryPolicy) -> JetStreamConsumer<MemoryStore> {
    JetStreamConsumer::new(
        Deduplicator::new(MemoryStore::new(), Scope::new(name)),
        JetStreamOptions {
            retry,
            ..JetStreamOptions::default()
        },
    )
}

type Running = tokio::task::JoinHandle<RunReport>;

fn js_run(
    name: &str,
    js: Context,
    adapter: JetStreamConsumer<MemoryStore>,
    options: RunOptions,
    counter: Arc<Counter>,
    work: Duration,
    fail_first: Option<&'static str>,
) -> (oneshot::Sender<()>, Running) {
    let (stop, stopped) = oneshot::channel::<()>();
    let connect = js_connect(js, name.to_owned());
    let task = tokio::spawn(runner::jetstream::run(
        adapter,
        connect,
        options,
        async move {
            let _ = stopped.await;
        },
        move |message, context| {
            let counter = Arc::clone(&counter);
            async move {
                let id = msg_id(&message);
                assert_eq!(context.id(), id);
                if Some(id.as_str()) == fail_first && context.attempt() == 1 {
                    return Err(HandlerError::transient("first delivery fails"));
                }
                counter.handle(id, work).await;
                Ok::<_, HandlerError>("done")
            }
        },
    ));
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jetstream_drain_finishes_and_acks_in_flight_handlers_within_the_bound() {
    let name = format!("IDEMQ_RUN_DRAIN_{}", suffix());
    let js = js_at(&nats_url()).await;
    let _guard = js_stream(&js, &name, Duration::from_secs(3)).await;
    js_publish(&js, &name, (0..40).map(|n| format!("m-{n}"))).await;

    let counter = Arc::new(Counter::default());
    let (stop, task) = js_run(
        &name,
        js.clone(),
        js_adapter(&name, RetryPolicy::default()),
        RunOptions::with_concurrency(4),
        Arc::clone(&counter),
        Duration::from_millis(400),
        None,
    );
    assert!(
        eventually(PATIENCE, || async {
            counter.started.load(Ordering::SeqCst) >= 6
        })
        .await
    );
    stop.send(()).unwrap();
    let report = tokio::time::timeout(PATIENCE, task).await.unwrap().unwrap();

    // Every handler that started finished and was acked before `run` returned.
    let started = counter.started.load(Ordering::SeqCst);
    assert_eq!(counter.total() as usize, started, "{report:?}");
    assert_eq!(report.acked as usize, started, "{report:?}");
    assert_eq!(report.abandoned, 0);
    assert!(started < 40, "it stopped fetching: {started} started");
    assert!(
        counter.most.load(Ordering::SeqCst) <= 4,
        "bounded concurrency"
    );
    assert_eq!(counter.most.load(Ordering::SeqCst), 4, "and used");
    // A second run, with a store of its own (so a redelivery of an acked message would
    // run again and show as a duplicate), finishes the rest, each message once.
    let (stop, task) = js_run(
        &name,
        js.clone(),
        js_adapter(&name, RetryPolicy::default()),
        RunOptions::with_concurrency(8),
        Arc::clone(&counter),
        Duration::from_millis(10),
        None,
    );
    assert!(eventually(PATIENCE, || async { counter.done() == 40 }).await);
    stop.send(()).unwrap();
    task.await.unwrap();
    assert_eq!(counter.duplicates(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jetstream_a_retry_delay_does_not_block_other_messages() {
    let name = format!("IDEMQ_RUN_DELAY_{}", suffix());
    let js = js_at(&nats_url()).await;
    let _guard = js_stream(&js, &name, Duration::from_secs(30)).await;
    let retry = RetryPolicy {
        backoff_initial: Duration::from_secs(3),
        ..RetryPolicy::default()
    };
    let counter = Arc::new(Counter::default());
    let (stop, task) = js_run(
        &name,
        js.clone(),
        js_adapter(&name, retry),
        RunOptions::with_concurrency(1),
        Arc::clone(&counter),
        Duration::from_millis(10),
        Some("slow"),
    );
    let began = Instant::now();
    js_publish(&js, &name, std::iter::once("slow".to_owned())).await;
    js_publish(&js, &name, (0..10).map(|n| format!("m-{n}"))).await;
    assert!(eventually(PATIENCE, || async { counter.done() == 10 }).await);
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "the others did not wait for the retry: {:?}",
        began.elapsed()
    );
    assert!(eventually(PATIENCE, || async { counter.done() == 11 }).await);
    assert!(
        began.elapsed() >= Duration::from_millis(2_500),
        "the retry waited its delay"
    );
    stop.send(()).unwrap();
    let report = task.await.unwrap();
    assert_eq!((report.acked, report.retried), (11, 1), "{report:?}");
    assert_eq!(counter.duplicates(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jetstream_a_broken_connection_is_reestablished() {
    let name = format!("IDEMQ_RUN_RECONNECT_{}", suffix());
    let direct = js_at(&nats_url()).await;
    let _guard = js_stream(&direct, &name, Duration::from_secs(2)).await;
    let proxy = FaultProxy::start(idem_testkit::host_port(&format!("nats://{}", nats_url()))).await;
    let via_proxy = js_at(&format!("nats://{}", proxy.addr())).await;

    let counter = Arc::new(Counter::default());
    let mut options = RunOptions::with_concurrency(4);
    options.reconnect_initial = Duration::from_millis(50);
    let (stop, task) = js_run(
        &name,
        via_proxy,
        js_adapter(&name, RetryPolicy::default()),
        options,
        Arc::clone(&counter),
        Duration::from_millis(10),
        None,
    );
    js_publish(&direct, &name, (0..10).map(|n| format!("a-{n}"))).await;
    assert!(eventually(PATIENCE, || async { counter.done() == 10 }).await);

    proxy.set(idem_testkit::Fault::Refuse).await;
    js_publish(&direct, &name, (0..10).map(|n| format!("b-{n}"))).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.set(idem_testkit::Fault::Pass).await;
    assert!(
        eventually(Duration::from_secs(40), || async { counter.done() == 20 }).await,
        "handled after the break: {}",
        counter.done()
    );
    stop.send(()).unwrap();
    let report = task.await.unwrap();
    assert!(proxy.connections() >= 2, "the client connected again");
    assert_eq!(counter.duplicates(), 0, "{report:?}");
}

// ---------------------------------------------------------------- RabbitMQ

/// A quorum queue, deleted on drop.
async fn rabbit_queue(queue: &str) -> Cleanup {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    let channel = connection.create_channel().await.unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .expect("declare the queue");
    let _ = connection.close(200, "declared".into()).await;
    let queue = queue.to_owned();
    Cleanup::new(move || async move {
        if let Ok(connection) =
            Connection::connect(&amqp_url(), ConnectionProperties::default()).await
            && let Ok(channel) = connection.create_channel().await
        {
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
            let _ = connection.close(200, "cleaned".into()).await;
        }
    })
}

async fn rabbit_publish(queue: &str, ids: impl IntoIterator<Item = String>) {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let publisher = Publisher::new(connection.create_channel().await.unwrap())
        .await
        .unwrap();
    for id in ids {
        publisher
            .publish("", queue, &id, id.as_bytes(), BasicProperties::default())
            .await
            .expect("publish");
    }
    let _ = connection.close(200, "published".into()).await;
}

fn rabbit_run(
    queue: &str,
    url: String,
    retry: RetryPolicy,
    options: RunOptions,
    counter: Arc<Counter>,
    work: Duration,
    fail_first: Option<&'static str>,
) -> (oneshot::Sender<()>, Running) {
    let adapter = RabbitConsumer::new(
        Deduplicator::new(MemoryStore::new(), Scope::new(queue)),
        RabbitOptions {
            retry,
            ..RabbitOptions::default()
        },
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let queue = queue.to_owned();
    let task = tokio::spawn(async move {
        runner::rabbitmq::run(
            adapter,
            move || {
                let url = url.clone();
                async move {
                    Ok::<_, BoxError>(
                        Connection::connect(&url, ConnectionProperties::default()).await?,
                    )
                }
            },
            &queue,
            "runner-test",
            options,
            async move {
                let _ = stopped.await;
            },
            move |delivery, context| {
                let counter = Arc::clone(&counter);
                async move {
                    let id = String::from_utf8_lossy(&delivery.data).into_owned();
                    assert_eq!(context.id(), id);
                    if Some(id.as_str()) == fail_first && context.attempt() == 1 {
                        return Err(HandlerError::transient("first delivery fails"));
                    }
                    counter.handle(id, work).await;
                    Ok::<_, HandlerError>("done")
                }
            },
        )
        .await
    });
    (stop, task)
}

async fn queue_depth(queue: &str) -> (u32, u32) {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = connection.close(200, "counted".into()).await;
    (declared.message_count(), declared.consumer_count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_drain_finishes_and_acks_in_flight_handlers_within_the_bound() {
    let queue = format!("idemq-run-drain-{}", suffix());
    let _guard = rabbit_queue(&queue).await;
    rabbit_publish(&queue, (0..40).map(|n| format!("m-{n}"))).await;

    let counter = Arc::new(Counter::default());
    let (stop, task) = rabbit_run(
        &queue,
        amqp_url(),
        RetryPolicy::default(),
        RunOptions::with_concurrency(4),
        Arc::clone(&counter),
        Duration::from_millis(400),
        None,
    );
    assert!(
        eventually(PATIENCE, || async {
            counter.started.load(Ordering::SeqCst) >= 6
        })
        .await
    );
    stop.send(()).unwrap();
    let report = tokio::time::timeout(PATIENCE, task).await.unwrap().unwrap();
    let started = counter.started.load(Ordering::SeqCst);
    assert_eq!(counter.total() as usize, started, "{report:?}");
    assert_eq!(report.acked as usize, started, "{report:?}");
    assert!(started < 40);
    assert_eq!(
        counter.most.load(Ordering::SeqCst),
        4,
        "bounded concurrency, used"
    );
    // What was acked is gone; what was prefetched but not handled is back in the queue.
    let remaining = 40 - started as u32;
    assert!(
        eventually(PATIENCE, || async {
            queue_depth(&queue).await == (remaining, 0)
        })
        .await,
        "{:?} != ({remaining}, 0)",
        queue_depth(&queue).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_a_retry_delay_does_not_block_other_messages() {
    let queue = format!("idemq-run-delay-{}", suffix());
    let _guard = rabbit_queue(&queue).await;
    let retry = RetryPolicy {
        backoff_initial: Duration::from_secs(3),
        ..RetryPolicy::default()
    };
    let counter = Arc::new(Counter::default());
    // One handler at a time: the held retry must not take that slot.
    let (stop, task) = rabbit_run(
        &queue,
        amqp_url(),
        retry,
        RunOptions::with_concurrency(1),
        Arc::clone(&counter),
        Duration::from_millis(10),
        Some("slow"),
    );
    let began = Instant::now();
    rabbit_publish(&queue, std::iter::once("slow".to_owned())).await;
    rabbit_publish(&queue, (0..10).map(|n| format!("m-{n}"))).await;
    assert!(eventually(PATIENCE, || async { counter.done() == 10 }).await);
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "the others did not wait for the retry: {:?}",
        began.elapsed()
    );
    assert!(eventually(PATIENCE, || async { counter.done() == 11 }).await);
    assert!(began.elapsed() >= Duration::from_millis(2_500));
    stop.send(()).unwrap();
    let report = task.await.unwrap();
    assert_eq!((report.acked, report.retried), (11, 1), "{report:?}");
    assert_eq!(counter.duplicates(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_a_broken_connection_is_reestablished() {
    let queue = format!("idemq-run-reconnect-{}", suffix());
    let _guard = rabbit_queue(&queue).await;
    let proxy = FaultProxy::start(idem_testkit::host_port(&amqp_url())).await;
    let via_proxy = format!("amqp://guest:guest@{}/%2f", proxy.addr());

    let counter = Arc::new(Counter::default());
    let mut options = RunOptions::with_concurrency(4);
    options.reconnect_initial = Duration::from_millis(50);
    let (stop, task) = rabbit_run(
        &queue,
        via_proxy,
        RetryPolicy::default(),
        options,
        Arc::clone(&counter),
        Duration::from_millis(50),
        None,
    );
    rabbit_publish(&queue, (0..10).map(|n| format!("a-{n}"))).await;
    assert!(eventually(PATIENCE, || async { counter.done() == 10 }).await);

    // Cut while handlers run, refuse for a while, then let it back.
    rabbit_publish(&queue, (0..20).map(|n| format!("b-{n}"))).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.set(idem_testkit::Fault::Refuse).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.set(idem_testkit::Fault::Pass).await;
    assert!(
        eventually(Duration::from_secs(40), || async { counter.done() == 30 }).await,
        "handled after the break: {}",
        counter.done()
    );
    // The second batch can finish before the cut is noticed; messages published after it
    // can only arrive on a new connection, so the runner has reconnected once they are done.
    rabbit_publish(&queue, (0..10).map(|n| format!("c-{n}"))).await;
    assert!(
        eventually(Duration::from_secs(40), || async { counter.done() == 40 }).await,
        "handled after reconnecting: {}",
        counter.done()
    );
    stop.send(()).unwrap();
    let report = task.await.unwrap();
    assert!(report.connects >= 2, "reconnected: {report:?}");
    assert_eq!(counter.duplicates(), 0, "{report:?}");
    assert!(
        eventually(PATIENCE, || async { queue_depth(&queue).await == (0, 0) }).await,
        "everything acked"
    );
}

// ---------------------------------------------------------------- inbox-backed

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_inbox_messages_are_acked_after_their_commit_once() {
    use idem_queue::inbox::Inbox;

    let name = suffix();
    let queue = format!("idemq-run-inbox-{name}");
    let _queue_guard = rabbit_queue(&queue).await;
    let table = format!("idemq_inbox_run_{name}");
    let _tables = common::drop_tables_on_drop(vec![table.clone(), format!("idemq_effects_{name}")]);
    let pool = common::pg_pool().await;
    let effects = Arc::new(common::Effects::create(&pool, &name).await);
    let inbox = Inbox::new(pool).with_table(&table).unwrap();
    inbox.migrate().await.unwrap();

    // Every message (m-3 failing on its first run), then every message again (a producer
    // that re-published).
    rabbit_publish(&queue, (0..10).map(|n| format!("m-{n}"))).await;

    let (stop, stopped) = oneshot::channel::<()>();
    let retry = RetryPolicy {
        backoff_initial: Duration::from_millis(100),
        ..RetryPolicy::default()
    };
    let task = tokio::spawn({
        let (queue, effects) = (queue.clone(), Arc::clone(&effects));
        let failed_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
        async move {
            runner::rabbitmq::run_inbox(
                inbox,
                retry,
                Duration::from_secs(1),
                || async {
                    Ok::<_, BoxError>(
                        Connection::connect(&amqp_url(), ConnectionProperties::default()).await?,
                    )
                },
                &queue,
                "runner-inbox",
                RunOptions::with_concurrency(4),
                async move {
                    let _ = stopped.await;
                },
                move |delivery, tx| {
                    let (effects, failed_once) = (Arc::clone(&effects), Arc::clone(&failed_once));
                    Box::pin(async move {
                        let id = String::from_utf8_lossy(&delivery.data).into_owned();
                        effects
                            .record(&mut *tx, &id, "runner")
                            .await
                            .map_err(HandlerError::transient)?;
                        if id == "m-3" && !failed_once.swap(true, Ordering::SeqCst) {
                            // After its write: the rollback must take the effect with it.
                            return Err(HandlerError::transient("m-3 fails once"));
                        }
                        Ok(())
                    })
                },
            )
            .await
        }
    });
    assert!(eventually(PATIENCE, || async { effects.counts().await.1 == 10 }).await);
    rabbit_publish(&queue, (0..10).map(|n| format!("m-{n}"))).await;
    assert!(eventually(PATIENCE, || async { queue_depth(&queue).await.0 == 0 }).await);
    stop.send(()).unwrap();
    let report = task.await.unwrap();
    // Closed: anything not acked would be back in the queue.
    assert_eq!(queue_depth(&queue).await, (0, 0), "everything acked");
    assert_eq!(effects.counts().await, (10, 10, 0), "{report:?}");
    assert_eq!((report.acked, report.retried), (20, 1), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jetstream_inbox_messages_are_acked_after_their_commit_once() {
    use idem_queue::inbox::Inbox;

    let name = suffix();
    let stream = format!("IDEMQ_RUN_INBOX_{name}");
    let js = js_at(&nats_url()).await;
    let _stream_guard = js_stream(&js, &stream, Duration::from_secs(30)).await;
    let table = format!("idemq_inbox_jsrun_{name}");
    let _tables = common::drop_tables_on_drop(vec![table.clone(), format!("idemq_effects_{name}")]);
    let pool = common::pg_pool().await;
    let effects = Arc::new(common::Effects::create(&pool, &name).await);
    let inbox = Inbox::new(pool).with_table(&table).unwrap();
    inbox.migrate().await.unwrap();

    // Ten messages, each published twice under distinct Nats-Msg-Ids but one order id in
    // the payload (a producer that re-published after the duplicate window), m-3 failing
    // once after its write.
    for round in 0..2 {
        for n in 0..10 {
            idem_queue::jetstream::publish(
                &js,
                format!("{stream}.m"),
                &format!("publication-{round}-{n}"),
                Bytes::from(format!("m-{n}")),
            )
            .await
            .unwrap();
        }
    }
    let (stop, stopped) = oneshot::channel::<()>();
    let retry = RetryPolicy {
        backoff_initial: Duration::from_millis(100),
        ..RetryPolicy::default()
    };
    let task = tokio::spawn({
        let effects = Arc::clone(&effects);
        let failed_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
        runner::jetstream::run_inbox(
            inbox,
            retry,
            None,
            js_connect(js.clone(), stream.clone()),
            RunOptions::with_concurrency(4),
            async move {
                let _ = stopped.await;
            },
            |message| Some(msg_id(message)),
            move |message, tx| {
                let (effects, failed_once) = (Arc::clone(&effects), Arc::clone(&failed_once));
                Box::pin(async move {
                    let id = msg_id(&message);
                    effects
                        .record(&mut *tx, &id, "runner")
                        .await
                        .map_err(HandlerError::transient)?;
                    if id == "m-3" && !failed_once.swap(true, Ordering::SeqCst) {
                        return Err(HandlerError::transient("m-3 fails once"));
                    }
                    Ok(())
                })
            },
        )
    });
    let consumer = js_connect(js.clone(), stream.clone())().await.unwrap();
    assert!(
        eventually(PATIENCE, || async {
            let info = consumer.get_info().await.unwrap();
            info.num_pending == 0 && info.num_ack_pending == 0
        })
        .await,
        "everything acked: {:?}",
        consumer.get_info().await.unwrap()
    );
    stop.send(()).unwrap();
    let report = task.await.unwrap();
    assert_eq!(effects.counts().await, (10, 10, 0), "{report:?}");
    assert_eq!(report.acked, 20, "{report:?}");
    assert!(report.retried >= 1, "{report:?}");
}
