//! [`Idempotency`]: the service the layer wraps around an inner service. It carries out
//! the steps the outcome table (`outcome.rs`) decides: read the body, claim, run, store.

use std::borrow::Cow;
use std::fmt;
use std::future::Future as _;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use idem_core::{
    Begin, BoxError, Fingerprint, Scope, ScopedKey, Store, StoreError, Stored, TimeoutStore,
};
use tokio::time::Instant;
use tower::Service;

use crate::IdempotencyLayer;
use crate::body::IdempotencyBody;
use crate::budget::BodyBudget;
use crate::execute::{Job, execute, forward_unprotected};
use crate::extract::{ExtractKey, MakeScope};
use crate::fingerprint::{derived_key, request_fingerprint};
use crate::future::ResponseFuture;
use crate::outcome::{AfterRefusal, Arrival, Entry, Refused, Waiting, after_refusal, on_arrival};
use crate::path::normalize_path;
use crate::policy::Config;
use crate::problem::IdempotencyError;
use crate::replay::{problem, replay};
use crate::request::{protect_relied_on_headers, read_body};
use crate::stats::{
    Counter, IdempotencyStats, Outcome, RequestLabel, Throttle, UpstreamTook, finish, marked,
};

/// First and longest pause between polls of the store while waiting for a request in flight.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_millis(250);

/// What every service made by one layer shares.
pub(crate) struct Shared<St> {
    /// The store, every call under the policy's `store_timeout`.
    pub(crate) store: TimeoutStore<Arc<St>>,
    pub(crate) config: Arc<Config>,
    pub(crate) make_scope: Arc<dyn MakeScope>,
    pub(crate) extract_key: Arc<dyn ExtractKey>,
    pub(crate) stats: Arc<IdempotencyStats>,
    pub(crate) budget: BodyBudget,
    /// The store-failure warnings: one a second at most, since a full or unreachable store
    /// fails every request at once.
    pub(crate) store_warnings: Throttle,
}

/// A service that makes the keyed requests of its inner service take effect exactly once.
/// Made by [`IdempotencyLayer`]; see the [crate docs](crate) for what it does.
///
/// # Errors
///
/// Its error type is the inner service's, but it only ever returns one for a request it
/// passes through untouched (an unprotected method, or no key where the key is optional)
/// and from [`poll_ready`](Service::poll_ready). For a keyed request an inner error becomes
/// a problem response: `502` `upstream-unavailable` with the key released when the error
/// carries [`NotSent`](crate::NotSent) (nothing left), else `502` `outcome-unknown`, stored
/// and replayed, because the request may have been processed. With axum, whose services
/// never fail, it never errors.
///
/// # Requirements
///
/// The inner service must be `Clone + Send + 'static` with `Send` futures: each keyed
/// request runs on its own tokio task (so must be called within a tokio runtime), detached
/// from the client, with a clone of the inner service; only one whose claim is answered at
/// once without running anything (a replay from an in-process store) is answered on the
/// caller's task. Request bodies of keyed requests are
/// read whole and rebuilt with `From<Bytes>` (axum's `Body` does this; for hyper's
/// `Incoming`, map requests to `axum::body::Body` or another such body first).
///
/// If the inner service panics, the panic is resumed in the response future, and the key
/// stays claimed until its lease ends (the operation may or may not have taken effect).
pub struct Idempotency<S, St> {
    inner: S,
    shared: Arc<Shared<St>>,
}

impl<S, St: Store> Idempotency<S, St> {
    /// Wraps `inner` with the default policy; the same as
    /// `IdempotencyLayer::new(store).layer(inner)`.
    pub fn new(inner: S, store: St) -> Self {
        tower::Layer::layer(&IdempotencyLayer::new(store), inner)
    }
}

