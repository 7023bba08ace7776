//! Fault injection through the gateway over real sockets, counting upstream executions per
//! key: a [`FaultProxy`] between the gateway and its upstream (every fault, on every store),
//! and between the gateway and each shared store (Redis, Postgres).
//!
//! What each fault must give (issue 8's plan, and the README's guarantees):
//! - reset, drop or half-open after the request was written: `502 outcome-unknown`, stored;
//!   a retry gets it again with `Idempotent-Replayed: true`; the upstream ran once.
//! - no answer within `upstream_timeout` (black-hole, delay): `504 upstream-timeout`, stored
//!   and replayed; never a second execution.
//! - a refused connect: `502 upstream-unavailable`, the key released; once the upstream is
//!   back a retry runs, exactly once.
//! - a black-holed store: `503 store-unavailable` within `store_timeout`, nothing runs.
//! - a store that fails only while the outcome is being stored, and heals within
//!   `complete_for`: the outcome is still stored and replayed; one execution.
//! - a store down for longer than `complete_for`: the client still gets its response, and a
//!   retry within the lease does not run again.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::body::Body;
use common::*;
use http::Request;
use idem_cli::config::Overrides;

/// The store a test runs on; whatever it needs is removed when it is dropped.
enum Backend {
    Memory,
    Redb(tempfile::TempDir),
    Redis(RedisPrefix),
    Postgres(PostgresSchema),
}

impl Backend {
    fn memory(_test: &str) -> Self {
        Self::Memory
    }

    fn redb(_test: &str) -> Self {
        Self::Redb(tempfile::tempdir().unwrap())
    }

    fn redis(test: &str) -> Self {
        Self::Redis(RedisPrefix::new(test))
    }

    fn postgres(test: &str) -> Self {
        Self::Postgres(PostgresSchema::new(test))
    }

    /// The store URL, through `via` (a relay in front of the store's server) when given.
    fn url(&self, via: Option<SocketAddr>) -> String {
        match self {
            Self::Memory => "memory:".to_owned(),
            Self::Redb(dir) => format!("redb:{}", dir.path().join("idem.redb").display()),
            Self::Redis(prefix) => prefix.store_url(via),
            Self::Postgres(schema) => schema.store_url(via),
        }
    }

    /// Where the store's server listens (shared stores only).
    fn server(&self) -> SocketAddr {
        match self {
            Self::Redis(_) => host_port(&redis_url()),
            Self::Postgres(_) => host_port(&database_url()),
            Self::Memory | Self::Redb(_) => panic!("an in-process store has no server"),
        }
    }
}

/// The gateway, its upstream behind a fault proxy, and optionally its store behind another.
struct Rig {
    upstream: Upstream,
    /// Between the gateway and the upstream.
    door: FaultProxy,
    /// Between the gateway and the store (shared stores, when asked for).
    store_door: Option<FaultProxy>,
    gateway: TestGateway,
    client: HttpClient,
    _backend: Backend,
}

impl Rig {
    /// `policy` is the TOML body of the file's `[policy]` table.
    async fn new(backend: Backend, policy: &str) -> Self {
        Self::build(backend, policy, false).await
    }

    /// Like [`new`](Self::new), with the store reached through a fault proxy.
    async fn with_store_door(backend: Backend, policy: &str) -> Self {
        Self::build(backend, policy, true).await
    }

    async fn build(backend: Backend, policy: &str, store_door: bool) -> Self {
        let upstream = Upstream::start().await;
        let door = FaultProxy::start(upstream.addr()).await;
        let store_door = match store_door {
            true => Some(FaultProxy::start(backend.server()).await),
            false => None,
        };
        let config = load_config(
            &format!("[policy]\n{policy}\n"),
            Overrides {
                upstream: Some(format!("http://{}", door.addr())),
                store: Some(backend.url(store_door.as_ref().map(FaultProxy::addr))),
                ..Overrides::default()
            },
        );
        let gateway = TestGateway::start(&config).await;
        Self {
            upstream,
            door,
            store_door,
            gateway,
            client: client(),
            _backend: backend,
        }
    }

    fn store_door(&self) -> &FaultProxy {
        self.store_door.as_ref().expect("built with_store_door")
    }

