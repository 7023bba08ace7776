//! [`Idempotency`]: the service the layer wraps around an inner service. It carries out
//! the steps the outcome table (`outcome.rs`) decides: read the body, claim, run, store.

use std::borrow::Cow;
use std::fmt;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, response};
use http_body::Body;
use http_body_util::BodyExt;
use idem::{
    Begin, BoxError, Fingerprint, HoldOptions, Holder, Lease, ScopedKey, Store, StoreError, Stored,
    TimeoutStore,
};
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use crate::body::IdempotencyBody;
use crate::budget::{BodyBudget, Reserved};
use crate::extract::{ExtractKey, MakeScope};
use crate::fingerprint::request_fingerprint;
use crate::future::ResponseFuture;
use crate::outcome::{
    AfterRefusal, AfterRun, Arrival, Entry, Refused, Upstream, Waiting, after_refusal, after_run,
    on_arrival,
};
use crate::path::normalize_path;
use crate::policy::Config;
use crate::problem::{IdempotencyError, PROBLEM_JSON, set_expires};
use crate::stats::{Counter, IdempotencyStats};
use crate::{IDEMPOTENT_REPLAYED, IdempotencyLayer, NotSent};

/// First and longest pause between polls of the store while waiting for a request in flight.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_millis(250);
/// The `Retry-After` of a `503` for a spent body budget.
const OVERLOADED_RETRY_AFTER: Duration = Duration::from_secs(1);

/// What every service made by one layer shares.
pub(crate) struct Shared<St> {
    /// The store, every call under the policy's `store_timeout`.
    pub(crate) store: TimeoutStore<Arc<St>>,
    pub(crate) config: Arc<Config>,
    pub(crate) make_scope: Arc<dyn MakeScope>,
    pub(crate) extract_key: Arc<dyn ExtractKey>,
    pub(crate) stats: Arc<IdempotencyStats>,
    pub(crate) budget: BodyBudget,
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
/// carries [`NotSent`] (nothing left), else `502` `outcome-unknown`, stored and replayed,
/// because the request may have been processed. With axum, whose services never fail, it
/// never errors.
///
/// # Requirements
///
/// The inner service must be `Clone + Send + 'static` with `Send` futures: each keyed
/// request runs on its own tokio task (so must be called within a tokio runtime), detached
/// from the client, with a clone of the inner service. Request bodies of keyed requests are
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
        let path = normalize_path(parts.uri.path()).map(Cow::into_owned);
        let key = shared.extract_key.extract_key(&parts);
        let scope = matches!(key, Ok(Some(_))).then(|| shared.make_scope.make_scope(&parts));
        let arrival = Arrival {
            covered: true,
            path: path.as_ref().map(drop).map_err(Clone::clone),
            key,
            scope: scope.as_ref(),
        };
        match (on_arrival(config, arrival), path, scope) {
            (Entry::Keyed(key), Ok(path), Some(scope)) => {
                protect_relied_on_headers(config, &mut parts.headers);
                // The keyed path calls a clone (made ready on the task that uses it),
                // leaving `self.inner` ready for the next call.
                let inner = self.inner.clone();
                let key = ScopedKey::new(scope, key);
                ResponseFuture::managed(Box::pin(keyed(
                    Arc::clone(shared),
                    inner,
                    key,
                    Request::from_parts(parts, body),
                    path,
                )))
            }
            (Entry::Refuse(error), _, _) => {
                tracing::debug!(%error, "refused a keyed request");
                ResponseFuture::ready(problem(&error, None))
            }
            _ => ResponseFuture::passthrough(self.inner.call(Request::from_parts(parts, body))),
        }
    }
}

