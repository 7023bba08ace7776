//! The layer under faults and hostile input (issue 8), in process: inner services that
//! fail after the request may have reached them, that never answer, that rate-limit;
//! stores that stall or will not take a completion; clients that stall their bodies,
//! change the method's case, or try to strip the key with `Connection`.
//!
//! Every test counts executions at the inner service.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use idem_core::testing::FaultyStore;
use idem_core::{MemoryStore, Store};
use idem_http::{
    BodyBudget, IdempotencyLayer, IdempotencyPolicy, NotSent, OnConflict, UnknownOutcome,
};
use tower::{BoxError, Layer, Service, ServiceExt};

/// What the inner service does on each call, by call number (1-based).
type Behaviour = Arc<dyn Fn(u64, &Request<Body>) -> Step + Send + Sync>;

#[derive(Clone)]
enum Step {
    Answer(u16),
    AnswerAfter(u16, Duration),
    /// Counted as an execution, then fails as a reset connection would.
    FailAfterRunning,
    /// Fails before anything was sent: not an execution.
    NotSent,
}

/// An inner service that counts the calls that may have had an effect.
#[derive(Clone)]
struct Inner {
    calls: Arc<AtomicU64>,
    executions: Arc<AtomicU64>,
    behaviour: Behaviour,
    seen_connection: Arc<std::sync::Mutex<Vec<Option<String>>>>,
}

impl Inner {
    fn new(behaviour: impl Fn(u64, &Request<Body>) -> Step + Send + Sync + 'static) -> Self {
        Self {
            calls: Arc::default(),
            executions: Arc::default(),
            behaviour: Arc::new(behaviour),
            seen_connection: Arc::default(),
        }
    }

    fn answering(status: u16) -> Self {
        Self::new(move |_, _| Step::Answer(status))
    }

    fn executions(&self) -> u64 {
        self.executions.load(Ordering::SeqCst)
    }
}

impl Service<Request<Body>> for Inner {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<Body>, BoxError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let step = (self.behaviour)(call, &request);
        self.seen_connection.lock().unwrap().push(
            request
                .headers()
                .get(http::header::CONNECTION)
                .map(|v| v.to_str().unwrap().to_owned()),
        );
        let executions = Arc::clone(&self.executions);
        Box::pin(async move {
            let answer = |status: u16, n: u64| {
                Response::builder()
                    .status(status)
                    .header("set-cookie", format!("session-of-execution={n}"))
                    .body(Body::from(format!("execution {n}")))
                    .unwrap()
            };
            match step {
                Step::Answer(status) => {
                    let n = executions.fetch_add(1, Ordering::SeqCst) + 1;
                    Ok(answer(status, n))
                }
                Step::AnswerAfter(status, after) => {
                    let n = executions.fetch_add(1, Ordering::SeqCst) + 1;
                    tokio::time::sleep(after).await;
                    Ok(answer(status, n))
                }
                Step::FailAfterRunning => {
                    executions.fetch_add(1, Ordering::SeqCst);
                    Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset).into())
                }
                Step::NotSent => Err(NotSent::new(std::io::Error::from(
                    std::io::ErrorKind::ConnectionRefused,
                ))
                .into()),
            }
        })
    }
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Answer {
    fn slug(&self) -> String {
        let problem: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_default();
        problem["type"]
            .as_str()
            .unwrap_or_default()
            .trim_start_matches(idem_http::DEFAULT_PROBLEM_TYPE_BASE)
            .to_owned()
    }

    fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

async fn send<S>(service: &S, request: Request<Body>) -> Answer
where
    S: Service<Request<Body>> + Clone,
    S::Response: Into<Response<idem_http::IdempotencyBody<Body>>>,
    S::Error: std::fmt::Debug,
{
    let response: Response<_> = service.clone().oneshot(request).await.unwrap().into();
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

fn post(key: Option<&str>) -> http::request::Builder {
    let builder = Request::post("/pay").header("authorization", "Bearer caller");
    match key {
        Some(key) => builder.header("idempotency-key", key),
        None => builder,
    }
}

fn keyed(key: &str) -> Request<Body> {
    post(Some(key)).body(Body::from("{}")).unwrap()
}

fn layer<St: Store>(store: St, policy: IdempotencyPolicy) -> IdempotencyLayer<St> {
    IdempotencyLayer::with_policy(store, policy).unwrap()
}

fn policy() -> IdempotencyPolicy {
    IdempotencyPolicy::default()
}

#[tokio::test]
async fn an_upstream_that_fails_after_running_is_never_run_again() {
    let inner = Inner::new(|_, _| Step::FailAfterRunning);
    let service = layer(MemoryStore::new(), policy()).layer(inner.clone());
    let first = send(&service, keyed("k")).await;
    assert_eq!(first.status, StatusCode::BAD_GATEWAY);
    assert_eq!(first.slug(), "outcome-unknown");
    let retry = send(&service, keyed("k")).await;
    assert_eq!(retry.status, StatusCode::BAD_GATEWAY);
    assert_eq!(retry.slug(), "outcome-unknown");
    assert!(
        retry.replayed(),
        "the unknown outcome is replayed, not rerun"
    );
    assert_eq!(inner.executions(), 1);
    assert_eq!(service.stats().unknown_outcomes(), 1);
}

#[tokio::test]
async fn a_waiting_duplicate_does_not_run_after_an_unknown_outcome() {
    // The first call sleeps, then fails after running.
    let slow_failure = Inner::new(|call, _| {
        if call == 1 {
            Step::FailAfterRunning
        } else {
            Step::Answer(201)
        }
    });
    let delayed = tower::service_fn({
        let slow_failure = slow_failure.clone();
        move |request: Request<Body>| {
            let mut slow_failure = slow_failure.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                slow_failure.call(request).await
            }
        }
    });
    let policy = IdempotencyPolicy {
        on_conflict: OnConflict::Wait,
        wait_timeout: Duration::from_secs(5),
        ..policy()
    };
    let service = layer(MemoryStore::new(), policy).layer(delayed);
    let (first, waiting) = tokio::join!(send(&service, keyed("k")), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        send(&service, keyed("k")).await
    });
    assert_eq!(first.slug(), "outcome-unknown");
    assert_eq!(waiting.slug(), "outcome-unknown");
    assert!(waiting.replayed());
    assert_eq!(slow_failure.executions(), 1);
}

