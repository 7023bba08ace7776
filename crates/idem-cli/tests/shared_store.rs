//! Many gateways, one store: several `idem serve` processes sharing Redis (or, later,
//! Postgres) behave as one; and a store outage fails closed, then heals without duplicates.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{ServeProcess, Upstream, client, keyed, send};
use http::StatusCode;
use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

const KEYS: usize = 120;
const CLIENTS: usize = 12;
const LOSS_PERCENT: u64 = 30;

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A prefix of our own, and its keys deleted when the test ends.
struct RedisPrefix(String);

impl RedisPrefix {
    fn new(test: &str) -> Self {
        Self(format!("idem-test-{test}-{}", unique()))
    }
}

impl Drop for RedisPrefix {
    fn drop(&mut self) {
        let script = format!(
            "redis-cli -u {} --scan --pattern '{}:*' | xargs -r redis-cli -u {} del >/dev/null",
            redis_url(),
            self.0,
            redis_url()
        );
        let _ = std::process::Command::new("sh")
            .args(["-c", &script])
            .status();
    }
}

fn unique() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    (u64::from(std::process::id()) << 32) ^ nanos ^ NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A small, seeded pseudo-random sequence (xorshift): which gateway, which answer is lost.
struct Dice(u64);

impl Dice {
    fn roll(&mut self, sides: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % sides
    }
}

/// Every answer a client received (lost or not), per key.
type Answers = Arc<Mutex<HashMap<String, Vec<(StatusCode, Bytes)>>>>;