    /// A keyed payment whose upstream handler takes `sleep_ms` before answering.
    fn payment(&self, key: &str, sleep_ms: u64) -> Request<Body> {
        post(&self.gateway.url("/payments"), Some(key))
            .header("x-sleep-ms", sleep_ms.to_string())
            .body(Body::from(r#"{"cents":100}"#))
            .unwrap()
    }

    async fn pay(&self, key: &str) -> Answer {
        send(&self.client, self.payment(key, 0)).await
    }

    /// Sends the payment on a task of its own; the answer comes through the handle.
    fn pay_in_background(&self, key: &str, sleep_ms: u64) -> tokio::task::JoinHandle<Answer> {
        let (client, request) = (self.client.clone(), self.payment(key, sleep_ms));
        tokio::spawn(async move { send(&client, request).await })
    }

    /// Retries until the answer is neither `409 in-flight` nor `503 store-unavailable`
    /// (a store that is reconnecting, an outcome still being stored).
    async fn settled(&self, key: &str) -> Answer {
        let rig = self;
        eventually(&format!("{key} to settle"), move || async move {
            let answer = rig.pay(key).await;
            let pending = answer.is_problem("in-flight") || answer.is_problem("store-unavailable");
            (!pending).then_some(answer)
        })
        .await
    }
}

/// One test, `$store`, of `$scenario` on `Backend::$store`, named for the scenario.
macro_rules! store_test {
    ($store:ident, $name:ident, $scenario:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $store() {
            let scenario = $scenario;
            scenario(Backend::$store(stringify!($name))).await;
        }
    };
}

/// One test per store for `$scenario(backend)`, in a module named for the scenario.
macro_rules! on_every_store {
    ($name:ident, $scenario:expr) => {
        mod $name {
            use super::*;
            store_test!(memory, $name, $scenario);
            store_test!(redb, $name, $scenario);
            store_test!(redis, $name, $scenario);
            store_test!(postgres, $name, $scenario);
        }
    };
}

/// One test per shared store (the ones reached over the network).
macro_rules! on_every_shared_store {
    ($name:ident, $scenario:expr) => {
        mod $name {
            use super::*;
            store_test!(redis, $name, $scenario);
            store_test!(postgres, $name, $scenario);
        }
    };
}

// ---------------------------------------------------------------------------------------
// Between the gateway and the upstream
// ---------------------------------------------------------------------------------------

/// The upstream got the request and did the work; the answer is lost on the way back.
async fn an_unknown_outcome_is_stored_and_never_run_again(backend: Backend, fault: Fault) {
    let rig = Rig::new(backend, "").await;
    rig.door.set(fault).await;

    let first = rig.pay("u-1").await;
    first.assert_problem(502, "outcome-unknown");
    assert!(!first.is_replay());
    assert_eq!(rig.upstream.count("u-1"), 1, "the upstream did the work");

    // The upstream answers again: a retry that ran the payment would now succeed.
    rig.door.set(Fault::Pass).await;
    let retry = rig.pay("u-1").await;
    retry.assert_problem(502, "outcome-unknown");
    assert!(retry.is_replay(), "stored and replayed: {retry:?}");
    assert_eq!(retry.body, first.body);
    assert_eq!(rig.upstream.count("u-1"), 1, "never run again");

    // Other keys are unaffected.
    assert_eq!(rig.pay("u-2").await.status, 201);
}

on_every_store!(reset_after_the_request, |backend| {
    an_unknown_outcome_is_stored_and_never_run_again(backend, Fault::ResetAfterRequest)
});
on_every_store!(dropped_after_the_request, |backend| {
    an_unknown_outcome_is_stored_and_never_run_again(backend, Fault::DropAfterRequest)
});
on_every_store!(half_open_after_the_request, |backend| {
    an_unknown_outcome_is_stored_and_never_run_again(backend, Fault::HalfOpen)
});

/// No answer within `upstream_timeout`: 504, stored, never run again.
async fn an_upstream_timeout_is_stored_and_never_run_again(backend: Backend, fault: Fault) {
    let rig = Rig::new(backend, r#"upstream_timeout = "300ms""#).await;
    rig.door.set(fault).await;

    let start = Instant::now();
    let first = rig.pay("t-1").await;
    first.assert_problem(504, "upstream-timeout");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "answered at the timeout, not later: {:?}",
        start.elapsed()
    );

    rig.door.set(Fault::Pass).await;
    let retry = rig.pay("t-1").await;
    retry.assert_problem(504, "upstream-timeout");
    assert!(retry.is_replay(), "stored and replayed: {retry:?}");
    assert_eq!(retry.body, first.body);
    // A black-holed request may still arrive once the partition heals (TCP delivers it
    // late); it may run once, never twice.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let runs = rig.upstream.count("t-1");
    match fault {
        Fault::Delay(_) => assert_eq!(runs, 1, "the delayed request ran, once"),
        _ => assert!(runs <= 1, "ran {runs} times"),
    }
    assert!(rig.pay("t-1").await.is_replay());
    assert_eq!(
        rig.upstream.count("t-1"),
        runs,
        "and the retries ran nothing"
    );
}

on_every_store!(black_holed_upstream, |backend| {
    an_upstream_timeout_is_stored_and_never_run_again(backend, Fault::BlackHole)
});
on_every_store!(upstream_answering_after_the_timeout, |backend| {
    an_upstream_timeout_is_stored_and_never_run_again(backend, Fault::Delay(Duration::from_secs(2)))
});

/// Nothing was sent: the key is released, and a retry runs once the upstream is back.
async fn a_refused_connect_releases_the_key(backend: Backend) {
    let rig = Rig::new(backend, "").await;
    rig.door.set(Fault::Refuse).await;

    let first = rig.pay("r-1").await;
    first.assert_problem(502, "upstream-unavailable");
    assert!(!first.is_replay());
    let again = rig.pay("r-1").await;
    again.assert_problem(502, "upstream-unavailable");
    assert!(!again.is_replay(), "not stored: tried again");
    assert_eq!(rig.upstream.count("r-1"), 0);

    rig.door.set(Fault::Pass).await;
    let retry = rig.pay("r-1").await;
    assert_eq!(retry.status, 201, "{retry:?}");
    assert!(!retry.is_replay());
    let replay = rig.pay("r-1").await;
    assert!(replay.is_replay());
    assert_eq!(replay.body, retry.body);
    assert_eq!(rig.upstream.count("r-1"), 1, "exactly once");
}

on_every_store!(refused_connect, a_refused_connect_releases_the_key);

/// With `on_conflict = "wait"`, a duplicate waiting on a request whose outcome becomes
/// unknown gets that outcome; it does not run the payment itself.
async fn a_waiting_duplicate_does_not_run_after_an_unknown_outcome(backend: Backend) {
    let rig = Rig::new(backend, r#"on_conflict = "wait""#).await;
    rig.door.set(Fault::ResetAfterRequest).await;

    let first = rig.pay_in_background("w-1", 500);
    rig.upstream.wait_total(1).await;
    let duplicate = rig.pay_in_background("w-1", 0);

    let first = first.await.unwrap();
    first.assert_problem(502, "outcome-unknown");
    // The upstream answers again, so a duplicate that ran would succeed.
    rig.door.set(Fault::Pass).await;
    let duplicate = duplicate.await.unwrap();
    duplicate.assert_problem(502, "outcome-unknown");
    assert!(duplicate.is_replay(), "{duplicate:?}");
    assert_eq!(
        rig.upstream.count("w-1"),
        1,
        "the waiting duplicate did not run"
    );
}

on_every_store!(
    waiting_duplicate_after_an_unknown_outcome,
    a_waiting_duplicate_does_not_run_after_an_unknown_outcome
);

// ---------------------------------------------------------------------------------------
// Between the gateway and a shared store
// ---------------------------------------------------------------------------------------

/// A store that takes no calls: `503` within `store_timeout`, and nothing runs.
async fn a_black_holed_store_is_503_within_store_timeout(backend: Backend) {
    let rig = Rig::with_store_door(backend, r#"store_timeout = "300ms""#).await;
    assert_eq!(rig.pay("s-0").await.status, 201, "healthy to begin with");

    rig.store_door().set(Fault::BlackHole).await;
    for key in ["s-1", "s-2"] {
        let start = Instant::now();
        let answer = rig.pay(key).await;
        let took = start.elapsed();
        answer.assert_problem(503, "store-unavailable");
        assert!(answer.retry_after() >= 1);
        assert!(
            took < Duration::from_millis(1500),
            "within store_timeout (300 ms), not the 2 s default: {took:?}"
        );
    }
    assert_eq!(
        rig.upstream.total(),
        1,
        "nothing ran without its key claimed"
    );

    // Healed: new keys run once. (The black-holed claims may land late and hold their
    // keys until their leases end; they never run either.)
    rig.store_door().set(Fault::Pass).await;
    let fresh = rig.settled("s-3").await;
    assert_eq!(fresh.status, 201, "{fresh:?}");
    assert_eq!(rig.upstream.count("s-3"), 1);
    assert_eq!(rig.upstream.count("s-1") + rig.upstream.count("s-2"), 0);
}

on_every_shared_store!(
    black_holed_store,
    a_black_holed_store_is_503_within_store_timeout
);

/// The store fails only while the outcome is being stored (claimed fine, then `fault`
/// right after the upstream got the request, healed within `complete_for`).
async fn an_outcome_is_kept_through_a_short_store_fault(backend: Backend, fault: Fault) {
    let rig = Rig::with_store_door(
        backend,
        "store_timeout = \"300ms\"\ncomplete_for = \"10s\"\n",
    )
    .await;

    let first = rig.pay_in_background("c-1", 300);
    rig.upstream.wait_total(1).await;
    rig.store_door().set(fault).await;
    // The upstream answers at ~300 ms; storing it fails until the store heals.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    rig.store_door().set(Fault::Pass).await;

    let first = first.await.unwrap();
    assert_eq!(first.status, 201, "{first:?}");
    assert!(!first.is_replay());
    let retry = rig.settled("c-1").await;
    assert_eq!(retry.status, 201, "{retry:?}");
    assert!(retry.is_replay(), "the outcome was stored: {retry:?}");
    assert_eq!(retry.body, first.body);
    assert_eq!(rig.upstream.count("c-1"), 1);
}

on_every_shared_store!(store_black_holed_while_completing, |backend| {
    an_outcome_is_kept_through_a_short_store_fault(backend, Fault::BlackHole)
});
on_every_shared_store!(store_refusing_while_completing, |backend| {
    an_outcome_is_kept_through_a_short_store_fault(backend, Fault::Refuse)
});

/// The store is away for longer than `complete_for`: the client still gets its response,
/// and the key stays held (never released), so a retry within the lease does not run.
async fn a_long_store_outage_answers_and_never_runs_again(backend: Backend, fault: Fault) {
    let rig = Rig::with_store_door(
        backend,
        "store_timeout = \"300ms\"\ncomplete_for = \"1s\"\nlease = \"60s\"\n",
    )
    .await;

    let first = rig.pay_in_background("d-1", 200);
    rig.upstream.wait_total(1).await;
    rig.store_door().set(fault).await;

    let first = first.await.unwrap();
    assert_eq!(
        first.status, 201,
        "the client still gets its response: {first:?}"
    );
    assert!(!first.is_replay());

    rig.store_door().set(Fault::Pass).await;
    let rig = &rig;
    let retry = eventually("the store to answer again", move || async move {
        let answer = rig.pay("d-1").await;
        (!answer.is_problem("store-unavailable")).then_some(answer)
    })
    .await;
    assert!(
        retry.is_problem("in-flight") || (retry.is_replay() && retry.body == first.body),
        "held until the lease ends (or the late write landed): {retry:?}"
    );
    assert_eq!(
        rig.upstream.count("d-1"),
        1,
        "not run again within the lease"
    );
}

on_every_shared_store!(store_refusing_past_complete_for, |backend| {
    a_long_store_outage_answers_and_never_runs_again(backend, Fault::Refuse)
});
on_every_shared_store!(store_black_holed_past_complete_for, |backend| {
    a_long_store_outage_answers_and_never_runs_again(backend, Fault::BlackHole)
});