#[tokio::test]
async fn a_request_that_never_left_releases_the_key() {
    let inner = Inner::new(|call, _| {
        if call == 1 {
            Step::NotSent
        } else {
            Step::Answer(201)
        }
    });
    let service = layer(MemoryStore::new(), policy()).layer(inner.clone());
    let first = send(&service, keyed("k")).await;
    assert_eq!(first.status, StatusCode::BAD_GATEWAY);
    assert_eq!(first.slug(), "upstream-unavailable");
    let retry = send(&service, keyed("k")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.replayed());
    assert_eq!(inner.executions(), 1);
}

#[tokio::test]
async fn an_upstream_that_never_answers_times_out_and_is_not_rerun() {
    let inner = Inner::new(|_, _| Step::AnswerAfter(201, Duration::from_secs(30)));
    let policy = IdempotencyPolicy {
        upstream_timeout: Duration::from_millis(200),
        ..policy()
    };
    let service = layer(MemoryStore::new(), policy).layer(inner.clone());
    let first = tokio::time::timeout(Duration::from_secs(5), send(&service, keyed("k")))
        .await
        .expect("upstream_timeout bounds the request");
    assert_eq!(first.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(first.slug(), "upstream-timeout");
    let retry = send(&service, keyed("k")).await;
    assert_eq!(retry.slug(), "upstream-timeout");
    assert!(retry.replayed());
    assert_eq!(inner.executions(), 1);
}

#[tokio::test]
async fn the_hold_policy_keeps_an_unknown_outcome_claimed_instead_of_storing_it() {
    let inner = Inner::new(|_, _| Step::FailAfterRunning);
    let policy = IdempotencyPolicy {
        unknown_outcome: UnknownOutcome::Hold,
        ..policy()
    };
    let service = layer(MemoryStore::new(), policy).layer(inner.clone());
    assert_eq!(send(&service, keyed("k")).await.slug(), "outcome-unknown");
    let retry = send(&service, keyed("k")).await;
    assert_eq!(retry.status, StatusCode::CONFLICT);
    assert_eq!(retry.slug(), "in-flight");
    assert_eq!(inner.executions(), 1);
}

#[tokio::test]
async fn rate_limited_and_not_processed_answers_release_the_key() {
    for status in [429u16, 408, 425, 503] {
        let inner = Inner::new(move |call, _| {
            if call == 1 {
                Step::Answer(status)
            } else {
                Step::Answer(201)
            }
        });
        let policy = IdempotencyPolicy {
            release_statuses: vec![503],
            ..policy()
        };
        let service = layer(MemoryStore::new(), policy).layer(inner.clone());
        let first = send(&service, keyed("k")).await;
        assert_eq!(first.status.as_u16(), status);
        assert!(first.header("idempotency-key-expires").is_none());
        let retry = send(&service, keyed("k")).await;
        assert_eq!(retry.status, StatusCode::CREATED, "after {status}");
        assert!(!retry.replayed());
    }
}

#[tokio::test]
async fn the_method_is_compared_as_frameworks_compare_it() {
    let inner = Inner::answering(201);
    let policy = IdempotencyPolicy {
        key_required: true,
        ..policy()
    };
    let service = layer(MemoryStore::new(), policy).layer(inner.clone());
    let lower = || {
        Request::builder()
            .method("post")
            .uri("/pay")
            .header("authorization", "Bearer caller")
            .header("idempotency-key", "k")
            .body(Body::from("{}"))
            .unwrap()
    };
    assert_eq!(send(&service, lower()).await.status, StatusCode::CREATED);
    let retry = send(&service, lower()).await;
    assert!(retry.replayed(), "`post` is `POST`");
    // The upper-case spelling is the same request too.
    assert!(send(&service, keyed("k")).await.replayed());
    let keyless = Request::builder()
        .method("post")
        .uri("/pay")
        .body(Body::from("{}"))
        .unwrap();
    assert_eq!(send(&service, keyless).await.slug(), "missing-key");
    assert_eq!(inner.executions(), 1);
}

#[test]
fn policy_methods_are_normalised_and_safe_ones_refused_in_any_case() {
    let lower = IdempotencyPolicy {
        methods: vec!["post".into(), "Put".into()],
        ..policy()
    };
    lower.validate().unwrap();
    for safe in ["get", "Head", "options", "TRACE"] {
        let refused = IdempotencyPolicy {
            methods: vec![safe.into()],
            ..policy()
        };
        assert_eq!(refused.validate().unwrap_err().field(), "methods", "{safe}");
    }
}

#[tokio::test]
async fn connection_cannot_strip_the_headers_idem_decided_on() {
    let inner = Inner::answering(201);
    let service = layer(MemoryStore::new(), policy()).layer(inner.clone());
    let request = post(Some("k"))
        .header("connection", "idempotency-key, Content-Type, x-trace")
        .header("connection", "authorization")
        .header("content-type", "application/json")
        .body(Body::from("{}"))
        .unwrap();
    assert_eq!(send(&service, request).await.status, StatusCode::CREATED);
    let seen = inner.seen_connection.lock().unwrap().clone();
    assert_eq!(seen, vec![Some("x-trace".to_owned())]);
}

/// A body that sends `first` and then nothing, forever.
fn stalled_body(first: usize) -> Body {
    let chunk = Bytes::from(vec![b'x'; first]);
    let stream = futures_util::stream::once(async move { Ok::<_, Infallible>(chunk) })
        .chain(futures_util::stream::pending());
    Body::from_stream(stream)
}

use futures_util::StreamExt as _;

#[tokio::test]
async fn a_body_that_stalls_is_answered_408_and_nothing_runs() {
    let inner = Inner::answering(201);
    let policy = IdempotencyPolicy {
        body_read_timeout: Duration::from_millis(200),
        ..policy()
    };
    let service = layer(MemoryStore::new(), policy).layer(inner.clone());
    let request = post(Some("k")).body(stalled_body(1000)).unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), send(&service, request))
        .await
        .expect("body_read_timeout bounds the read");
    assert_eq!(answer.status, StatusCode::REQUEST_TIMEOUT);
    assert_eq!(answer.slug(), "body-timeout");
    assert_eq!(inner.executions(), 0);
    // Nothing was claimed: the key is free.
    assert_eq!(send(&service, keyed("k")).await.status, StatusCode::CREATED);
}

