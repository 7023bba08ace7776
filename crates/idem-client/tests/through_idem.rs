//! The client against `idem serve` (in process) over real sockets: through a lossy hop
//! that loses answers after the upstream ran, each operation still runs exactly once.

mod common;

use std::time::Duration;

use common::{TestGateway, quick};
use futures_util::future::join_all;
use idem_client::{DeliveryExt, Error, IdemClient, IdempotentRetry, OperationKey, RetrySettings};
use idem_testkit::{Fault, FaultProxy, PATIENCE, Upstream};

/// client → lossy hop → idem gateway → upstream.
struct Rig {
    upstream: Upstream,
    _gateway: TestGateway,
    hop: FaultProxy,
}

impl Rig {
    async fn start(toml: &str) -> Self {
        let upstream = Upstream::start().await;
        let gateway = TestGateway::around(&upstream, toml).await;
        let hop = FaultProxy::start(gateway.addr).await;
        Self {
            upstream,
            _gateway: gateway,
            hop,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.hop.addr())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_lossy_hop_every_operation_runs_exactly_once() {
    let rig = Rig::start("").await;
    rig.hop.set(Fault::LoseEvery(3)).await;
    let client = IdemClient::with_settings(quick()).unwrap();
    let url = rig.url("/payments");

    let operations = 60;
    let replies = join_all((0..operations).map(|i| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let key = OperationKey::generate();
            let reply = client
                .post(&url)
                .key(key.clone())
                .json(&serde_json::json!({"order": i, "cents": 100}))
                .send()
                .await
                .unwrap_or_else(|e| panic!("operation {i} failed: {e}"));
            (key, reply)
        }
    }))
    .await;

