//! Every answer the layer gives instead of (or in place of) the inner service's, as one
//! error type carrying its HTTP meaning, rendered as RFC 9457 `application/problem+json`.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderName, HeaderValue, Response, StatusCode};
use idem_core::{BoxError, KeyError, StoreError};
use serde::Serialize;

use crate::IDEMPOTENCY_KEY_EXPIRES;

/// The media type of problem bodies.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Why the layer answered a request itself. Each variant knows its status, its stable
/// problem `type` URI, its title and its detail, so the mapping from outcome to response
/// lives here and nowhere else.
///
/// The `type` is a policy's [`problem_type_base`](crate::IdempotencyPolicy::problem_type_base)
/// (default [`DEFAULT_PROBLEM_TYPE_BASE`](crate::DEFAULT_PROBLEM_TYPE_BASE),
/// `tag:idem.invalid,2026:problem:`) followed by the slug:
///
/// | variant | status | `type` |
/// |---|---|---|
/// | [`MissingKey`](Self::MissingKey) | 400 | `…missing-key` |
/// | [`MalformedKey`](Self::MalformedKey), [`RepeatedKey`](Self::RepeatedKey) | 400 | `…malformed-key` |
/// | [`BodyUnreadable`](Self::BodyUnreadable) | 400 | `…body-unreadable` |
/// | [`InFlight`](Self::InFlight) | 409 + `Retry-After` | `…in-flight` |
/// | [`ResponseNotKept`](Self::ResponseNotKept) | 409 | `…response-not-kept` |
/// | [`BodyTooLarge`](Self::BodyTooLarge) | 413 | `…body-too-large` |
/// | [`Mismatch`](Self::Mismatch) | 422 | `…mismatch` |
/// | [`UpstreamUnavailable`](Self::UpstreamUnavailable) | 502 | `…upstream-unavailable` |
/// | [`OutcomeUnknown`](Self::OutcomeUnknown) | 502, stored | `…outcome-unknown` |
/// | [`UpstreamTimeout`](Self::UpstreamTimeout) | 504, stored | `…upstream-timeout` |
/// | [`StoreUnavailable`](Self::StoreUnavailable) | 503 + `Retry-After` | `…store-unavailable` |
/// | [`StoreUnavailable`](Self::StoreUnavailable) with [`StoreError::Full`] | 503 + `Retry-After` | `…store-full` |
/// | [`Overloaded`](Self::Overloaded) | 503 + `Retry-After` | `…overloaded` |
/// | [`BodyTimeout`](Self::BodyTimeout) | 408 | `…body-timeout` |
/// | [`AmbiguousPath`](Self::AmbiguousPath) | 400 | `…ambiguous-path` |
/// | [`MissingIdentity`](Self::MissingIdentity) | 400 | `…missing-identity` |
///
/// ```
/// use std::time::Duration;
/// use idem_http::{DEFAULT_PROBLEM_TYPE_BASE, IdempotencyError};
///
/// let error = IdempotencyError::InFlight { retry_after: Duration::from_millis(1500) };
/// let response = error.to_response(DEFAULT_PROBLEM_TYPE_BASE);
/// assert_eq!(response.status(), 409);
/// assert_eq!(response.headers()["retry-after"], "2");
/// assert_eq!(response.headers()["content-type"], "application/problem+json");
/// let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
/// assert_eq!(body["type"], "tag:idem.invalid,2026:problem:in-flight");
/// // With the base a policy sets, e.g. an API's own error documentation:
/// let response = error.to_response("https://docs.example.com/errors/");
/// let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
/// assert_eq!(body["type"], "https://docs.example.com/errors/in-flight");
/// assert_eq!(body["status"], 409);
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdempotencyError {
    /// The route requires a key and the request has none.
    #[error("this request must carry an idempotency key in the `{header}` header")]
    MissingKey {
        /// The header that should carry it.
        header: HeaderName,
    },
    /// The key header is not a usable key.
    #[error("the `{header}` header is not a valid idempotency key: {source}")]
    MalformedKey {
        /// The header that carried it.
        header: HeaderName,
        /// What is wrong with it.
        #[source]
        source: KeyError,
    },
    /// The key header appears more than once, so the key is ambiguous.
    #[error("the `{header}` header appears more than once; send exactly one key")]
    RepeatedKey {
        /// The repeated header.
        header: HeaderName,
    },
    /// The key was used before for a different request (method, path, query, fingerprinted
    /// headers or body differ).
    #[error(
        "this idempotency key was already used for a different request; \
         a new request needs a new key"
    )]
    Mismatch,
    /// A request with this key is still running.
    #[error(
        "a request with this idempotency key is still being processed; \
         retry after {} s", retry_after_secs(*retry_after)
    )]
    InFlight {
        /// Time left on the running request's lease.
        retry_after: Duration,
    },
    /// The request body is larger than the policy allows; nothing was stored.
    #[error("the request body is larger than the {limit} bytes allowed on a keyed request")]
    BodyTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The request body could not be read; nothing was stored.
    #[error("the request body could not be read")]
    BodyUnreadable {
        /// The body's error.
        #[source]
        source: BoxError,
    },
    /// The store could not be reached, or (with [`StoreError::Full`]) is full and claims
    /// no new key; nothing was run.
    #[error("{}", store_detail(source))]
    StoreUnavailable {
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// The inner service failed without answering (an upstream could not be reached). The
    /// key was released, so a retry may run the operation.
    #[error("the upstream service could not be reached; the request may be retried")]
    UpstreamUnavailable {
        /// The inner service's error.
        #[source]
        source: BoxError,
    },
    /// The inner service failed after the request may have reached it (the connection was
    /// reset or closed once the request was written): it may have been processed. This
    /// answer is stored and replayed like a response; the operation is never run again
    /// automatically.
    #[error(
        "the upstream failed after the request may have reached it, so whether it was \
         processed is unknown; it will not be run again with this key"
    )]
    OutcomeUnknown {
        /// The inner service's error.
        #[source]
        source: BoxError,
    },
    /// The inner service did not answer within `upstream_timeout`: an unknown outcome,
    /// stored and replayed, never run again automatically.
    #[error(
        "the upstream did not answer within {after:?}; whether the request was processed \
         is unknown, and it will not be run again with this key"
    )]
    UpstreamTimeout {
        /// The timeout that passed.
        after: Duration,
    },
    /// Too many keyed request bodies are being buffered right now; nothing was run.
    #[error("the server is buffering too many request bodies; nothing was run, retry later")]
    Overloaded {
        /// When to retry.
        retry_after: Duration,
    },
    /// The request body did not arrive within `body_read_timeout`; nothing was run.
    #[error("the request body did not arrive within {after:?}; nothing was run")]
    BodyTimeout {
        /// The timeout that passed.
        after: Duration,
    },
    /// The path could mean different routes to different servers (an encoded `/`, a dot
    /// segment), so a protected method on it is refused.
    #[error(transparent)]
    AmbiguousPath {
        /// What is ambiguous.
        #[from]
        source: crate::path::PathError,
    },
    /// The policy requires a caller identity (`scope_required`) and the request carries
    /// none of the configured scope sources.
    #[error("this request carries no caller identity, which keyed requests here must have")]
    MissingIdentity,
    /// The operation completed, but its response was too large to keep, so this retry
    /// cannot be given it. The operation is not run again.
    #[error(
        "the operation completed (status {original_status}) but its response was too \
         large to keep; it will not run again"
    )]
    ResponseNotKept {
        /// The status of the completed operation's response.
        original_status: u16,
    },
}