#[tokio::test]
async fn buffered_bodies_share_a_budget_and_excess_is_answered_503() {
    let inner = Inner::answering(201);
    let policy = IdempotencyPolicy {
        body_read_timeout: Duration::from_secs(5),
        ..policy()
    };
    let budget = BodyBudget::new(10_000, Duration::from_millis(100));
    let service = layer(MemoryStore::new(), policy)
        .body_budget(budget.clone())
        .layer(inner.clone());
    // Slow clients fill the budget...
    let stalled: Vec<_> = (0..3)
        .map(|i| {
            let service = service.clone();
            tokio::spawn(async move {
                let request = post(Some(&format!("slow-{i}")))
                    .body(stalled_body(3_000))
                    .unwrap();
                send(&service, request).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        budget.available() <= 1_000,
        "{} bytes left",
        budget.available()
    );
    // ... and the next body that does not fit waits briefly, then is refused.
    let request = post(Some("late"))
        .body(Body::from(vec![b'y'; 2_000]))
        .unwrap();
    let answer = send(&service, request).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.slug(), "overloaded");
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert_eq!(inner.executions(), 0);
    for task in stalled {
        task.abort();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        budget.available(),
        10_000,
        "aborted requests give their bytes back"
    );
    let request = post(Some("late"))
        .body(Body::from(vec![b'y'; 2_000]))
        .unwrap();
    assert_eq!(send(&service, request).await.status, StatusCode::CREATED);
}

#[tokio::test]
async fn cookie_sessions_are_separate_callers() {
    let inner = Inner::answering(201);
    let service = layer(MemoryStore::new(), policy()).layer(inner.clone());
    let as_user = |session: &str| {
        Request::post("/pay")
            .header("idempotency-key", "same-key")
            .header("cookie", format!("theme=dark; session={session}"))
            .body(Body::from("{}"))
            .unwrap()
    };
    let alice = send(&service, as_user("alice")).await;
    let bob = send(&service, as_user("bob")).await;
    assert!(!bob.replayed(), "bob must not get alice's answer");
    assert_ne!(alice.header("set-cookie"), bob.header("set-cookie"));
    assert!(send(&service, as_user("alice")).await.replayed());
    assert_eq!(inner.executions(), 2);
}

#[tokio::test]
async fn a_named_cookie_is_the_identity_whatever_other_cookies_do() {
    let inner = Inner::answering(201);
    let policy = IdempotencyPolicy {
        scope_sources: vec!["authorization".into(), "cookie:session".into()],
        ..policy()
    };
    let service = layer(MemoryStore::new(), policy).layer(inner.clone());
    let with_cookies = |cookies: &str| {
        Request::post("/pay")
            .header("idempotency-key", "k")
            .header("cookie", cookies.to_owned())
            .body(Body::from("{}"))
            .unwrap()
    };
    send(&service, with_cookies("csrf=1; session=s1")).await;
    assert!(
        send(&service, with_cookies("session=s1; csrf=2"))
            .await
            .replayed()
    );
    assert!(!send(&service, with_cookies("session=s2")).await.replayed());
}

#[tokio::test]
async fn scope_required_refuses_callers_without_identity() {
    let inner = Inner::answering(201);
    let policy = IdempotencyPolicy {
        scope_required: true,
        ..policy()
    };
    let service = layer(MemoryStore::new(), policy).layer(inner.clone());
    let anonymous = Request::post("/pay")
        .header("idempotency-key", "k")
        .body(Body::from("{}"))
        .unwrap();
    let answer = send(&service, anonymous).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.slug(), "missing-identity");
    assert_eq!(send(&service, keyed("k")).await.status, StatusCode::CREATED);
    assert_eq!(inner.executions(), 1);
}

#[tokio::test]
async fn the_scope_secret_changes_the_stored_scope() {
    let store = Arc::new(MemoryStore::new());
    let inner = Inner::answering(201);
    let plain = layer(Arc::clone(&store), policy()).layer(inner.clone());
    let keyed_with_secret = layer(Arc::clone(&store), policy())
        .scope_secret("a secret of sixteen bytes or more")
        .layer(inner.clone());
    send(&plain, keyed("k")).await;
    assert!(
        !send(&keyed_with_secret, keyed("k")).await.replayed(),
        "the same credential hashes to another scope under another secret"
    );
    assert_eq!(inner.executions(), 2);
}

#[tokio::test]
async fn in_flight_retry_after_is_a_usable_hint_not_the_lease() {
    let inner = Inner::new(|_, _| Step::AnswerAfter(201, Duration::from_millis(500)));
    let service = layer(MemoryStore::new(), policy()).layer(inner.clone());
    let (_, second) = tokio::join!(send(&service, keyed("k")), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        send(&service, keyed("k")).await
    });
    assert_eq!(second.status, StatusCode::CONFLICT);
    assert_eq!(
        second.header("retry-after"),
        Some("1"),
        "not the 60 s lease"
    );
}

