//! The HTTP semantics table of docs/DESIGN.md (section 7), written once and run against
//! anything that speaks it: the layer in process (idem-http's tests) and the gateway over
//! sockets (idem-cli's tests). Implement [`Subject`] and call [`run_all`].

use std::future::Future;

use axum::body::Body;
use http::{Request, StatusCode};

use crate::answer::Answer;
use crate::upstream::Upstream;
use crate::wait::wait_until;

/// Something idem protects, with the default policy, in front of an [`Upstream`].
pub trait Subject {
    /// The upstream behind it.
    fn upstream(&self) -> &Upstream;
    /// The request target for `path` (origin-form for a layer, a URL for a gateway).
    fn target(&self, path: &str) -> String;
    /// Sends `request` and reads the answer whole.
    fn send(&self, request: Request<Body>) -> impl Future<Output = Answer> + Send;
}

fn keyed<S: Subject>(subject: &S, key: &str, body: &str) -> http::request::Builder {
    Request::post(subject.target("/payments"))
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .header("content-length", body.len())
}

async fn pay<S: Subject>(subject: &S, key: &str, body: &str) -> Answer {
    let request = keyed(subject, key, body)
        .body(Body::from(body.to_owned()))
        .unwrap();
    subject.send(request).await
}

/// Every row, one after the other, each on keys of its own.
///
/// ```
/// use axum::body::Body;
/// use idem_testkit::semantics::{Subject, run_all};
/// use idem_testkit::{Answer, Upstream};
///
/// // The upstream alone does not speak the table: this only shows the shape.
/// struct Bare(Upstream);
/// impl Subject for Bare {
///     fn upstream(&self) -> &Upstream { &self.0 }
///     fn target(&self, path: &str) -> String { self.0.url_for(path) }
///     async fn send(&self, request: http::Request<Body>) -> Answer {
///         idem_testkit::send(&idem_testkit::client(), request).await
///     }
/// }
/// # let _ = run_all::<Bare>;
/// ```
pub async fn run_all<S: Subject + Sync>(subject: &S) {
    a_new_key_runs_once_and_replays(subject).await;
    a_different_fingerprint_is_422(subject).await;
    a_request_in_flight_is_409_with_retry_after(subject).await;
    a_malformed_key_is_400(subject).await;
    not_processed_statuses_are_returned_and_released(subject).await;
    safe_methods_pass_through(subject).await;
}

/// New key: forwarded once, stored; the same key again: the stored answer, replayed.
pub async fn a_new_key_runs_once_and_replays<S: Subject>(subject: &S) {
    let first = pay(subject, "sem-replay", r#"{"cents":1}"#).await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    assert!(!first.is_replay());
    first.expires();
    let retry = pay(subject, "sem-replay", r#"{"cents":1}"#).await;
    assert!(retry.is_replay(), "{retry:?}");
    assert_eq!(retry.status, first.status);
    assert_eq!(retry.body, first.body);
    assert_eq!(retry.header("location"), first.header("location"));
    let cookies: Vec<_> = retry.headers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert_eq!(
        subject.upstream().count("sem-replay"),
        1,
        "never forwarded again"
    );
}

/// Same key, another body: `422 mismatch`, nothing forwarded.
pub async fn a_different_fingerprint_is_422<S: Subject>(subject: &S) {
    pay(subject, "sem-mismatch", r#"{"cents":1}"#).await;
    pay(subject, "sem-mismatch", r#"{"cents":2}"#)
        .await
        .assert_problem(422, "mismatch");
    assert_eq!(subject.upstream().count("sem-mismatch"), 1);
}

/// Same key while the first runs: `409 in-flight` with `Retry-After`, then the replay.
pub async fn a_request_in_flight_is_409_with_retry_after<S: Subject + Sync>(subject: &S) {
    let body = "{}";
    let slow = keyed(subject, "sem-flight", body)
        .header("x-sleep-ms", "400")
        .body(Body::from(body))
        .unwrap();
    let upstream = subject.upstream();
    let (first, second) = tokio::join!(subject.send(slow), async {
        wait_until("the first request to reach the upstream", || {
            upstream.count("sem-flight") == 1
        })
        .await;
        pay(subject, "sem-flight", body).await
    });
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    second.assert_problem(409, "in-flight");
    assert!(second.retry_after() >= 1);
    assert!(pay(subject, "sem-flight", body).await.is_replay());
    assert_eq!(upstream.count("sem-flight"), 1);
}

/// Empty, too long, or not printable ASCII: `400 malformed-key`, nothing forwarded.
pub async fn a_malformed_key_is_400<S: Subject>(subject: &S) {
    let before = subject.upstream().total();
    for key in [String::new(), "k".repeat(256), "caf\u{e9}".to_owned()] {
        let request = Request::post(subject.target("/payments"))
            .header(
                "idempotency-key",
                http::HeaderValue::from_bytes(key.as_bytes()).unwrap(),
            )
            .header("content-type", "application/json")
            .body(Body::from("{}"))
            .unwrap();
        subject
            .send(request)
            .await
            .assert_problem(400, "malformed-key");
    }
    assert_eq!(subject.upstream().total(), before);
}

/// `429`, `408`, `425` mean "not processed": returned, not stored, the key released.
pub async fn not_processed_statuses_are_returned_and_released<S: Subject>(subject: &S) {
    for status in [429u16, 408, 425] {
        let key = format!("sem-release-{status}");
        let refused = keyed(subject, &key, "{}")
            .header("x-status", status.to_string())
            .body(Body::from("{}"))
            .unwrap();
        let answer = subject.send(refused).await;
        assert_eq!(answer.status.as_u16(), status, "{answer:?}");
        assert!(!answer.is_replay());
        let retry = pay(subject, &key, "{}").await;
        assert_eq!(retry.status, StatusCode::CREATED, "released: {retry:?}");
        assert!(!retry.is_replay());
        assert_eq!(subject.upstream().count(&key), 2);
    }
}

/// Safe methods pass through untouched, key or not: every one runs.
pub async fn safe_methods_pass_through<S: Subject>(subject: &S) {
    for method in ["GET", "HEAD", "OPTIONS", "TRACE"] {
        let key = format!("sem-safe-{method}");
        for _ in 0..2 {
            let request = Request::builder()
                .method(method)
                .uri(subject.target("/items"))
                .header("idempotency-key", &key)
                .body(Body::empty())
                .unwrap();
            let answer = subject.send(request).await;
            assert_eq!(answer.status, StatusCode::CREATED, "{method}");
            assert!(!answer.is_replay());
            assert!(answer.header("idempotency-key-expires").is_none());
        }
        assert_eq!(subject.upstream().count(&key), 2, "{method}");
    }
}
