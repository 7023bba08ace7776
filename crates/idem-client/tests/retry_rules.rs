//! Which answers the client retries, how long it waits, and what each attempt carries,
//! against an upstream that answers from a script (real sockets).

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::{Scripted, quick, scene};
use idem_client::{Error, IdemClient, IdempotentRetry, OperationKey, RetrySettings};

#[tokio::test]
async fn a_409_with_retry_after_2_is_retried_after_about_2_seconds_with_the_same_key() {
    let upstream = Scripted::start(vec![scene(409, &[("retry-after", "2")])]).await;
    let client = IdemClient::with_settings(quick()).unwrap();
    let key = OperationKey::generate();

    let started = Instant::now();
    let reply = client
        .post(upstream.url("/pay"))
        .key(key.clone())
        .body("{}")
        .send()
        .await
        .unwrap();
    let waited = started.elapsed();

    assert_eq!(reply.status(), 201);
    assert_eq!(reply.attempts(), 2);
    assert!(
        waited >= Duration::from_millis(1800),
        "waited only {waited:?}"
    );
    assert!(waited < Duration::from_secs(10), "waited {waited:?}");
    assert_eq!(
        upstream.header_of_each("idempotency-key"),
        [key.as_str(); 2]
    );
    assert_eq!(upstream.header_of_each("idempotency-attempt"), ["1", "2"]);
    assert_eq!(upstream.bodies(), ["{}", "{}"], "the body, both times");
}

#[tokio::test]
async fn retry_after_as_an_http_date_and_retry_after_ms_are_honoured() {
    let soon = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3));
    let started = Instant::now();
    let upstream = Scripted::start(vec![
        scene(503, &[("retry-after", &soon)]),
        scene(429, &[("retry-after-ms", "300"), ("retry-after", "3600")]),
    ])
    .await;
    let client = IdemClient::with_settings(quick()).unwrap();
    let reply = client
        .post(upstream.url("/pay"))
        .body("{}")
        .send()
        .await
        .unwrap();
    let waited = started.elapsed();

    assert_eq!(reply.status(), 201);
    assert_eq!(reply.attempts(), 3);
    // The date is 2 to 3 s away (it has whole seconds), far more than any backoff of
    // these settings (100 ms at most); then Retry-After-Ms wins over the hour.
    assert!(
        waited >= Duration::from_millis(1500),
        "waited only {waited:?}"
    );
    assert!(waited < Duration::from_secs(15), "waited {waited:?}");
}

