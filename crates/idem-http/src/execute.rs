//! Running a request whose key this process holds, and keeping its outcome.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::CONTENT_TYPE;
use http::request::Parts;
use http::{Request, Response, response};
use http_body::Body;
use http_body_util::BodyExt;
use idem_core::{BoxError, HoldOptions, Holder, Lease, ScopedKey, Store, StoreError, Stored};
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use crate::NotSent;
use crate::body::IdempotencyBody;
use crate::outcome::{AfterRun, Upstream, after_run};
use crate::policy::Config;
use crate::problem::{IdempotencyError, PROBLEM_JSON, set_expires};
use crate::replay::{kept_headers, problem};
use crate::service::Shared;
use crate::stats::{Counter, Outcome, UpstreamTook, marked};

/// A keyed request, with its body read, ready to go to the inner service.
pub(crate) struct Job<S> {
    pub(crate) inner: S,
    pub(crate) parts: Parts,
    pub(crate) body: Bytes,
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
/// for `retention` (or releases or holds the key, as the outcome table says), and answers.
pub(crate) async fn execute<S, St, ReqBody, ResBody>(
    shared: &Shared<St>,
    key: ScopedKey,
    lease: Lease,
    retention: Duration,
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
    )
    .await;
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
    let took = UpstreamTook(started.elapsed());
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
    let mut outcome = Outcome::Executed;
    let (mut response, stored) = match (after_run(&shared.config, upstream), answer) {
        (AfterRun::Release, answer) => {
            if let Err(error) = holder.release().await {
                // The key stays claimed until its lease ends; a retry then runs.
                shared.stats.count(Counter::StoreError);
                tracing::warn!(%error, "could not release an idempotency key");
            }
            let (mut response, outcome) = match answer {
                Ok(Ok(response)) => (
                    response.map(IdempotencyBody::passthrough),
                    Outcome::Executed,
                ),
                Ok(Err(source)) => {
                    tracing::warn!(error = %source, "upstream unreachable; the key was released");
                    (
                        problem(
                            &shared.config,
                            &IdempotencyError::UpstreamUnavailable { source },
                            None,
                        ),
                        Outcome::UpstreamUnavailable,
                    )
                }
                Err(elapsed) => (
                    problem(&shared.config, &unknown(Err(elapsed)), None),
                    Outcome::UnknownOutcome,
                ),
            };
            response.extensions_mut().insert(took);
            return marked(response, outcome);
        }
        (AfterRun::Hold, answer) => {
            let error = unknown(answer);
            shared.stats.count(Counter::UnknownOutcome);
            tracing::warn!(%error, key = %holder.key().log_id(), "unknown outcome; the key stays held until its lease ends");
            holder.hold();
            let mut response = problem(&shared.config, &error, None);
            response.extensions_mut().insert(took);
            return marked(response, Outcome::UnknownOutcome);
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
                    tracing::warn!(key = %holder.key().log_id(), "inner response body failed; keeping its status only");
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
            tracing::warn!(%error, key = %holder.key().log_id(), "unknown outcome; storing it so that it never runs again");
            outcome = Outcome::UnknownOutcome;
            let answer = error.to_response(&shared.config.policy.problem_type_base);
            let stored = Stored::new(answer.status().as_u16())
                .with_header(CONTENT_TYPE.as_str(), PROBLEM_JSON)
                .with_body(answer.body().clone());
            (answer.map(IdempotencyBody::full), stored)
        }
    };
    response.extensions_mut().insert(took);
    let key = holder.key().clone();
    match holder.complete(&stored, retention).await {
        Ok(expires_at) => set_expires(response.headers_mut(), expires_at),
        Err(StoreError::LeaseLost) => {
            // Another claim took the key over after this lease ended: that request may
            // run the operation again; the forwarded key is the upstream's second line.
            shared.stats.count(Counter::LeaseLost);
            tracing::error!(key = %key.log_id(), "lease lost before the response could be stored");
        }
        Err(error) => {
            // Never released: the key stays held until its lease ends.
            shared.stats.count(Counter::StoreError);
            shared.stats.count(Counter::NotStored);
            tracing::error!(%error, key = %key.log_id(), "could not store a completed response; the key stays held until its lease ends");
        }
    }
    marked(response, outcome)
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
pub(crate) async fn forward_unprotected<S, ReqBody, ResBody>(
    config: &Config,
    job: Job<S>,
) -> Response<IdempotencyBody<ResBody>>
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
            problem(config, &error, None)
        }
    }
}