impl<S, St> Idempotency<S, St> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared<St>>) -> Self {
        Self { inner, shared }
    }

    /// The counters shared by every service of this service's layer.
    pub fn stats(&self) -> &Arc<IdempotencyStats> {
        &self.shared.stats
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, St> Clone for Idempotency<S, St> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug, St: fmt::Debug> fmt::Debug for Idempotency<S, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .field("store", self.shared.store.get_ref())
            .field("policy", &self.shared.config.policy)
            .finish_non_exhaustive()
    }
}

impl<S, St, ReqBody, ResBody> Service<Request<ReqBody>> for Idempotency<S, St>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    St: Store,
    ReqBody: Body + From<Bytes> + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send + 'static,
{
    type Response = Response<IdempotencyBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let shared = &self.shared;
        let config = &shared.config;
        if !config.covers(request.method()) {
            return ResponseFuture::passthrough(self.inner.call(request));
        }
        let (mut parts, body) = request.into_parts();
        // Only a path with escapes is decoded into a copy; the raw path is copied only for a
        // keyed request, which keeps it. A pass-through allocates nothing here.
        let decoded = normalize_path(parts.uri.path()).map(|path| match path {
            Cow::Owned(decoded) => Some(decoded),
            Cow::Borrowed(_) => None,
        });
        let key = shared.extract_key.extract_key(&parts);
        let claims = match &key {
            Ok(Some(_)) => true,
            Ok(None) => config.derives_keys(),
            Err(_) => false,
        };
        let scope = claims.then(|| shared.make_scope.make_scope(&parts));
        let arrival = Arrival {
            covered: true,
            path: decoded.as_ref().map(drop).map_err(Clone::clone),
            key,
            scope: scope.as_ref(),
        };
        let entry = on_arrival(config, arrival);
        let started = Instant::now();
        let derived = matches!(entry, Entry::Derive);
        let name = match (entry, scope) {
            (Entry::Keyed(key), Some(scope)) => Ok(Name::Given(ScopedKey::new(scope, key))),
            (Entry::Derive, Some(scope)) => Ok(Name::Derived(scope)),
            (entry, scope) => Err((entry, scope)),
        };
        match (name, decoded) {
            (Ok(name), Ok(decoded)) => {
                let label = match &name {
                    Name::Given(key) => {
                        RequestLabel::new(&parts.method, Some(key.scope()), Some(key), false)
                    }
                    Name::Derived(scope) => {
                        RequestLabel::new(&parts.method, Some(scope), None, derived)
                    }
                };
                let path = decoded.unwrap_or_else(|| parts.uri.path().to_owned());
                protect_relied_on_headers(config, &mut parts.headers);
                // The keyed path calls a clone (made ready on the task that uses it),
                // leaving `self.inner` ready for the next call.
                let inner = self.inner.clone();
                let shared = Arc::clone(shared);
                ResponseFuture::managed(Box::pin(async move {
                    let response = keyed(
                        Arc::clone(&shared),
                        inner,
                        name,
                        Request::from_parts(parts, body),
                        path,
                    )
                    .await;
                    let outcome = response.extensions().get::<Outcome>().copied();
                    let upstream = response
                        .extensions()
                        .get::<UpstreamTook>()
                        .map(|took| took.0);
                    finish(
                        &shared.stats,
                        &label,
                        outcome.unwrap_or(Outcome::Executed),
                        response.status(),
                        started.elapsed(),
                        upstream,
                    );
                    response
                }))
            }
            (Err((Entry::Refuse(error), scope)), _) => {
                let label = RequestLabel::new(&parts.method, scope.as_ref(), None, derived);
                tracing::debug!(%error, "refused a keyed request");
                let response = problem(&shared.config, &error, None);
                let outcome = Outcome::of(&error);
                finish(
                    &shared.stats,
                    &label,
                    outcome,
                    response.status(),
                    started.elapsed(),
                    None,
                );
                ResponseFuture::ready(marked(response, outcome))
            }
            _ => ResponseFuture::passthrough(self.inner.call(Request::from_parts(parts, body))),
        }
    }
}