/// Drives `KEYS` payments through `gateways`: each payment first goes to two random
/// gateways at once (a client that timed out and retried elsewhere while the first was
/// still running), then is retried on random gateways while answers are lost, until one
/// arrives. Returns every answer seen.
async fn storm(gateways: &[String], seed: u64) -> Answers {
    let answers: Answers = Arc::default();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (gateways, answers, next) = (gateways.to_vec(), answers.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let client = client();
            let mut dice = Dice(seed ^ (c as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed) as usize;
                if n >= KEYS {
                    return;
                }
                let key = format!("pay-{n}");
                let body = format!(r#"{{"payment":{n},"cents":{}}}"#, 100 + n);
                let pick =
                    |dice: &mut Dice| gateways[dice.roll(gateways.len() as u64) as usize].clone();
                let (a, b) = (pick(&mut dice), pick(&mut dice));
                let (first, second) = tokio::join!(
                    send(&client, keyed(&format!("{a}/payments"), &key, &body)),
                    send(&client, keyed(&format!("{b}/payments"), &key, &body)),
                );
                let mut got = vec![first, second];
                for _attempt in 0..50 {
                    let kept = got
                        .iter()
                        .any(|answer| answer.status.is_success() && dice.roll(100) >= LOSS_PERCENT);
                    let mut seen = answers.lock().await;
                    let entry = seen.entry(key.clone()).or_default();
                    entry.extend(got.drain(..).map(|answer| (answer.status, answer.body)));
                    drop(seen);
                    if kept {
                        break;
                    }
                    let gateway = pick(&mut dice);
                    got.push(
                        send(&client, keyed(&format!("{gateway}/payments"), &key, &body)).await,
                    );
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    answers
}

async fn assert_once_and_identical(upstream: &Upstream, answers: &Answers) {
    let answers = answers.lock().await;
    assert_eq!(answers.len(), KEYS, "every payment was attempted");
    for (key, seen) in answers.iter() {
        assert_eq!(
            upstream.count(key),
            1,
            "{key} executed {} times",
            upstream.count(key)
        );
        let successes: Vec<&(StatusCode, Bytes)> = seen
            .iter()
            .filter(|(status, _)| status.is_success())
            .collect();
        assert!(!successes.is_empty(), "{key} never got an answer: {seen:?}");
        for (status, body) in &successes {
            assert_eq!(
                (*status, body),
                (successes[0].0, &successes[0].1),
                "{key}: answers differ"
            );
        }
        for (status, body) in seen {
            assert!(
                status.is_success() || *status == StatusCode::CONFLICT,
                "{key}: unexpected {status}: {body:?}"
            );
        }
    }
    assert_eq!(upstream.total(), KEYS as u64);
}

async fn three_gateways_act_as_one(store: &str) {
    let upstream = Upstream::start().await;
    let gateways: Vec<ServeProcess> = (0..3)
        .map(|_| ServeProcess::start_on(&upstream, store, &["--on-conflict", "wait"]))
        .collect();
    let urls: Vec<String> = gateways.iter().map(|g| g.url("")).collect();
    let answers = storm(&urls, unique() | 1).await;
    assert_once_and_identical(&upstream, &answers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_gateways_on_one_redis_act_as_one() {
    let prefix = RedisPrefix::new("many");
    three_gateways_act_as_one(&format!("{}/?prefix={}", redis_url(), prefix.0)).await;
}

fn postgres_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A schema of our own for the test's table, dropped when the test ends.
struct PostgresSchema(String);

impl PostgresSchema {
    fn new(test: &str) -> Self {
        let schema = format!("idem_test_{test}_{}", unique() % 1_000_000_007);
        psql(&format!("CREATE SCHEMA {schema}"));
        Self(schema)
    }
}

impl Drop for PostgresSchema {
    fn drop(&mut self) {
        psql(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.0));
    }
}

fn psql(sql: &str) {
    let status = std::process::Command::new("psql")
        .args([
            postgres_url().as_str(),
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("psql runs");
    assert!(status.success(), "psql failed: {sql}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_gateways_on_one_postgres_act_as_one() {
    let schema = PostgresSchema::new("many");
    three_gateways_act_as_one(&format!("{}?table={}.records", postgres_url(), schema.0)).await;
}

/// A TCP relay the test controls, standing between the gateways and the store: cut, it
/// closes every connection and refuses new ones.
struct Cable {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
}

impl Cable {
    async fn to(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(AtomicU64::new(0));
        let (cut_flag, generations) = (cut.clone(), generation.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if cut_flag.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let born = generations.load(Ordering::SeqCst);
                let generations = generations.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    // Relay until either side closes or the cable is cut.
                    tokio::select! {
                        _ = copy_bidirectional(&mut inbound, &mut outbound) => {}
                        () = async {
                            while generations.load(Ordering::SeqCst) == born {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        } => {}
                    }
                });
            }
        });
        Self {
            addr,
            cut,
            generation,
        }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn mend(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// The store at `store_for(relay address)` goes away mid-run and comes back.
async fn an_outage_fails_closed_and_heals(
    target: SocketAddr,
    store_for: impl Fn(SocketAddr) -> String,
) {
    let cable = Cable::to(target).await;
    let store = store_for(cable.addr);
    let upstream = Upstream::start().await;
    let gateways: Vec<ServeProcess> = (0..2)
        .map(|_| ServeProcess::start_on(&upstream, &store, &[]))
        .collect();
    let client = client();
    let pay = |g: &ServeProcess, n: usize| {
        keyed(
            &g.url("/payments"),
            &format!("out-{n}"),
            &format!(r#"{{"n":{n}}}"#),
        )
    };

    // Healthy: a payment goes through.
    assert_eq!(
        send(&client, pay(&gateways[0], 0)).await.status,
        StatusCode::CREATED
    );
    assert_eq!(upstream.total(), 1);

    // Cut: keyed requests fail closed, and nothing unclaimed reaches the upstream.
    cable.cut();
    // The relay notices within 10 ms; give it time to close what is open.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for n in 1..=4 {
        let answer = send(&client, pay(&gateways[n % 2], n)).await;
        answer.assert_problem(503, "store-unavailable");
        assert!(answer.retry_after() >= 1);
    }
    assert_eq!(
        upstream.total(),
        1,
        "no keyed request ran while the store was away"
    );

    // Mended: the same payments now run once each, wherever they are retried, and the
    // first one still replays.
    cable.mend();
    for n in 1..=4 {
        let answer = common::eventually("the store to come back", || {
            let client = client.clone();
            let request = pay(&gateways[n % 2], n);
            async move {
                let answer = send(&client, request).await;
                (answer.status == StatusCode::CREATED).then_some(answer)
            }
        })
        .await;
        let retry = send(&client, pay(&gateways[(n + 1) % 2], n)).await;
        assert!(retry.is_replay());
        assert_eq!(retry.body, answer.body);
    }
    let replay = send(&client, pay(&gateways[1], 0)).await;
    assert!(replay.is_replay());
    assert_eq!(upstream.total(), 5);
    for n in 0..=4 {
        assert_eq!(upstream.count(&format!("out-{n}")), 1);
    }
}

fn host_port(url: &str) -> SocketAddr {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let host = rest.split(['/', '?']).next().unwrap_or(rest);
    host.parse().expect("a store URL with a numeric host:port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_outage_fails_closed_and_heals_without_duplicates() {
    let prefix = RedisPrefix::new("outage");
    an_outage_fails_closed_and_heals(host_port(&redis_url()), |relay| {
        format!("redis://{relay}/?prefix={}", prefix.0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_outage_fails_closed_and_heals_without_duplicates() {
    let schema = PostgresSchema::new("outage");
    let url = postgres_url();
    let (user, database) = (
        url.split_once("://")
            .and_then(|(_, r)| r.split_once('@'))
            .map_or("postgres", |(u, _)| u),
        url.rsplit_once('/').map_or("test", |(_, db)| db),
    );
    an_outage_fails_closed_and_heals(host_port(&url), |relay| {
        format!(
            "postgres://{user}@{relay}/{database}?table={}.records",
            schema.0
        )
    })
    .await;
}
