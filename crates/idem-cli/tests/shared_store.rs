//! Many gateways, one store: several `idem serve` processes sharing Redis (or, later,
//! Postgres) behave as one; and a store outage fails closed, then heals without duplicates.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{
    Fault, FaultProxy, PostgresSchema, RedisPrefix, ServeProcess, Upstream, client, database_url,
    host_port, keyed, redis_url, send, unique,
};
use http::StatusCode;
use tokio::sync::Mutex;

const KEYS: usize = 120;
const CLIENTS: usize = 12;
const LOSS_PERCENT: u64 = 30;

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
    three_gateways_act_as_one(&prefix.store_url(None)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_gateways_on_one_postgres_act_as_one() {
    let schema = PostgresSchema::new("many");
    three_gateways_act_as_one(&schema.store_url(None)).await;
}

/// The store at `store_for(relay address)` goes away mid-run and comes back.
async fn an_outage_fails_closed_and_heals(
    target: SocketAddr,
    store_for: impl Fn(SocketAddr) -> String,
) {
    let cable = FaultProxy::start(target).await;
    let store = store_for(cable.addr());
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
    cable.set(Fault::Refuse).await;
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

    // Mended: new payments run once each, wherever they are retried, and the first one
    // still replays.
    cable.set(Fault::Pass).await;
    for n in 5..=8 {
        // Every pooled connection reconnects on its own backoff (up to 2 s apart), and a
        // claim on one still reconnecting waits out its command timeout.
        let answer = idem_testkit::eventually_within(
            "the store to come back",
            Duration::from_secs(30),
            || {
                let client = client.clone();
                let request = pay(&gateways[n % 2], n);
                async move {
                    let answer = send(&client, request).await;
                    (answer.status == StatusCode::CREATED).then_some(answer)
                }
            },
        )
        .await;
        let retry = send(&client, pay(&gateways[(n + 1) % 2], n)).await;
        assert!(retry.is_replay());
        assert_eq!(retry.body, answer.body);
        assert_eq!(upstream.count(&format!("out-{n}")), 1);
    }
    let replay = send(&client, pay(&gateways[1], 0)).await;
    assert!(replay.is_replay());
    // The payments refused during the cut: a claim whose answer was lost in the cut may
    // have landed, and then holds its key until the lease ends (409); otherwise the retry
    // runs. Either way none runs twice.
    for n in 1..=4 {
        let retry = send(&client, pay(&gateways[n % 2], n)).await;
        match retry.status {
            StatusCode::CREATED => {}
            StatusCode::CONFLICT => {
                retry.assert_problem(409, "in-flight");
            }
            other => panic!("payment {n} after the cut: {other}"),
        }
        assert!(upstream.count(&format!("out-{n}")) <= 1);
    }
    for n in 0..=8 {
        assert!(
            upstream.count(&format!("out-{n}")) <= 1,
            "payment {n} ran twice"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_outage_fails_closed_and_heals_without_duplicates() {
    let prefix = RedisPrefix::new("outage");
    an_outage_fails_closed_and_heals(host_port(&redis_url()), |relay| {
        prefix.store_url(Some(relay))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_outage_fails_closed_and_heals_without_duplicates() {
    let schema = PostgresSchema::new("outage");
    an_outage_fails_closed_and_heals(host_port(&database_url()), |relay| {
        schema.store_url(Some(relay))
    })
    .await;
}

/// `?max_connections=N` sizes the Postgres store's pool: however many calls run at once,
/// the server sees at most N connections from the store (counted by application name).
/// Bad values are refused before anything connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_url_sizes_the_postgres_pool() {
    use idem_postgres::sqlx;

    let schema = PostgresSchema::new("pool_size");
    let application = format!("idem_pool_{}", unique());
    let url = format!(
        "{}&max_connections=2&application_name={application}",
        schema.store_url(None)
    );
    let store = url
        .parse::<idem_cli::store_url::StoreUrl>()
        .unwrap()
        .open()
        .await
        .unwrap();
    let key = |n: usize| {
        idem_core::ScopedKey::new(
            idem_core::Scope::anonymous(),
            idem_core::Key::new(&format!("pool-{n}")).unwrap(),
        )
    };
    let monitor = sqlx::PgPool::connect(&database_url()).await.unwrap();
    let mut most = 0;
    for _ in 0..5 {
        let mut calls = tokio::task::JoinSet::new();
        for n in 0..32 {
            let store = Arc::clone(&store);
            let key = key(n);
            calls.spawn(async move { store.get(&key).await.unwrap() });
        }
        let calls = calls.join_all();
        let count = async {
            let mut most = 0;
            for _ in 0..20 {
                let seen: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                )
                .bind(&application)
                .fetch_one(&monitor)
                .await
                .unwrap();
                most = most.max(seen);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            most
        };
        let (_, seen) = tokio::join!(calls, count);
        most = most.max(seen);
    }
    assert!((1..=2).contains(&most), "{most} connections seen");

    for bad in ["0", "lots", "100000"] {
        let url = format!("{}&max_connections={bad}", schema.store_url(None));
        let refused = url
            .parse::<idem_cli::store_url::StoreUrl>()
            .unwrap()
            .open()
            .await
            .err()
            .map(|error| error.to_string());
        assert!(
            refused
                .as_deref()
                .is_some_and(|text| text.contains("max_connections")),
            "{bad}: {refused:?}"
        );
    }
}
