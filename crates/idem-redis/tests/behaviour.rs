//! What the conformance suite does not cover: failures surfaced as errors (never a panic or a
//! hang), scripts reloaded after Redis forgot them, the key layout, corrupt records.

mod common;

use std::error::Error as _;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idem_core::testing::{fingerprint, scoped, scoped_in};
use idem_core::{Begin, Store, StoreError, Stored};
use idem_redis::fred::interfaces::{HashesInterface, KeysInterface, LuaInterface};
use idem_redis::fred::types::Value;
use idem_redis::{ConnectError, RedisOptions, RedisStore};

use common::{Cleanup, PATIENCE, redis_url, test_options, unique_prefix};

const SHORT: Duration = Duration::from_millis(300);

fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("address").port()
    // The listener closes here: nothing listens on the port any more.
}

fn impatient() -> RedisOptions {
    RedisOptions {
        connect_timeout: SHORT,
        command_timeout: SHORT,
        ..RedisOptions::default()
    }
}

fn assert_backend<T: std::fmt::Debug>(result: Result<T, StoreError>, operation: &str) {
    match result {
        Err(ref error @ StoreError::Backend { operation: op, .. }) => {
            assert_eq!(op, operation);
            assert!(
                error.source().is_some(),
                "the client's error is kept as the source: {error:?}"
            );
        }
        other => panic!("expected a backend error from {operation}, got {other:?}"),
    }
}

