//! Messages per second through each broker adapter, without deduplication and with it on
//! the memory, redb and Redis stores; printed as a Markdown table with ratios.
//!
//! ```sh
//! cargo bench -p idem-queue --bench consumers                     # 2,000 messages per run
//! BENCH_MESSAGES=10000 cargo bench -p idem-queue --bench consumers
//! ```
//!
//! Needs NATS (JetStream) on `NATS_URL`, RabbitMQ on `AMQP_URL` and Redis on `REDIS_URL`
//! (the local defaults otherwise). Every run gets a fresh stream or queue, filled before
//! the clock starts; the clock runs from the first delivery until the last message is
//! acknowledged. The handler does nothing, so the figures are the overhead of
//! deduplication itself: a claim and a completion per message, and the ack.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use idem_core::{MemoryStore, Scope, Store};
use idem_queue::jetstream::{JetStreamConsumer, JetStreamOptions, publish_with_headers};
use idem_queue::rabbitmq::{Publisher, RabbitConsumer, RabbitOptions};
use idem_queue::{Deduplicator, HandlerError, Settlement};
use idem_redb::RedbStore;
use idem_redis::{RedisOptions, RedisStore};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::protocol::BasicProperties;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    NoDedup,
    Memory,
    Redb,
    Redis,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::NoDedup => "none (ack only)",
            Self::Memory => "memory",
            Self::Redb => "redb",
            Self::Redis => "redis",
        }
    }
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn suffix() -> String {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(Instant::now().elapsed().as_nanos() ^ u128::from(std::process::id()));
    format!("{:010x}", hasher.finish() & 0xff_ffff_ffff)
}

/// The stores under test, made fresh per run; the guard keeps temporary files alive.
enum Stores {
    Memory(Arc<MemoryStore>),
    // The directory lives as long as the store in it.
    Redb(Arc<RedbStore>, #[allow(dead_code)] tempfile::TempDir),
    Redis(Arc<RedisStore>, String),
}

async fn store_for(mode: Mode) -> Result<Option<Stores>> {
    Ok(match mode {
        Mode::NoDedup => None,
        Mode::Memory => Some(Stores::Memory(Arc::new(MemoryStore::new()))),
        Mode::Redb => {
            let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))?;
            Some(Stores::Redb(
                Arc::new(RedbStore::open(dir.path().join("b.redb"))?),
                dir,
            ))
        }
        Mode::Redis => {
            let prefix = format!("idemq-bench-{}", suffix());
            let options = RedisOptions {
                prefix: prefix.clone(),
                ..RedisOptions::default()
            };
            let url = env("REDIS_URL", "redis://127.0.0.1:6379");
            let store = RedisStore::connect_with(&url, options).await?;
            Some(Stores::Redis(Arc::new(store), prefix))
        }
    })
}

fn dedup<S: Store>(store: S, scope: &str) -> Deduplicator<S> {
    // Short retention, so Redis forgets the keys by itself should clean-up not happen.
    let options = idem_queue::DedupOptions {
        retention: Duration::from_secs(300),
        ..Default::default()
    };
    Deduplicator::with_options(store, Scope::new(scope), options).expect("valid options")
}