/// Removes, from the `Connection` header of a keyed request, the headers idem decided on
/// (the key, fingerprinted and scope headers): a proxy or server behind the layer would
/// otherwise drop them, and the inner service would see another request than idem did.
fn protect_relied_on_headers(config: &Config, headers: &mut HeaderMap) {
    if !headers.contains_key(CONNECTION) {
        return;
    }
    let kept: Vec<String> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty() && !config.relied_on(token))
        .map(str::to_owned)
        .collect();
    headers.remove(CONNECTION);
    if let Ok(value) = HeaderValue::from_str(&kept.join(", "))
        && !kept.is_empty()
    {
        headers.insert(CONNECTION, value);
    }
}

/// A keyed request, with its body read, ready to go to the inner service.
struct Job<S> {
    inner: S,
    parts: Parts,
    body: Bytes,
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
    key: ScopedKey,
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
            return problem(&error, None);
        }
    };
    let fingerprint = request_fingerprint(&shared.config, &parts, &path, &body);
    let policy = &shared.config.policy;
    let wait_until = Instant::now() + policy.wait_timeout;
    let mut backoff = FIRST_BACKOFF;
    let mut first_claim = true;
    let mut job = Job { inner, parts, body };
    loop {
        // The claim and the run share one task, so a client that goes away at any point
        // after this cannot leave a claimed key behind or cancel the inner call.
        let running = shared.stats.enter();
        // Boxed so that spawning moves a pointer, not the whole (large) future.
        let claim = Box::pin(attempt(Arc::clone(&shared), key.clone(), fingerprint, job));
        let task = tokio::spawn(async move {
            let attempt = claim.await;
            drop(running);
            attempt
        });
        let refusal = match task.await {
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
                    return problem(&error, None);
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
                return replay(&stored, expires_at);
            }
            (AfterRefusal::Mismatch, _) => {
                shared.stats.count(Counter::Mismatch);
                let expires = match shared.store.get(&key).await {
                    Ok(record) => record.map(|r| r.expires_at()),
                    Err(_) => None,
                };
                return problem(&IdempotencyError::Mismatch, expires);
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
                return problem(&IdempotencyError::InFlight { retry_after }, lease_end);
            }
            (AfterRefusal::ForwardUnprotected, Refusal::StoreFailed(source)) => {
                shared.stats.count(Counter::StoreError);
                shared.stats.count(Counter::FailOpen);
                tracing::warn!(error = %source, ?key, "idempotency store failed; forwarding unprotected (fail_open)");
                return forward_unprotected(job).await;
            }
            (_, refusal) => {
                let source = match refusal {
                    Refusal::StoreFailed(source) => source,
                    _ => StoreError::corrupt("the store's answer does not fit the claim"),
                };
                shared.stats.count(Counter::StoreError);
                tracing::warn!(error = %source, ?key, "idempotency store failed; answering 503");
                return problem(&IdempotencyError::StoreUnavailable { source }, None);
            }
        }
    }
}

/// Reads a keyed request's body whole, within `max_request_body`, `body_read_timeout`
/// and the shared body budget.
async fn read_body<St, B>(
    shared: &Shared<St>,
    headers: &HeaderMap,
    body: B,
) -> Result<(Bytes, Reserved), IdempotencyError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let policy = &shared.config.policy;
    let limit = policy.max_request_body;
    let declared = declared_length(headers);
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(IdempotencyError::BodyTooLarge { limit });
    }
    let overloaded = IdempotencyError::Overloaded {
        retry_after: OVERLOADED_RETRY_AFTER,
    };
    let room_until = shared.budget.deadline();
    let mut reserved = Reserved::default();
    if let Some(len) = declared
        && !shared
            .budget
            .grow(&mut reserved, len as usize, room_until)
            .await
    {
        return Err(overloaded);
    }
    let read_until = Instant::now() + policy.body_read_timeout;
    let mut body = pin!(body);
    let mut read = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout_at(read_until, body.frame()).await {
            Err(_) => {
                return Err(IdempotencyError::BodyTimeout {
                    after: policy.body_read_timeout,
                });
            }
            Ok(None) => break,
            Ok(Some(Err(source))) => {
                return Err(IdempotencyError::BodyUnreadable {
                    source: source.into(),
                });
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(mut data) = frame.into_data() else {
            continue;
        };
        let total = read.len() + data.remaining();
        if total > limit {
            return Err(IdempotencyError::BodyTooLarge { limit });
        }
        let missing = total.saturating_sub(reserved.bytes());
        if missing > 0 && !shared.budget.grow(&mut reserved, missing, room_until).await {
            return Err(overloaded);
        }
        while data.has_remaining() {
            let chunk = data.chunk();
            read.extend_from_slice(chunk);
            let len = chunk.len();
            data.advance(len);
        }
    }
    Ok((read.freeze(), reserved))
}