/// The `Retry-After` sent with a `503` for an unavailable store.
pub(crate) const STORE_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The `Retry-After` sent with a `503` for a full store: room comes back only as records
/// expire or are released, so an immediate retry would most likely be refused again.
pub(crate) const STORE_FULL_RETRY_AFTER: Duration = Duration::from_secs(5);

fn store_full(source: &StoreError) -> bool {
    matches!(source, StoreError::Full { .. })
}

fn store_detail(source: &StoreError) -> &'static str {
    if store_full(source) {
        "the idempotency store is full and takes no new keys until records expire; \
         nothing was run, retry later"
    } else {
        "the idempotency store is unavailable; nothing was run, retry later"
    }
}

impl IdempotencyError {
    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingKey { .. }
            | Self::MalformedKey { .. }
            | Self::RepeatedKey { .. }
            | Self::BodyUnreadable { .. }
            | Self::AmbiguousPath { .. }
            | Self::MissingIdentity => StatusCode::BAD_REQUEST,
            Self::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::OutcomeUnknown { .. } => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Mismatch => StatusCode::UNPROCESSABLE_ENTITY,
            Self::InFlight { .. } | Self::ResponseNotKept { .. } => StatusCode::CONFLICT,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::StoreUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamUnavailable { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// The last segment of the problem `type` URI, e.g. `in-flight`.
    pub fn slug(&self) -> &'static str {
        match self {
            Self::MissingKey { .. } => "missing-key",
            Self::MalformedKey { .. } | Self::RepeatedKey { .. } => "malformed-key",
            Self::BodyUnreadable { .. } => "body-unreadable",
            Self::Mismatch => "mismatch",
            Self::InFlight { .. } => "in-flight",
            Self::BodyTooLarge { .. } => "body-too-large",
            Self::StoreUnavailable { source } if store_full(source) => "store-full",
            Self::StoreUnavailable { .. } => "store-unavailable",
            Self::UpstreamUnavailable { .. } => "upstream-unavailable",
            Self::ResponseNotKept { .. } => "response-not-kept",
            Self::OutcomeUnknown { .. } => "outcome-unknown",
            Self::UpstreamTimeout { .. } => "upstream-timeout",
            Self::Overloaded { .. } => "overloaded",
            Self::BodyTimeout { .. } => "body-timeout",
            Self::AmbiguousPath { .. } => "ambiguous-path",
            Self::MissingIdentity => "missing-identity",
        }
    }