#[tokio::test]
async fn a_completion_the_store_refuses_for_a_while_is_retried_until_kept() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    store.fail_next_completes(4);
    let inner = Inner::answering(201);
    let service = layer(Arc::clone(&store), policy()).layer(inner.clone());
    let first = send(&service, keyed("k")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(
        first.header("idempotency-key-expires").is_some(),
        "stored, then returned"
    );
    let retry = send(&service, keyed("k")).await;
    assert!(retry.replayed());
    assert_eq!(store.completes(), 5);
    assert_eq!(inner.executions(), 1);
}

#[tokio::test]
async fn a_completion_that_cannot_be_kept_leaves_the_key_held_never_released() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    store.fail_next_completes(u32::MAX);
    let inner = Inner::answering(201);
    let policy = IdempotencyPolicy {
        complete_for: Duration::from_millis(300),
        ..policy()
    };
    let layer = layer(Arc::clone(&store), policy);
    let service = layer.layer(inner.clone());
    let first = send(&service, keyed("k")).await;
    assert_eq!(
        first.status,
        StatusCode::CREATED,
        "the client still gets its answer"
    );
    let retry = send(&service, keyed("k")).await;
    assert_eq!(retry.slug(), "in-flight");
    assert_eq!(inner.executions(), 1);
    assert_eq!(layer.stats().not_stored(), 1);
}