/// Claims the key; if acquired, runs the request and stores its outcome.
async fn attempt<S, St, ReqBody, ResBody>(
    shared: Arc<Shared<St>>,
    key: ScopedKey,
    fingerprint: Fingerprint,
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
            return Attempt::Ran(execute(&shared, key, claim, job).await);
        }
        Ok(Begin::Completed { stored, expires_at }) => Refusal::Completed { stored, expires_at },
        Ok(Begin::Mismatch) => Refusal::Mismatch,
        Ok(Begin::InFlight { retry_after }) => Refusal::InFlight { retry_after },
        Err(error) => Refusal::StoreFailed(error),
    };
    Attempt::Refused(refusal, job)
}

/// The response body read as far as storing needs.
enum Read<B: Body> {
    /// The whole body, within `max_stored_body`.
    Complete(response::Parts, Bytes),
    /// The body is larger than `max_stored_body`, or did not end within
    /// `upstream_timeout`: what was read, and the rest.
    NotKept(response::Parts, Bytes, std::pin::Pin<Box<B>>),
    /// The body failed after these bytes.
    Failed(response::Parts, Bytes, B::Error),
}

/// Runs a request whose key this process claimed with `lease`, then stores its outcome
/// (or releases or holds the key, as the outcome table says), and answers.
async fn execute<S, St, ReqBody, ResBody>(
    shared: &Shared<St>,
    key: ScopedKey,
    lease: Lease,
    job: Job<S>,
) -> Response<IdempotencyBody<ResBody>>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    St: Store,
    ReqBody: From<Bytes>,
    ResBody: Body<Data = Bytes>,
{
    shared.stats.count(Counter::Executed);
    let policy = &shared.config.policy;
    let holder = Holder::start(
        shared.store.clone(),
        key,
        lease,
        HoldOptions {
            complete_for: policy.complete_for,
            ..HoldOptions::new(policy.lease)
        },
    );
    let Job {
        mut inner,
        parts,
        body,
    } = job;
    let request = Request::from_parts(parts, ReqBody::from(body));
    let started = Instant::now();
    let deadline = started + policy.upstream_timeout;
    let call = async {
        match inner.ready().await {
            Ok(ready) => ready.call(request).await.map_err(Into::into),
            Err(error) => Err(error.into()),
        }
    };
    let answer = tokio::time::timeout_at(deadline, call).await;
    let upstream = match &answer {
        Err(_) => Upstream::TimedOut,
        Ok(Err(error)) if NotSent::is_in(&**error) => Upstream::NotSent,
        Ok(Err(_)) => Upstream::Failed,
        Ok(Ok(response)) => {
            shared.stats.observe_latency(started.elapsed());
            Upstream::Answered(response.status())
        }
    };
    let unknown = |answer: Result<Result<Response<ResBody>, BoxError>, _>| match answer {
        Ok(Err(source)) => IdempotencyError::OutcomeUnknown { source },
        _ => IdempotencyError::UpstreamTimeout {
            after: policy.upstream_timeout,
        },
    };
    let (mut response, stored) = match (after_run(&shared.config, upstream), answer) {
        (AfterRun::Release, answer) => {
            if let Err(error) = holder.release().await {
                // The key stays claimed until its lease ends; a retry then runs.
                shared.stats.count(Counter::StoreError);
                tracing::warn!(%error, "could not release an idempotency key");
            }
            return match answer {
                Ok(Ok(response)) => response.map(IdempotencyBody::passthrough),
                Ok(Err(source)) => {
                    tracing::warn!(error = %source, "upstream unreachable; the key was released");
                    problem(&IdempotencyError::UpstreamUnavailable { source }, None)
                }
                Err(elapsed) => problem(&unknown(Err(elapsed)), None),
            };
        }
        (AfterRun::Hold, answer) => {
            let error = unknown(answer);
            shared.stats.count(Counter::UnknownOutcome);
            tracing::warn!(%error, key = ?holder.key(), "unknown outcome; the key stays held until its lease ends");
            holder.hold();
            return problem(&error, None);
        }
        (AfterRun::Store, Ok(Ok(response))) => {
            let (parts, body) = response.into_parts();
            match read_for_storing(parts, body, policy.max_stored_body, deadline).await {
                Read::Complete(parts, bytes) => {
                    let stored = to_stored(&shared.config, &parts, Some(bytes.clone()));
                    (
                        Response::from_parts(parts, IdempotencyBody::full(bytes)),
                        stored,
                    )
                }
                Read::NotKept(parts, prefix, rest) => {
                    let stored = to_stored(&shared.config, &parts, None);
                    (
                        Response::from_parts(parts, IdempotencyBody::rest(prefix, rest)),
                        stored,
                    )
                }
                Read::Failed(parts, prefix, error) => {
                    tracing::warn!(key = ?holder.key(), "inner response body failed; keeping its status only");
                    let stored = to_stored(&shared.config, &parts, None);
                    (
                        Response::from_parts(parts, IdempotencyBody::failed(prefix, error)),
                        stored,
                    )
                }
            }
        }
        (AfterRun::Store, answer) => {
            let error = unknown(answer);
            shared.stats.count(Counter::UnknownOutcome);
            tracing::warn!(%error, key = ?holder.key(), "unknown outcome; storing it so that it never runs again");
            let answer = error.to_response();
            let mut stored = Stored::new(answer.status().as_u16())
                .with_header(CONTENT_TYPE.as_str(), PROBLEM_JSON)
                .with_body(answer.body().clone());
            stored.headers.shrink_to_fit();
            (answer.map(IdempotencyBody::full), stored)
        }
    };
    let key = holder.key().clone();
    match holder.complete(&stored, policy.retention).await {
        Ok(expires_at) => set_expires(response.headers_mut(), expires_at),
        Err(StoreError::LeaseLost) => {
            // Another claim took the key over after this lease ended: that request may
            // run the operation again; the forwarded key is the upstream's second line.
            shared.stats.count(Counter::LeaseLost);
            tracing::error!(?key, "lease lost before the response could be stored");
        }
        Err(error) => {
            // Never released: the key stays held until its lease ends.
            shared.stats.count(Counter::StoreError);
            shared.stats.count(Counter::NotStored);
            tracing::error!(%error, ?key, "could not store a completed response; the key stays held until its lease ends");
        }
    }
    response
}