    /// The stable problem `type` URI: `base` (a policy's
    /// [`problem_type_base`](crate::IdempotencyPolicy::problem_type_base), by default
    /// [`DEFAULT_PROBLEM_TYPE_BASE`](crate::DEFAULT_PROBLEM_TYPE_BASE)) and the slug.
    pub fn problem_type(&self, base: &str) -> String {
        format!("{base}{}", self.slug())
    }

    /// The problem's short, fixed title.
    pub fn title(&self) -> &'static str {
        match self {
            Self::MissingKey { .. } => "Idempotency key missing",
            Self::MalformedKey { .. } | Self::RepeatedKey { .. } => "Idempotency key malformed",
            Self::BodyUnreadable { .. } => "Request body unreadable",
            Self::Mismatch => "Idempotency key reused for a different request",
            Self::InFlight { .. } => "Request with this idempotency key in progress",
            Self::BodyTooLarge { .. } => "Request body too large",
            Self::StoreUnavailable { source } if store_full(source) => "Idempotency store full",
            Self::StoreUnavailable { .. } => "Idempotency store unavailable",
            Self::UpstreamUnavailable { .. } => "Upstream unavailable",
            Self::ResponseNotKept { .. } => "Response not kept",
            Self::OutcomeUnknown { .. } => "Upstream outcome unknown",
            Self::UpstreamTimeout { .. } => "Upstream timed out",
            Self::Overloaded { .. } => "Too many request bodies buffered",
            Self::BodyTimeout { .. } => "Request body timed out",
            Self::AmbiguousPath { .. } => "Ambiguous request path",
            Self::MissingIdentity => "Caller identity missing",
        }
    }

    /// How long the client should wait before retrying, when that is known.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::InFlight { retry_after } => Some(*retry_after),
            Self::StoreUnavailable { source } if store_full(source) => Some(STORE_FULL_RETRY_AFTER),
            Self::StoreUnavailable { .. } => Some(STORE_RETRY_AFTER),
            Self::Overloaded { retry_after } => Some(*retry_after),
            _ => None,
        }
    }

    /// The RFC 9457 problem object, its `type` under `base`.
    pub fn problem(&self, base: &str) -> Problem {
        Problem {
            problem_type: self.problem_type(base),
            title: self.title(),
            status: self.status().as_u16(),
            detail: self.to_string(),
            original_status: match self {
                Self::ResponseNotKept { original_status } => Some(*original_status),
                _ => None,
            },
        }
    }

    /// The whole answer: status, `Content-Type: application/problem+json`, `Retry-After`
    /// where it applies (whole seconds, rounded up, at least 1), and the problem body.
    pub fn to_response(&self, base: &str) -> Response<Bytes> {
        // Serializing a struct of strings and integers cannot fail.
        let body = serde_json::to_vec(&self.problem(base)).unwrap_or_default();
        let mut response = Response::new(Bytes::from(body));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(after) = self.retry_after() {
            headers.insert(RETRY_AFTER, HeaderValue::from(retry_after_secs(after)));
        }
        response
    }

    /// [`to_response`](Self::to_response), plus `Idempotency-Key-Expires` when the key has a
    /// record whose end is known.
    pub(crate) fn to_response_expiring(
        &self,
        base: &str,
        expires: Option<SystemTime>,
    ) -> Response<Bytes> {
        let mut response = self.to_response(base);
        if let Some(at) = expires {
            set_expires(response.headers_mut(), at);
        }
        response
    }
}