#[tokio::test]
async fn a_stalled_store_is_answered_503_within_store_timeout() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    store.stall_begins(true);
    let inner = Inner::answering(201);
    let policy = IdempotencyPolicy {
        store_timeout: Duration::from_millis(200),
        ..policy()
    };
    let service = layer(Arc::clone(&store), policy).layer(inner.clone());
    let answer = tokio::time::timeout(Duration::from_secs(5), send(&service, keyed("k")))
        .await
        .expect("store_timeout bounds the claim");
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.slug(), "store-unavailable");
    assert_eq!(inner.executions(), 0);
}

#[tokio::test]
async fn a_call_longer_than_the_lease_keeps_its_key() {
    let inner = Inner::new(|_, _| Step::AnswerAfter(201, Duration::from_millis(900)));
    let policy = IdempotencyPolicy {
        lease: Duration::from_millis(300),
        ..policy()
    };
    let service = layer(MemoryStore::new(), policy).layer(inner.clone());
    let (first, during) = tokio::join!(send(&service, keyed("k")), async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        send(&service, keyed("k")).await
    });
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(during.slug(), "in-flight");
    assert_eq!(inner.executions(), 1);
}

#[test]
fn durations_that_would_overflow_are_refused_by_validation() {
    let absurd: IdempotencyPolicy =
        serde_json::from_str(r#"{"retention": "400000000000y"}"#).unwrap();
    assert_eq!(absurd.validate().unwrap_err().field(), "retention");
    let absurd: IdempotencyPolicy = serde_json::from_str(r#"{"lease": "1000y"}"#).unwrap();
    assert_eq!(absurd.validate().unwrap_err().field(), "lease");
    let zero: IdempotencyPolicy = serde_json::from_str(r#"{"upstream_timeout": "0s"}"#).unwrap();
    assert_eq!(zero.validate().unwrap_err().field(), "upstream_timeout");
    let not_a_release: IdempotencyPolicy =
        serde_json::from_str(r#"{"release_statuses": [200]}"#).unwrap();
    assert_eq!(
        not_a_release.validate().unwrap_err().field(),
        "release_statuses"
    );
}