/// The outcome kept for replay of a response with these parts.
fn to_stored(config: &Config, parts: &response::Parts, body: Option<Bytes>) -> Stored {
    let mut stored = Stored::new(parts.status.as_u16());
    for (name, value) in kept_headers(config, &parts.headers) {
        stored = stored.with_header(name, value);
    }
    match body {
        Some(bytes) => stored.with_body(bytes),
        None => stored.without_body(),
    }
}

/// Reads a response body up to `max_stored` bytes, until `deadline`.
async fn read_for_storing<B: Body<Data = Bytes>>(
    parts: response::Parts,
    body: B,
    max_stored: usize,
    deadline: Instant,
) -> Read<B> {
    let mut body = Box::pin(body);
    if body.size_hint().lower() > max_stored as u64 {
        return Read::NotKept(parts, Bytes::new(), body);
    }
    let mut read = BytesMut::new();
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Read::NotKept(parts, read.freeze(), body),
            Ok(None) => return Read::Complete(parts, read.freeze()),
            Ok(Some(Ok(frame))) => {
                // Trailers are not kept.
                if let Ok(data) = frame.into_data() {
                    read.extend_from_slice(&data);
                    if read.len() > max_stored {
                        return Read::NotKept(parts, read.freeze(), body);
                    }
                }
            }
            Ok(Some(Err(error))) => return Read::Failed(parts, read.freeze(), error),
        }
    }
}