/// Sets `Idempotency-Key-Expires`.
pub(crate) fn set_expires(headers: &mut http::HeaderMap, at: SystemTime) {
    if let Some(value) = crate::date::http_date_value(at) {
        headers.insert(IDEMPOTENCY_KEY_EXPIRES, value);
    }
}

/// Whole seconds, rounded up, at least 1.
pub(crate) fn retry_after_secs(after: Duration) -> u64 {
    let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
    secs.max(1)
}

/// An RFC 9457 problem object, as the layer sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// A stable URI naming the kind of problem.
    #[serde(rename = "type")]
    pub problem_type: String,
    /// A short summary of the kind of problem.
    pub title: &'static str,
    /// The HTTP status.
    pub status: u16,
    /// What happened to this request.
    pub detail: String,
    /// For `response-not-kept`: the status the completed operation answered with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_status: Option<u16>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(60)), 60);
    }

    #[test]
    fn response_not_kept_carries_the_original_status() {
        let response = IdempotencyError::ResponseNotKept {
            original_status: 201,
        }
        .to_response(crate::DEFAULT_PROBLEM_TYPE_BASE);
        assert_eq!(response.status(), StatusCode::CONFLICT);
        let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(body["original_status"], 201);
        assert_eq!(
            body["type"],
            "tag:idem.invalid,2026:problem:response-not-kept"
        );
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("too large to keep")
        );
    }

    #[test]
    fn store_errors_keep_their_source_and_ask_for_a_retry() {
        let error = IdempotencyError::StoreUnavailable {
            source: StoreError::backend("begin", "connection refused"),
        };
        assert!(std::error::Error::source(&error).is_some());
        let response = error.to_response(crate::DEFAULT_PROBLEM_TYPE_BASE);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[RETRY_AFTER], "1");
        let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert!(body.get("original_status").is_none());
        assert_eq!(
            body["type"],
            "tag:idem.invalid,2026:problem:store-unavailable"
        );
    }

    #[test]
    fn a_full_store_is_a_503_of_its_own_type() {
        let error = IdempotencyError::StoreUnavailable {
            source: StoreError::Full {
                resource: "records",
                limit: 10,
            },
        };
        let response = error.to_response(crate::DEFAULT_PROBLEM_TYPE_BASE);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[RETRY_AFTER], "5");
        let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(body["type"], "tag:idem.invalid,2026:problem:store-full");
        assert_eq!(body["title"], "Idempotency store full");
        assert!(body["detail"].as_str().unwrap().contains("is full"));
    }
}
