//! [`Idempotency`]: the service the layer wraps around an inner service.

use std::fmt;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, response};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use idem::{Begin, BoxError, Fingerprint, ScopedKey, Store, StoreError, Stored, Token};
use tokio::time::{Instant, MissedTickBehavior};
use tower::{Service, ServiceExt};

use crate::body::IdempotencyBody;
use crate::extract::{ExtractKey, MakeScope};
use crate::fingerprint::request_fingerprint;
use crate::future::ResponseFuture;
use crate::policy::{Config, OnConflict};
use crate::problem::{IdempotencyError, set_expires};
use crate::stats::{Counter, IdempotencyStats};
use crate::{IDEMPOTENT_REPLAYED, IdempotencyLayer};

/// First and longest pause between polls of the store while waiting for a request in flight.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_millis(250);

/// What every service made by one layer shares.
pub(crate) struct Shared<St> {
    pub(crate) store: Arc<St>,
    pub(crate) config: Arc<Config>,
    pub(crate) make_scope: Arc<dyn MakeScope>,
    pub(crate) extract_key: Arc<dyn ExtractKey>,
    pub(crate) stats: Arc<IdempotencyStats>,
}

/// A service that makes the keyed requests of its inner service take effect exactly once.
/// Made by [`IdempotencyLayer`]; see the [crate docs](crate) for what it does.
///
/// # Errors
///
/// Its error type is the inner service's, but it only ever returns one for a request it
/// passes through untouched (an unprotected method, or no key where the key is optional)
/// and from [`poll_ready`](Service::poll_ready). For a keyed request, an inner error (an
/// upstream that could not be reached) becomes a `502` problem response and the key is
/// released, so a retry may run. With axum, whose services never fail, it never errors.
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
            .field("store", &self.shared.store)
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
        let config = &self.shared.config;
        if !config.covers(request.method()) {
            return ResponseFuture::passthrough(self.inner.call(request));
        }
        let (parts, body) = request.into_parts();
        let key = match self.shared.extract_key.extract_key(&parts) {
            Ok(Some(key)) => key,
            Ok(None) if !config.policy.key_required => {
                return ResponseFuture::passthrough(
                    self.inner.call(Request::from_parts(parts, body)),
                );
            }
            Ok(None) => {
                let error = IdempotencyError::MissingKey {
                    header: config.header.clone(),
                };
                return ResponseFuture::ready(problem(&error, None));
            }
            Err(error) => {
                tracing::debug!(%error, "refused an idempotency key");
                return ResponseFuture::ready(problem(&error, None));
            }
        };
        let key = ScopedKey::new(self.shared.make_scope.make_scope(&parts), key);
        // The keyed path calls a clone (made ready on the task that uses it), leaving
        // `self.inner` ready for the next call.
        let inner = self.inner.clone();
        ResponseFuture::managed(Box::pin(keyed(
            Arc::clone(&self.shared),
            inner,
            key,
            parts,
            body,
        )))
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

/// Everything after the key was found: read the body, claim, run or answer.
async fn keyed<S, St, ReqBody, ResBody>(
    shared: Arc<Shared<St>>,
    inner: S,
    key: ScopedKey,
    parts: Parts,
    body: ReqBody,
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
    let policy = &shared.config.policy;
    let limit = policy.max_request_body;
    if declared_length(&parts.headers).is_some_and(|len| len > limit as u64) {
        return problem(&IdempotencyError::BodyTooLarge { limit }, None);
    }
    let body = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<LengthLimitError>() => {
            return problem(&IdempotencyError::BodyTooLarge { limit }, None);
        }
        Err(source) => return problem(&IdempotencyError::BodyUnreadable { source }, None),
    };
    let fingerprint = request_fingerprint(&shared.config, &parts, &body);

    let deadline = Instant::now() + policy.wait_timeout;
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
                Err(cancelled) => {
                    let error = IdempotencyError::UpstreamUnavailable {
                        source: cancelled.into(),
                    };
                    return problem(&error, None);
                }
            },
        };
        match refusal {
            Refusal::Completed { stored, expires_at } => {
                shared.stats.count(Counter::Replayed);
                return replay(&stored, expires_at);
            }
            Refusal::Mismatch => {
                shared.stats.count(Counter::Mismatch);
                let expires = match shared.store.get(&key).await {
                    Ok(record) => record.map(|r| r.expires_at()),
                    Err(_) => None,
                };
                return problem(&IdempotencyError::Mismatch, expires);
            }
            Refusal::InFlight { retry_after } => {
                let now = Instant::now();
                if policy.on_conflict == OnConflict::Wait && now < deadline {
                    tokio::time::sleep(backoff.min(deadline - now)).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    first_claim = false;
                    continue;
                }
                shared.stats.count(Counter::InFlight);
                let lease_end = SystemTime::now() + retry_after;
                return problem(&IdempotencyError::InFlight { retry_after }, Some(lease_end));
            }
            Refusal::StoreFailed(source) => {
                shared.stats.count(Counter::StoreError);
                if first_claim && policy.fail_open {
                    tracing::warn!(error = %source, ?key, "idempotency store failed; forwarding unprotected (fail_open)");
                    shared.stats.count(Counter::FailOpen);
                    return forward_unprotected(job).await;
                }
                tracing::warn!(error = %source, ?key, "idempotency store failed; answering 503");
                return problem(&IdempotencyError::StoreUnavailable { source }, None);
            }
        }
    }
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
            return Attempt::Ran(execute(&shared, &key, claim.token, job).await);
        }
        Ok(Begin::Completed { stored, expires_at }) => Refusal::Completed { stored, expires_at },
        Ok(Begin::Mismatch) => Refusal::Mismatch,
        Ok(Begin::InFlight { retry_after }) => Refusal::InFlight { retry_after },
        Err(error) => Refusal::StoreFailed(error),
    };
    Attempt::Refused(refusal, job)
}