async fn connect(prefix: &str) -> (RedisStore, Cleanup) {
    let url = redis_url();
    let store = RedisStore::connect_with(&url, test_options(prefix))
        .await
        .expect("connect to Redis");
    let cleanup = Cleanup {
        url,
        prefix: prefix.to_owned(),
    };
    (store, cleanup)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begin_against_a_closed_port_is_a_backend_error() {
    let url = format!("redis://127.0.0.1:{}", closed_port());
    let store = RedisStore::connect_lazy(&url, impatient()).expect("a lazy store needs no server");
    let started = Instant::now();
    let answer = tokio::time::timeout(
        PATIENCE,
        store.begin(&scoped("k"), &fingerprint("a"), SHORT),
    )
    .await
    .expect("begin gave up within its command timeout");
    assert_backend(answer, "begin");
    assert!(
        started.elapsed() < SHORT * 5,
        "took {:?}",
        started.elapsed()
    );
    // Every other call fails the same way.
    assert_backend(store.get(&scoped("k")).await, "get");
    assert_backend(store.delete(&scoped("k")).await, "delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_a_closed_port_fails_within_the_connect_timeout() {
    let url = format!("redis://127.0.0.1:{}", closed_port());
    let started = Instant::now();
    let result = tokio::time::timeout(PATIENCE, RedisStore::connect_with(&url, impatient()))
        .await
        .expect("connect gave up within its timeout");
    match result {
        Err(ConnectError::Redis(_) | ConnectError::Timeout(_)) => {}
        other => panic!("expected a connection error, got {other:?}"),
    }
    assert!(
        started.elapsed() < SHORT * 5,
        "took {:?}",
        started.elapsed()
    );
}

/// A server that accepts connections and never answers.
fn black_hole() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let port = listener.local_addr().expect("address").port();
    let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = stream.try_clone().expect("clone stream");
            held.lock().expect("lock").push(stream);
            // Read and discard, so the client's writes never block.
            std::thread::spawn(move || while reader.read(&mut [0; 4096]).unwrap_or(0) > 0 {});
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_times_out_as_a_backend_error() {
    let url = format!("redis://127.0.0.1:{}", black_hole());
    let started = Instant::now();
    let connected = tokio::time::timeout(PATIENCE, RedisStore::connect_with(&url, impatient()))
        .await
        .expect("connect gave up within its timeout");
    assert!(
        matches!(
            connected,
            Err(ConnectError::Timeout(_) | ConnectError::Redis(_))
        ),
        "{connected:?}"
    );
    assert!(started.elapsed() < SHORT * 5);

    let store = RedisStore::connect_lazy(&url, impatient()).expect("lazy store");
    let started = Instant::now();
    let answer = tokio::time::timeout(
        PATIENCE,
        store.complete(
            &scoped("k"),
            idem_core::Token::new(1),
            &Stored::new(200),
            SHORT,
        ),
    )
    .await
    .expect("complete gave up within its command timeout");
    assert_backend(answer, "complete");
    assert!(started.elapsed() < SHORT * 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_are_loaded_again_after_redis_forgets_them() {
    let prefix = unique_prefix();
    let (store, _cleanup) = connect(&prefix).await;
    let flush = || async {
        store
            .pool()
            .script_flush_cluster(false)
            .await
            .expect("SCRIPT FLUSH")
    };
    let (key, fp, unit) = (
        scoped("noscript"),
        fingerprint("a"),
        Duration::from_secs(30),
    );

    flush().await;
    let Begin::Acquired(lease) = store.begin(&key, &fp, unit).await.unwrap() else {
        panic!("a new key is acquired")
    };
    flush().await;
    let renewed = store.renew(&key, lease.token, unit * 2).await.unwrap();
    assert!(renewed.expires_at > lease.expires_at);
    flush().await;
    assert!(store.get(&key).await.unwrap().is_some());
    flush().await;
    store.release(&key, lease.token).await.unwrap();
    let Begin::Acquired(lease) = store.begin(&key, &fp, unit).await.unwrap() else {
        panic!("a released key is acquired")
    };
    flush().await;
    store
        .complete(&key, lease.token, &Stored::new(200), unit)
        .await
        .unwrap();
    flush().await;
    assert!(store.delete(&key).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_is_one_hash_named_by_the_digest() {
    let prefix = unique_prefix();
    let (store, _cleanup) = connect(&prefix).await;
    let key = scoped_in("tenant {a}", "{hash}tag}");
    let lease = match store
        .begin(&key, &fingerprint("a"), Duration::from_secs(60))
        .await
        .unwrap()
    {
        Begin::Acquired(lease) => lease,
        other => panic!("expected to acquire, got {other:?}"),
    };
    let name = store.record_key(&key);
    let digest = name
        .strip_prefix(&format!("{prefix}:{{"))
        .and_then(|rest| rest.strip_suffix('}'))
        .expect("<prefix>:{<digest>}");
    assert_eq!(digest.len(), 64);
    assert!(digest.bytes().all(|b| b.is_ascii_hexdigit()));

    let pool = store.pool();
    let fields: std::collections::HashMap<String, Value> = pool.hgetall(&name).await.unwrap();
    let text = |field: &str| fields.get(field).and_then(|v| v.as_string());
    assert_eq!(text("scope").as_deref(), Some("tenant {a}"));
    assert_eq!(text("key").as_deref(), Some("{hash}tag}"));
    assert_eq!(text("state").as_deref(), Some("in_flight"));
    assert_eq!(text("token"), Some(lease.token.get().to_string()));
    assert_eq!(
        text("expires_ms"),
        Some(idem_core::unix_millis(lease.expires_at).to_string())
    );
    // Redis expires an in-flight record by itself one more lease length past the lease end
    // (so the holder's late complete still finds it), a completed one at its retention end.
    let expire_at: i64 = pool.pexpire_time(&name).await.unwrap();
    assert_eq!(
        u64::try_from(expire_at).unwrap(),
        idem_core::unix_millis(lease.expires_at) + 60_000
    );
    let retained = store
        .complete(
            &key,
            lease.token,
            &Stored::new(200),
            Duration::from_secs(90),
        )
        .await
        .unwrap();
    let expire_at: i64 = pool.pexpire_time(&name).await.unwrap();
    assert_eq!(
        u64::try_from(expire_at).unwrap(),
        idem_core::unix_millis(retained)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mangled_outcome_is_reported_as_corrupt() {
    let prefix = unique_prefix();
    let (store, _cleanup) = connect(&prefix).await;
    let (key, fp) = (scoped("mangled"), fingerprint("a"));
    let Begin::Acquired(lease) = store
        .begin(&key, &fp, Duration::from_secs(60))
        .await
        .unwrap()
    else {
        panic!("a new key is acquired")
    };
    store
        .complete(
            &key,
            lease.token,
            &Stored::new(200),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    store
        .pool()
        .hset::<(), _, _>(store.record_key(&key), ("stored", "\u{7}garbage"))
        .await
        .unwrap();
    match store.begin(&key, &fp, Duration::from_secs(60)).await {
        Err(StoreError::Corrupt(_)) => {}
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(matches!(store.get(&key).await, Err(StoreError::Corrupt(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_keep_growing_when_the_record_is_gone() {
    let prefix = unique_prefix();
    let (store, _cleanup) = connect(&prefix).await;
    let (key, fp) = (scoped("tokens"), fingerprint("a"));
    let mut last = None;
    for round in 0..200 {
        let Begin::Acquired(lease) = store
            .begin(&key, &fp, Duration::from_secs(60))
            .await
            .unwrap()
        else {
            panic!("round {round}: the key is free")
        };
        assert!(
            Some(lease.token) > last,
            "round {round}: {lease:?} after {last:?}"
        );
        last = Some(lease.token);
        match round % 3 {
            0 => assert!(store.delete(&key).await.unwrap()),
            1 => store.release(&key, lease.token).await.unwrap(),
            _ => {
                // Taken over in the same record: the previous token is still there.
                store
                    .renew(&key, lease.token, Duration::from_millis(1))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_store_serves_once_redis_answers() {
    let (url, prefix) = (redis_url(), unique_prefix());
    let _cleanup = Cleanup {
        url: url.clone(),
        prefix: prefix.clone(),
    };
    let store = RedisStore::connect_lazy(&url, test_options(&prefix)).expect("lazy store");
    let (key, fp) = (scoped("lazy"), fingerprint("a"));
    let Begin::Acquired(lease) = store
        .begin(&key, &fp, Duration::from_secs(60))
        .await
        .unwrap()
    else {
        panic!("a new key is acquired")
    };
    let other = store.clone();
    assert!(matches!(
        other
            .begin(&key, &fp, Duration::from_secs(60))
            .await
            .unwrap(),
        Begin::InFlight { .. }
    ));
    drop(other); // Clones share the pool: dropping one leaves the other working.
    store.release(&key, lease.token).await.unwrap();
}
