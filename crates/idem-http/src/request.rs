//! A keyed request on its way in: the headers idem relies on kept from `Connection`, the
//! body read whole within its limits.

use std::pin::pin;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH};
use http::{HeaderMap, HeaderValue};
use http_body::Body;
use http_body_util::BodyExt;
use idem_core::BoxError;
use tokio::time::Instant;

use crate::budget::Reserved;
use crate::policy::Config;
use crate::problem::IdempotencyError;
use crate::service::Shared;

/// The `Retry-After` of a `503` for a spent body budget.
const OVERLOADED_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Removes, from the `Connection` header of a keyed request, the headers idem decided on
/// (the key, fingerprinted and scope headers): a proxy or server behind the layer would
/// otherwise drop them, and the inner service would see another request than idem did.
pub(crate) fn protect_relied_on_headers(config: &Config, headers: &mut HeaderMap) {
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

/// Reads a keyed request's body whole, within `max_request_body`, `body_read_timeout`
/// and the shared body budget.
pub(crate) async fn read_body<St, B>(
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