    assert!(
        rig.hop.lost_answers() >= 10,
        "the hop lost answers: {}",
        rig.hop.lost_answers()
    );
    let mut retried = 0;
    for (key, reply) in &replies {
        assert_eq!(reply.status(), 201, "{key}: {}", reply.text());
        assert_eq!(reply.key(), Some(key));
        assert_eq!(
            rig.upstream.count(key.as_str()),
            1,
            "{key} ran once, after {} attempts",
            reply.attempts()
        );
        let body: serde_json::Value = reply.json().unwrap();
        assert_eq!(
            body["key"],
            key.as_str(),
            "the answer is this operation's own"
        );
        if reply.attempts() > 1 {
            retried += 1;
        }
    }
    assert!(retried >= 10, "operations that needed a retry: {retried}");
    assert_eq!(rig.upstream.total(), operations, "nothing ran twice");
    for seen in rig.upstream.seen() {
        assert!(
            seen.headers.contains_key("idempotency-attempt"),
            "every request says which attempt it is"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_is_retried_with_the_same_key_and_comes_back_as_the_replay() {
    let rig = Rig::start("").await;
    rig.hop.set(Fault::LoseEvery(1)).await;
    // Attempts to spare: every answer is lost until the test heals the hop.
    let client = IdemClient::with_settings(RetrySettings {
        max_attempts: 50,
        ..quick()
    })
    .unwrap();
    let key = OperationKey::new("order-7").unwrap().derive("charge");

    let pending = tokio::spawn({
        let (client, url, key) = (client.clone(), rig.url("/payments"), key.clone());
        async move { client.post(&url).key(key).body("{}").send().await }
    });
    // Every answer is lost until the hop heals; the operation ran on the first attempt.
    rig.upstream.wait_total(1).await;
    idem_testkit::wait_until("a retry after a lost answer", || {
        rig.hop.lost_answers() >= 2
    })
    .await;
    rig.hop.set(Fault::Pass).await;
    let reply = tokio::time::timeout(PATIENCE, pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    assert_eq!(reply.status(), 201);
    assert!(reply.replayed(), "the stored outcome of the first attempt");
    assert!(reply.attempts() >= 3, "attempts: {}", reply.attempts());
    assert_eq!(rig.upstream.count(key.as_str()), 1);
    assert_eq!(rig.upstream.total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_that_timed_out_after_sending_is_retried_with_its_key_and_runs_once() {
    let rig = Rig::start("").await;
    let client = IdemClient::with_settings(RetrySettings {
        attempt_timeout: Duration::from_millis(300),
        ..quick()
    })
    .unwrap();
    let key = OperationKey::generate();

    // The upstream takes 1.5 s: the first attempt times out at the client while the gateway
    // goes on; the retries find the key in flight (409 + Retry-After), then the replay.
    let reply = client
        .post(rig.url("/payments"))
        .key(key.clone())
        .header("x-sleep-ms", "1500")
        .body("{}")
        .send()
        .await
        .unwrap();

    assert_eq!(reply.status(), 201);
    assert!(reply.replayed());
    assert!(reply.attempts() >= 2, "attempts: {}", reply.attempts());
    assert_eq!(rig.upstream.count(key.as_str()), 1, "ran once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_in_flight_is_waited_for_and_ends_in_the_replay() {
    let rig = Rig::start("").await;
    let client = IdemClient::with_settings(quick()).unwrap();
    let key = OperationKey::generate();
    let slow = |client: IdemClient| {
        let (url, key) = (rig.url("/payments"), key.clone());
        async move {
            client
                .post(url)
                .key(key)
                .header("x-sleep-ms", "800")
                .body("{}")
                .send()
                .await
                .unwrap()
        }
    };
    let first = tokio::spawn(slow(client.clone()));
    rig.upstream.wait_total(1).await;
    let second = slow(client.clone()).await;
    let first = first.await.unwrap();

    assert_eq!(first.status(), 201);
    assert_eq!(first.attempts(), 1);
    assert!(!first.replayed());
    assert_eq!(second.status(), 201, "{}", second.text());
    assert!(second.replayed(), "the first one's answer");
    assert!(second.attempts() >= 2, "it met the 409 first");
    assert_eq!(second.body(), first.body());
    assert_eq!(rig.upstream.total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_key_with_another_body_gets_its_422_once() {
    let rig = Rig::start("").await;
    let client = IdemClient::with_settings(quick()).unwrap();
    let key = OperationKey::generate();
    let send = |body: &'static str| {
        client
            .post(rig.url("/payments"))
            .key(key.clone())
            .body(body)
            .send()
    };
    assert_eq!(send(r#"{"cents":1}"#).await.unwrap().status(), 201);
    let mismatch = send(r#"{"cents":2}"#).await.unwrap();
    assert_eq!(mismatch.status(), 422);
    assert_eq!(mismatch.attempts(), 1, "a client error is never retried");
    assert_eq!(rig.upstream.total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_middleware_the_same_guarantee_holds() {
    let rig = Rig::start("").await;
    rig.hop.set(Fault::LoseEvery(2)).await;
    let client = reqwest_middleware::ClientBuilder::new(idem_client::reqwest_client().unwrap())
        .with(IdempotentRetry::new(quick()).unwrap())
        .build();

    let mut keys = Vec::new();
    for i in 0..10 {
        let key = OperationKey::generate();
        let response = client
            .post(rig.url("/payments"))
            .with_extension(key.clone())
            .body(format!(r#"{{"order":{i}}}"#))
            .send()
            .await
            .unwrap();
        let delivery = response.delivery().unwrap().clone();
        assert_eq!(response.status(), 201);
        assert_eq!(delivery.key(), Some(&key));
        if delivery.replayed() {
            assert!(delivery.attempts() > 1, "a replay answers a retry");
        }
        keys.push(key);
    }
    assert!(rig.hop.lost_answers() >= 3);
    for key in &keys {
        assert_eq!(rig.upstream.count(key.as_str()), 1, "{key}");
    }

    // A key header the caller set is the operation's key; a bad one is refused unsent.
    let response = client
        .post(rig.url("/payments"))
        .header("idempotency-key", "\"my-own\"")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.delivery().unwrap().key().unwrap().as_str(),
        "my-own"
    );
    assert_eq!(rig.upstream.count("\"my-own\""), 1);
    let before = rig.upstream.total();
    let error = client
        .post(rig.url("/payments"))
        .header("idempotency-key", "")
        .body("{}")
        .send()
        .await
        .unwrap_err();
    let error = match error {
        reqwest_middleware::Error::Middleware(error) => error,
        other => panic!("{other}"),
    };
    assert!(
        matches!(
            error.downcast_ref::<Error>(),
            Some(Error::InvalidKey { .. })
        ),
        "{error}"
    );
    assert_eq!(rig.upstream.total(), before, "nothing was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_attempt_fails_the_caller_learns_the_key_to_retry_with() {
    let rig = Rig::start("").await;
    rig.hop.set(Fault::Refuse).await;
    let client = IdemClient::with_settings(RetrySettings {
        max_attempts: 3,
        ..quick()
    })
    .unwrap();
    let key = OperationKey::generate();
    let error = client
        .post(rig.url("/payments"))
        .key(key.clone())
        .body("{}")
        .send()
        .await
        .unwrap_err();
    match &error {
        Error::GaveUp {
            key: Some(gave_up),
            attempts: 3,
            ..
        } => assert_eq!(gave_up, &key),
        other => panic!("{other:?}"),
    }
    assert!(error.to_string().contains(key.as_str()), "{error}");

    // Later, with the same key, it runs (once).
    rig.hop.set(Fault::Pass).await;
    let reply = client
        .post(rig.url("/payments"))
        .key(key.clone())
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 201);
    assert_eq!(rig.upstream.count(key.as_str()), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connect_is_retried_until_the_server_is_back() {
    let rig = Rig::start("").await;
    rig.hop.set(Fault::Refuse).await;
    let client = IdemClient::with_settings(RetrySettings {
        max_attempts: 100,
        ..quick()
    })
    .unwrap();
    let key = OperationKey::generate();
    let pending = tokio::spawn({
        let (client, url, key) = (client.clone(), rig.url("/payments"), key.clone());
        async move { client.post(url).key(key).body("{}").send().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    rig.hop.set(Fault::Pass).await;
    let reply = tokio::time::timeout(PATIENCE, pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(reply.status(), 201);
    assert!(reply.attempts() > 1, "attempts: {}", reply.attempts());
    assert!(!reply.replayed(), "nothing had run before");
    assert_eq!(rig.upstream.count(key.as_str()), 1);
}