/// How the inner call went, with the response body read as far as storing needs.
enum Ran<B: Body> {
    /// The inner service failed without a response.
    Failed(BoxError),
    /// A `5xx` the policy does not store; its body is untouched.
    Released(response::Parts, B),
    /// The whole body, within `max_stored_body`.
    Complete(response::Parts, Bytes),
    /// The body is larger than `max_stored_body`: what was read, and the rest.
    TooLarge(response::Parts, Bytes, Pin<Box<B>>),
    /// The body failed after these bytes.
    BodyFailed(response::Parts, Bytes, B::Error),
}

/// Runs a request whose key this process holds with `token`, then completes the key with
/// its outcome (or releases it), and answers.
async fn execute<S, St, ReqBody, ResBody>(
    shared: &Shared<St>,
    key: &ScopedKey,
    token: Token,
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
    let Job { inner, parts, body } = job;
    let request = Request::from_parts(parts, ReqBody::from(body));
    let run = run_inner(
        inner,
        request,
        policy.max_stored_body,
        policy.store_server_errors,
    );
    let (parts, body, kept_body) = match renewing(shared, key, token, policy.lease, run).await {
        Ran::Failed(source) => {
            tracing::warn!(error = %source, ?key, "inner service failed; releasing the key");
            release(shared, key, token).await;
            return problem(&IdempotencyError::UpstreamUnavailable { source }, None);
        }
        Ran::Released(parts, body) => {
            release(shared, key, token).await;
            return Response::from_parts(parts, IdempotencyBody::passthrough(body));
        }
        Ran::Complete(parts, bytes) => (parts, IdempotencyBody::full(bytes.clone()), Some(bytes)),
        Ran::TooLarge(parts, prefix, rest) => (parts, IdempotencyBody::rest(prefix, rest), None),
        Ran::BodyFailed(parts, prefix, error) => {
            tracing::warn!(?key, "inner response body failed; keeping its status only");
            (parts, IdempotencyBody::failed(prefix, error), None)
        }
    };
    let mut stored = Stored::new(parts.status.as_u16());
    for (name, value) in kept_headers(&shared.config, &parts.headers) {
        stored = stored.with_header(name, value);
    }
    stored = match kept_body {
        Some(bytes) => stored.with_body(bytes),
        None => stored.without_body(),
    };
    let mut response = Response::from_parts(parts, body);
    match shared
        .store
        .complete(key, token, &stored, policy.retention)
        .await
    {
        Ok(expires_at) => set_expires(response.headers_mut(), expires_at),
        Err(error) => {
            // The operation ran; its client still gets the answer. A retry after the lease
            // ends may run it again: the upstream's own check on the forwarded key is the
            // second line of defence.
            shared.stats.count(Counter::StoreError);
            tracing::warn!(%error, ?key, "could not store a completed response");
        }
    }
    response
}

/// Calls the inner service and reads its response body, up to `max_stored` bytes.
async fn run_inner<S, ReqBody, ResBody>(
    mut inner: S,
    request: Request<ReqBody>,
    max_stored: usize,
    store_server_errors: bool,
) -> Ran<ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes>,
{
    let response = match inner.ready().await {
        Ok(ready) => ready.call(request).await,
        Err(error) => Err(error),
    };
    let (parts, body) = match response {
        Ok(response) => response.into_parts(),
        Err(error) => return Ran::Failed(error.into()),
    };
    if parts.status.is_server_error() && !store_server_errors {
        return Ran::Released(parts, body);
    }
    let mut body = Box::pin(body);
    if body.size_hint().lower() > max_stored as u64 {
        return Ran::TooLarge(parts, Bytes::new(), body);
    }
    let mut read = BytesMut::new();
    loop {
        match body.frame().await {
            None => return Ran::Complete(parts, read.freeze()),
            Some(Ok(frame)) => {
                // Trailers are not kept.
                if let Ok(data) = frame.into_data() {
                    read.extend_from_slice(&data);
                    if read.len() > max_stored {
                        return Ran::TooLarge(parts, read.freeze(), body);
                    }
                }
            }
            Some(Err(error)) => return Ran::BodyFailed(parts, read.freeze(), error),
        }
    }
}

/// Runs `work` while renewing the lease every third of its length, so that a long inner
/// call keeps its key.
async fn renewing<St: Store, F: Future>(
    shared: &Shared<St>,
    key: &ScopedKey,
    token: Token,
    lease: Duration,
    work: F,
) -> F::Output {
    let mut work = pin!(work);
    let period = lease / 3;
    if period.is_zero() {
        return work.await;
    }
    let mut tick = tokio::time::interval_at(Instant::now() + period, period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            output = &mut work => return output,
            _ = tick.tick() => {
                if let Err(error) = shared.store.renew(key, token, lease).await {
                    shared.stats.count(Counter::StoreError);
                    tracing::warn!(%error, ?key, "could not renew an idempotency lease");
                    if matches!(error, StoreError::LeaseLost) {
                        return work.await;
                    }
                }
            }
        }
    }
}

async fn release<St: Store>(shared: &Shared<St>, key: &ScopedKey, token: Token) {
    if let Err(error) = shared.store.release(key, token).await {
        // The key stays claimed until its lease ends; a retry then runs.
        shared.stats.count(Counter::StoreError);
        tracing::warn!(%error, ?key, "could not release an idempotency key");
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
        Err(error) => problem(
            &IdempotencyError::UpstreamUnavailable {
                source: error.into(),
            },
            None,
        ),
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