async fn jetstream_run(n: usize, concurrency: usize, mode: Mode) -> Result<f64> {
    let url = env("NATS_URL", "127.0.0.1:4222");
    let js = jetstream::new(async_nats::connect(&url).await?);
    let name = format!("IDEMQ_BENCH_{}", suffix());
    let subject = format!("idemq-bench.{name}");
    js.create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![subject.clone()],
        storage: stream::StorageType::Memory,
        ..Default::default()
    })
    .await?;
    let result = async {
        // Acks are awaited in chunks: the client holds an in-flight permit per ack.
        let mut acks = Vec::with_capacity(500);
        for i in 0..n {
            let payload = Bytes::from(format!("message {i}"));
            let id = format!("m-{i}");
            acks.push(
                publish_with_headers(&js, subject.clone(), &id, Default::default(), payload)
                    .await?,
            );
            if acks.len() == 500 || i + 1 == n {
                for ack in acks.drain(..) {
                    ack.await?;
                }
            }
        }
        let consumer = js
            .get_stream(&name)
            .await?
            .create_consumer(pull::Config {
                durable_name: Some("bench".into()),
                max_ack_pending: 100_000,
                ..Default::default()
            })
            .await?;
        let messages = consumer.messages().await?;
        let done = Arc::new(AtomicU64::new(0));
        let store = store_for(mode).await?;
        let started = Instant::now();
        let limit = n as u64;
        macro_rules! drive {
            ($handle:expr) => {{
                let handle = &$handle;
                let work = messages
                    .take(n)
                    .for_each_concurrent(concurrency, |message| {
                        let done = &done;
                        async move {
                            let message = message.expect("message");
                            handle(message).await;
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                tokio::time::timeout(Duration::from_secs(120), work).await?;
            }};
        }
        match &store {
            None => drive!(|message: jetstream::Message| async move {
                message.ack().await.expect("ack");
            }),
            Some(Stores::Memory(s)) => {
                let adapter = JetStreamConsumer::new(
                    dedup(Arc::clone(s), &name),
                    JetStreamOptions::default(),
                );
                drive!(|message: jetstream::Message| {
                    let adapter = &adapter;
                    async move {
                        settle_ok(
                            adapter
                                .handle(&message, |_, _| async {
                                    Ok::<_, HandlerError>(Bytes::new())
                                })
                                .await
                                .expect("handle")
                                .settlement,
                        )
                    }
                })
            }
            Some(Stores::Redb(s, _)) => {
                let adapter = JetStreamConsumer::new(
                    dedup(Arc::clone(s), &name),
                    JetStreamOptions::default(),
                );
                drive!(|message: jetstream::Message| {
                    let adapter = &adapter;
                    async move {
                        settle_ok(
                            adapter
                                .handle(&message, |_, _| async {
                                    Ok::<_, HandlerError>(Bytes::new())
                                })
                                .await
                                .expect("handle")
                                .settlement,
                        )
                    }
                })
            }
            Some(Stores::Redis(s, _)) => {
                let adapter = JetStreamConsumer::new(
                    dedup(Arc::clone(s), &name),
                    JetStreamOptions::default(),
                );
                drive!(|message: jetstream::Message| {
                    let adapter = &adapter;
                    async move {
                        settle_ok(
                            adapter
                                .handle(&message, |_, _| async {
                                    Ok::<_, HandlerError>(Bytes::new())
                                })
                                .await
                                .expect("handle")
                                .settlement,
                        )
                    }
                })
            }
        }
        let elapsed = started.elapsed();
        clean(store).await?;
        assert_eq!(done.load(Ordering::Relaxed), limit);
        Ok::<_, Box<dyn std::error::Error>>(limit as f64 / elapsed.as_secs_f64())
    }
    .await;
    js.delete_stream(&name).await?;
    result
}

/// Deletes a Redis run's keys (other stores go away with their value or directory).
async fn clean(store: Option<Stores>) -> Result<()> {
    use idem_redis::fred::interfaces::{ClientLike, KeysInterface};
    use idem_redis::fred::prelude::{Builder, Config};

    let Some(Stores::Redis(_, prefix)) = store else {
        return Ok(());
    };
    let client = Builder::from_config(Config::from_url(&env(
        "REDIS_URL",
        "redis://127.0.0.1:6379",
    ))?)
    .build()?;
    client.init().await?;
    let mut cursor = "0".to_owned();
    loop {
        let (next, keys): (String, Vec<String>) = client
            .scan_page(cursor, format!("{prefix}:*"), Some(1000), None)
            .await?;
        if !keys.is_empty() {
            client.del::<i64, _>(keys).await?;
        }
        if next == "0" {
            break;
        }
        cursor = next;
    }
    client.quit().await?;
    Ok(())
}

fn settle_ok(settlement: Settlement) {
    assert_eq!(
        settlement,
        Settlement::Ack,
        "every benchmark message is new and succeeds"
    );
}

async fn rabbitmq_run(n: usize, concurrency: usize, mode: Mode) -> Result<f64> {
    let url = env("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let connection = Connection::connect(&url, ConnectionProperties::default()).await?;
    let queue = format!("idemq-bench-{}", suffix());
    let publisher = Publisher::new(connection.create_channel().await?).await?;
    publisher
        .channel()
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let result = async {
        futures_util::stream::iter(0..n)
            .for_each_concurrent(128, |i| {
                let (publisher, queue) = (&publisher, &queue);
                async move {
                    publisher
                        .publish(
                            "",
                            queue,
                            &format!("m-{i}"),
                            format!("message {i}").as_bytes(),
                            BasicProperties::default(),
                        )
                        .await
                        .expect("publish");
                }
            })
            .await;
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(
                u16::try_from(concurrency * 2).unwrap_or(u16::MAX),
                BasicQosOptions::default(),
            )
            .await?;
        let deliveries = channel
            .basic_consume(
                queue.as_str().into(),
                "bench".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let done = Arc::new(AtomicU64::new(0));
        let store = store_for(mode).await?;
        let started = Instant::now();
        macro_rules! drive {
            ($handle:expr) => {{
                let handle = &$handle;
                let work = deliveries
                    .take(n)
                    .for_each_concurrent(concurrency, |delivery| {
                        let done = &done;
                        async move {
                            let delivery = delivery.expect("delivery");
                            handle(delivery).await;
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                tokio::time::timeout(Duration::from_secs(120), work).await?;
            }};
        }
        match &store {
            None => drive!(|delivery: lapin::message::Delivery| async move {
                delivery.ack(BasicAckOptions::default()).await.expect("ack");
            }),
            Some(Stores::Memory(s)) => {
                let adapter =
                    RabbitConsumer::new(dedup(Arc::clone(s), &queue), RabbitOptions::default());
                drive!(|delivery: lapin::message::Delivery| {
                    let adapter = &adapter;
                    async move {
                        settle_ok(
                            adapter
                                .handle(&delivery, |_, _| async {
                                    Ok::<_, HandlerError>(Bytes::new())
                                })
                                .await
                                .expect("handle")
                                .settlement,
                        )
                    }
                })
            }
            Some(Stores::Redb(s, _)) => {
                let adapter =
                    RabbitConsumer::new(dedup(Arc::clone(s), &queue), RabbitOptions::default());
                drive!(|delivery: lapin::message::Delivery| {
                    let adapter = &adapter;
                    async move {
                        settle_ok(
                            adapter
                                .handle(&delivery, |_, _| async {
                                    Ok::<_, HandlerError>(Bytes::new())
                                })
                                .await
                                .expect("handle")
                                .settlement,
                        )
                    }
                })
            }
            Some(Stores::Redis(s, _)) => {
                let adapter =
                    RabbitConsumer::new(dedup(Arc::clone(s), &queue), RabbitOptions::default());
                drive!(|delivery: lapin::message::Delivery| {
                    let adapter = &adapter;
                    async move {
                        settle_ok(
                            adapter
                                .handle(&delivery, |_, _| async {
                                    Ok::<_, HandlerError>(Bytes::new())
                                })
                                .await
                                .expect("handle")
                                .settlement,
                        )
                    }
                })
            }
        }
        let elapsed = started.elapsed();
        clean(store).await?;
        assert_eq!(done.load(Ordering::Relaxed), n as u64);
        Ok::<_, Box<dyn std::error::Error>>(n as f64 / elapsed.as_secs_f64())
    }
    .await;
    let channel = connection.create_channel().await?;
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    connection.close(200, "done".into()).await?;
    result
}

fn rate(per_second: f64) -> String {
    if per_second >= 1_000.0 {
        format!("{:.1} k/s", per_second / 1_000.0)
    } else {
        format!("{per_second:.0} /s")
    }
}

fn main() -> Result<()> {
    // `cargo test --benches` runs bench targets with `--test`-like flags and no servers
    // need be up: only `cargo bench` (which passes `--bench`) measures.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("consumers: run with `cargo bench -p idem-queue --bench consumers`");
        return Ok(());
    }
    let n: usize = env("BENCH_MESSAGES", "2000").parse()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        println!("{n} messages per run, empty handler\n");
        println!("| broker | dedup store | consumer concurrency | messages/s | ÷ no dedup |");
        println!("|---|---|---:|---:|---:|");
        for broker in ["JetStream", "RabbitMQ"] {
            for concurrency in [1, 32] {
                let mut baseline = None;
                for mode in [Mode::NoDedup, Mode::Memory, Mode::Redb, Mode::Redis] {
                    let per_second = match broker {
                        "JetStream" => jetstream_run(n, concurrency, mode).await?,
                        _ => rabbitmq_run(n, concurrency, mode).await?,
                    };
                    let base = *baseline.get_or_insert(per_second);
                    println!(
                        "| {broker} | {} | {concurrency} | {} | {:.2}× |",
                        mode.name(),
                        rate(per_second),
                        per_second / base
                    );
                }
            }
        }
        Ok(())
    })
}