#[tokio::test]
async fn a_longer_retry_after_than_the_cap_is_cut_to_the_cap() {
    let hour = [("retry-after", "3600")];
    let upstream = Scripted::start(vec![
        scene(503, &hour),
        scene(503, &hour),
        scene(503, &hour),
    ])
    .await;
    let client = IdemClient::with_settings(RetrySettings {
        max_attempts: 3,
        max_retry_after: Duration::from_millis(200),
        ..quick()
    })
    .unwrap();
    let started = Instant::now();
    let reply = client
        .post(upstream.url("/pay"))
        .body("{}")
        .send()
        .await
        .unwrap();

    assert_eq!(
        reply.status(),
        503,
        "the last answer, once attempts ran out"
    );
    assert_eq!(reply.attempts(), 3);
    assert_eq!(upstream.seen().len(), 3);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "did not wait the hour: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn client_errors_are_never_retried() {
    for status in [400, 401, 403, 404, 409, 413, 422] {
        let upstream = Scripted::start(vec![scene(status, &[])]).await;
        let client = IdemClient::with_settings(quick()).unwrap();
        let reply = client
            .post(upstream.url("/pay"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), status);
        assert_eq!(reply.attempts(), 1, "{status}");
        assert_eq!(upstream.seen().len(), 1, "{status} was sent once");
    }
    // Even when the server suggests a wait: only a 409 takes that as "in flight".
    let upstream = Scripted::start(vec![scene(422, &[("retry-after", "1")])]).await;
    let client = IdemClient::with_settings(quick()).unwrap();
    let reply = client
        .post(upstream.url("/pay"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!((reply.status().as_u16(), reply.attempts()), (422, 1));
}

#[tokio::test]
async fn each_retryable_status_is_retried_with_one_key_and_a_rising_attempt_number() {
    let upstream = Scripted::start(vec![
        scene(408, &[]),
        scene(429, &[]),
        scene(502, &[]),
        scene(503, &[]),
        scene(504, &[]),
        scene(409, &[("retry-after-ms", "1")]),
    ])
    .await;
    let client = IdemClient::with_settings(quick()).unwrap();
    let reply = client
        .post(upstream.url("/pay"))
        .body("{}")
        .send()
        .await
        .unwrap();

    assert_eq!(reply.status(), 201);
    assert_eq!(reply.attempts(), 7);
    let key = reply.key().unwrap().as_str().to_owned();
    assert_eq!(
        upstream.header_of_each("idempotency-key"),
        vec![key; 7],
        "one key"
    );
    let attempts: Vec<String> = (1..=7).map(|n| n.to_string()).collect();
    assert_eq!(upstream.header_of_each("idempotency-attempt"), attempts);
}

#[tokio::test]
async fn a_replayed_answer_is_final_even_when_its_status_is_retryable() {
    let upstream = Scripted::start(vec![scene(502, &[("idempotent-replayed", "true")])]).await;
    let client = IdemClient::with_settings(quick()).unwrap();
    let reply = client
        .post(upstream.url("/pay"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 502);
    assert!(reply.replayed());
    assert_eq!(reply.attempts(), 1, "a replay would only replay again");
}

#[tokio::test]
async fn no_wait_is_begun_past_the_deadline() {
    let upstream = Scripted::start(vec![scene(409, &[("retry-after", "5")])]).await;
    let client = IdemClient::with_settings(RetrySettings {
        deadline: Duration::from_secs(1),
        ..quick()
    })
    .unwrap();
    let reply = client
        .post(upstream.url("/pay"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(
        reply.status(),
        409,
        "the answer as it is, not a wait of 5 s"
    );
    assert_eq!(reply.attempts(), 1);
}

#[tokio::test]
async fn safe_methods_are_retried_without_a_generated_key() {
    let upstream = Scripted::start(vec![scene(503, &[])]).await;
    let client = IdemClient::with_settings(quick()).unwrap();
    let reply = client.get(upstream.url("/orders/7")).send().await.unwrap();
    assert_eq!((reply.status().as_u16(), reply.attempts()), (201, 2));
    assert_eq!(reply.key(), None);
    assert_eq!(upstream.header_of_each("idempotency-key"), ["", ""]);
    assert_eq!(upstream.header_of_each("idempotency-attempt"), ["1", "2"]);
}

#[tokio::test]
async fn a_streaming_body_is_refused_before_anything_is_sent() {
    let upstream = Scripted::start(vec![]).await;
    let client = reqwest_middleware::ClientBuilder::new(idem_client::reqwest_client().unwrap())
        .with(IdempotentRetry::default())
        .build();
    let error = client
        .post(upstream.url("/pay"))
        .body(reqwest::Body::wrap(String::from("a stream")))
        .send()
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("can be sent only once"),
        "{error}"
    );
    let reqwest_middleware::Error::Middleware(error) = error else {
        panic!("{error}")
    };
    assert!(matches!(
        error.downcast_ref::<Error>(),
        Some(Error::BodyNotReplayable)
    ));
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn bad_settings_and_bad_keys_are_refused_with_the_reason() {
    let error = IdemClient::with_settings(RetrySettings {
        max_attempts: 0,
        ..RetrySettings::default()
    })
    .unwrap_err();
    assert!(error.to_string().contains("max_attempts"), "{error}");

    let upstream = Scripted::start(vec![]).await;
    let client = IdemClient::with_settings(quick()).unwrap();
    let error = client
        .post(upstream.url("/pay"))
        .header("idempotency-key", "caf\u{e9}".as_bytes())
        .send()
        .await
        .unwrap_err();
    assert!(matches!(error, Error::InvalidKey { .. }), "{error}");
    let error = client
        .post(upstream.url("/pay"))
        .header("idempotency-key", "a")
        .header("idempotency-key", "b")
        .send()
        .await
        .unwrap_err();
    assert!(matches!(error, Error::RepeatedKey { .. }), "{error}");
    assert!(upstream.seen().is_empty(), "nothing was sent");

    let small = client.clone().max_answer_bytes(3);
    let error = small.post(upstream.url("/pay")).send().await.unwrap_err();
    assert!(
        matches!(error, Error::AnswerTooLarge { limit: 3 }),
        "{error}"
    );
}

/// A writer for tracing-subscriber that keeps what it is given.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn each_attempt_has_a_span_with_its_number_key_status_and_outcome() {
    use tracing_subscriber::fmt::format::FmtSpan;
    use tracing_subscriber::util::SubscriberInitExt;

    let captured = Captured::default();
    let writer = captured.clone();
    let _guard = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_span_events(FmtSpan::CLOSE)
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .set_default();

    let upstream = Scripted::start(vec![scene(503, &[])]).await;
    let client = IdemClient::with_settings(quick()).unwrap();
    let key = OperationKey::generate();
    let reply = client
        .post(upstream.url("/pay?secret=1"))
        .key(key.clone())
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(reply.attempts(), 2);

    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let closed: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("idem_client.attempt") && line.contains("close"))
        .collect();
    assert_eq!(closed.len(), 2, "one span per attempt:\n{log}");
    for (line, (attempt, status, outcome)) in closed
        .iter()
        .zip([(1, 503, "retrying"), (2, 201, "answered")])
    {
        for field in [
            format!("attempt={attempt}"),
            format!("key=\"{key}\""),
            format!("status={status}"),
            format!("outcome=\"{outcome}\""),
            "path=\"/pay\"".to_owned(),
        ] {
            assert!(line.contains(&field), "{field} in {line}");
        }
    }
    assert!(!log.contains("secret"), "the query is left out:\n{log}");
}
