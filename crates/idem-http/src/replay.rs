//! What a retry gets back: the stored response, marked as a replay, and the headers worth
//! keeping for it.

use std::time::SystemTime;

use bytes::Bytes;
use http::header::CONNECTION;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body::Body;
use idem_core::{StoreError, Stored};

use crate::IDEMPOTENT_REPLAYED;
use crate::body::IdempotencyBody;
use crate::policy::Config;
use crate::problem::{IdempotencyError, set_expires};

/// The stored response, marked as a replay.
pub(crate) fn replay<B: Body>(
    config: &Config,
    stored: &Stored,
    expires_at: SystemTime,
) -> Response<IdempotencyBody<B>> {
    let Some(body) = &stored.body else {
        let error = IdempotencyError::ResponseNotKept {
            original_status: stored.status,
        };
        return problem(config, &error, Some(expires_at));
    };
    let Ok(status) = StatusCode::from_u16(stored.status) else {
        let source = StoreError::corrupt(format!("stored status {} is not HTTP", stored.status));
        return problem(config, &IdempotencyError::StoreUnavailable { source }, None);
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

pub(crate) fn problem<B: Body>(
    config: &Config,
    error: &IdempotencyError,
    expires: Option<SystemTime>,
) -> Response<IdempotencyBody<B>> {
    error
        .to_response_expiring(&config.policy.problem_type_base, expires)
        .map(IdempotencyBody::full)
}

/// The response headers a replay carries.
pub(crate) fn kept_headers(config: &Config, headers: &HeaderMap) -> Vec<(String, Bytes)> {
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