/// The store failed and the policy says to go on without it.
async fn forward_unprotected<S, ReqBody, ResBody>(job: Job<S>) -> Response<IdempotencyBody<ResBody>>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ReqBody: From<Bytes>,
    ResBody: Body,
{
    let Job {
        mut inner,
        parts,
        body,
    } = job;
    let request = Request::from_parts(parts, ReqBody::from(body));
    let response = match inner.ready().await {
        Ok(ready) => ready.call(request).await,
        Err(error) => Err(error),
    };
    match response {
        Ok(response) => response.map(IdempotencyBody::passthrough),
        Err(error) => {
            let source: BoxError = error.into();
            let error = if NotSent::is_in(&*source) {
                IdempotencyError::UpstreamUnavailable { source }
            } else {
                IdempotencyError::OutcomeUnknown { source }
            };
            problem(&error, None)
        }
    }
}

/// The stored response, marked as a replay.
fn replay<B: Body>(stored: &Stored, expires_at: SystemTime) -> Response<IdempotencyBody<B>> {
    let Some(body) = &stored.body else {
        let error = IdempotencyError::ResponseNotKept {
            original_status: stored.status,
        };
        return problem(&error, Some(expires_at));
    };
    let Ok(status) = StatusCode::from_u16(stored.status) else {
        let source = StoreError::corrupt(format!("stored status {} is not HTTP", stored.status));
        return problem(&IdempotencyError::StoreUnavailable { source }, None);
    };
    let mut response = Response::new(IdempotencyBody::full(body.clone()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    for (name, value) in &stored.headers {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_maybe_shared(value.clone()),
        ) {
            (Ok(name), Ok(value)) => {
                headers.append(name, value);
            }
            _ => tracing::warn!(name, "skipped a stored header that is not valid HTTP"),
        }
    }
    headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    set_expires(headers, expires_at);
    response
}

fn problem<B: Body>(
    error: &IdempotencyError,
    expires: Option<SystemTime>,
) -> Response<IdempotencyBody<B>> {
    error
        .to_response_expiring(expires)
        .map(IdempotencyBody::full)
}

/// The request's `Content-Length`, when it has one that parses.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The response headers a replay carries.
fn kept_headers(config: &Config, headers: &HeaderMap) -> Vec<(String, Bytes)> {
    let named_by_connection: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    headers
        .iter()
        .filter(|(name, _)| {
            !never_kept(name) && !named_by_connection.contains(name) && config.replay.keeps(name)
        })
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                Bytes::copy_from_slice(value.as_bytes()),
            )
        })
        .collect()
}

/// Hop-by-hop headers, and the ones a replay sets itself.
fn never_kept(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "date"
            | "content-length"
            | "idempotent-replayed"
            | "idempotency-key-expires"
    ) || name.as_str().starts_with("proxy-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_own_headers_are_never_kept() {
        let config = crate::IdempotencyPolicy::default().compile().unwrap();
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("proxy-authenticate", "Basic"),
            ("transfer-encoding", "chunked"),
            ("date", "Thu, 01 Jan 2026 00:00:00 GMT"),
            ("content-length", "12"),
            ("idempotent-replayed", "true"),
            ("content-type", "application/json"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
            ("location", "/payments/1"),
        ] {
            headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        let kept: Vec<(String, String)> = kept_headers(&config, &headers)
            .into_iter()
            .map(|(n, v)| (n, String::from_utf8(v.to_vec()).unwrap()))
            .collect();
        let expected: Vec<(String, String)> = [
            ("content-type", "application/json"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
            ("location", "/payments/1"),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
        assert_eq!(kept, expected);
    }
}