/// What names the record of a request the layer claims.
enum Name {
    /// The request's own key, in the caller's scope.
    Given(ScopedKey),
    /// No key of its own: the key is derived from the fingerprint once the body is read,
    /// for this caller's scope.
    Derived(Scope),
}

/// What one claim of the key led to.
enum Attempt<S, B: Body> {
    /// The key was acquired and the request ran: this is its answer.
    Ran(Response<IdempotencyBody<B>>),
    /// The key was not acquired; the job comes back unrun.
    Refused(Refusal, Job<S>),
}

enum Refusal {
    Completed {
        stored: Arc<Stored>,
        expires_at: SystemTime,
    },
    Mismatch,
    InFlight {
        retry_after: Duration,
    },
    StoreFailed(StoreError),
}

impl Refusal {
    fn kind(&self) -> Refused {
        match self {
            Self::Completed { .. } => Refused::Completed,
            Self::Mismatch => Refused::Mismatch,
            Self::InFlight { retry_after } => Refused::InFlight {
                lease_left: *retry_after,
            },
            Self::StoreFailed(_) => Refused::StoreFailed,
        }
    }
}

/// Everything after the key was found: read the body, claim, run or answer.
async fn keyed<S, St, ReqBody, ResBody>(
    shared: Arc<Shared<St>>,
    inner: S,
    name: Name,
    request: Request<ReqBody>,
    path: String,
) -> Response<IdempotencyBody<ResBody>>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    St: Store,
    ReqBody: Body + From<Bytes> + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send + 'static,
{
    let (parts, body) = request.into_parts();
    // Held until the request is answered: the body's bytes live that long.
    let (body, _reserved) = match read_body(&shared, &parts.headers, body).await {
        Ok(read) => read,
        Err(error) => {
            if matches!(error, IdempotencyError::Overloaded { .. }) {
                shared.stats.count(Counter::Overloaded);
            }
            return marked(problem(&shared.config, &error, None), Outcome::of(&error));
        }
    };
    let fingerprint = request_fingerprint(&shared.config, &parts, &path, &body);
    let policy = &shared.config.policy;
    let (key, retention) = match name {
        Name::Given(key) => (key, policy.retention),
        Name::Derived(scope) => {
            shared.stats.count(Counter::Derived);
            (derived_key(&scope, &fingerprint), policy.fingerprint_window)
        }
    };
    let wait_until = Instant::now() + policy.wait_timeout;
    let mut backoff = FIRST_BACKOFF;
    let mut first_claim = true;
    let mut job = Job { inner, parts, body };
    loop {
        let running = shared.stats.enter();
        // Boxed so that spawning moves a pointer, not the whole (large) future.
        let mut claim = Box::pin(attempt(
            Arc::clone(&shared),
            key.clone(),
            fingerprint,
            retention,
            job,
        ));
        // Its first step runs here: a store that answers at once (a replay from memory)
        // needs no task of its own. Once it waits, the rest runs on its own task, spawned
        // within this same poll, so a client that goes away at any point cannot leave a
        // claimed key behind or cancel the inner call: the claim and the run are never
        // dropped half-way.
        let first = std::future::poll_fn(|cx| Poll::Ready(claim.as_mut().poll(cx))).await;
        let answer = match first {
            Poll::Ready(attempt) => {
                drop(running);
                Ok(attempt)
            }
            Poll::Pending => {
                tokio::spawn(async move {
                    let attempt = claim.await;
                    drop(running);
                    attempt
                })
                .await
            }
        };
        let refusal = match answer {
            Ok(Attempt::Ran(response)) => return response,
            Ok(Attempt::Refused(refusal, returned)) => {
                job = returned;
                refusal
            }
            Err(error) => match error.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                // The runtime is shutting down: the request may have been sent.
                Err(cancelled) => {
                    let error = IdempotencyError::OutcomeUnknown {
                        source: cancelled.into(),
                    };
                    return marked(
                        problem(&shared.config, &error, None),
                        Outcome::UnknownOutcome,
                    );
                }
            },
        };
        let waiting = Waiting {
            first_claim,
            wait_left: wait_until.saturating_duration_since(Instant::now()),
            backoff,
            observed_latency: shared.stats.observed_latency(),
        };
        match (
            after_refusal(&shared.config, refusal.kind(), waiting),
            refusal,
        ) {
            (AfterRefusal::Replay, Refusal::Completed { stored, expires_at }) => {
                shared.stats.count(Counter::Replayed);
                return marked(
                    replay(&shared.config, &stored, expires_at),
                    Outcome::Replayed,
                );
            }
            (AfterRefusal::Mismatch, _) => {
                shared.stats.count(Counter::Mismatch);
                let expires = match shared.store.get(&key).await {
                    Ok(record) => record.map(|r| r.expires_at()),
                    Err(_) => None,
                };
                return marked(
                    problem(&shared.config, &IdempotencyError::Mismatch, expires),
                    Outcome::Mismatch,
                );
            }
            (AfterRefusal::WaitThenRetry(pause), _) => {
                tokio::time::sleep(pause).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                first_claim = false;
            }
            (AfterRefusal::Conflict { retry_after }, refusal) => {
                shared.stats.count(Counter::InFlight);
                let lease_end = match refusal {
                    Refusal::InFlight { retry_after: left } => SystemTime::now().checked_add(left),
                    _ => None,
                };
                return marked(
                    problem(
                        &shared.config,
                        &IdempotencyError::InFlight { retry_after },
                        lease_end,
                    ),
                    Outcome::InFlight,
                );
            }
            (AfterRefusal::ForwardUnprotected, Refusal::StoreFailed(source)) => {
                shared.stats.count(Counter::StoreError);
                shared.stats.count(Counter::FailOpen);
                if let Some(held_back) = shared.store_warnings.due() {
                    tracing::warn!(error = %source, key = %key.log_id(), held_back, "idempotency store failed; forwarding unprotected (fail_open; at most one such line a second, held_back: since the last)");
                }
                return marked(
                    forward_unprotected(&shared.config, job).await,
                    Outcome::FailOpen,
                );
            }
            (_, refusal) => {
                let source = match refusal {
                    Refusal::StoreFailed(source) => source,
                    _ => StoreError::corrupt("the store's answer does not fit the claim"),
                };
                shared.stats.count(Counter::StoreError);
                if let Some(held_back) = shared.store_warnings.due() {
                    tracing::warn!(error = %source, key = %key.log_id(), held_back, "idempotency store failed; answering 503 (at most one such line a second, held_back: since the last)");
                }
                return marked(
                    problem(
                        &shared.config,
                        &IdempotencyError::StoreUnavailable { source },
                        None,
                    ),
                    Outcome::StoreUnavailable,
                );
            }
        }
    }
}

/// Claims the key; if acquired, runs the request and stores its outcome for `retention`.
async fn attempt<S, St, ReqBody, ResBody>(
    shared: Arc<Shared<St>>,
    key: ScopedKey,
    fingerprint: Fingerprint,
    retention: Duration,
    job: Job<S>,
) -> Attempt<S, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError> + Send,
    St: Store,
    ReqBody: From<Bytes> + Send,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send,
{
    let lease = shared.config.policy.lease;
    let refusal = match shared.store.begin(&key, &fingerprint, lease).await {
        Ok(Begin::Acquired(claim)) => {
            return Attempt::Ran(execute(&shared, key, claim, retention, job).await);
        }
        Ok(Begin::Completed { stored, expires_at }) => Refusal::Completed { stored, expires_at },
        Ok(Begin::Mismatch) => Refusal::Mismatch,
        Ok(Begin::InFlight { retry_after }) => Refusal::InFlight { retry_after },
        Err(error) => Refusal::StoreFailed(error),
    };
    Attempt::Refused(refusal, job)
}
