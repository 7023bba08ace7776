//! The retry loop both faces of the client share: which failures and answers are worth
//! another attempt, how long to wait, when to give up, and the span of each attempt.

use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use idem_http::IDEMPOTENT_REPLAYED;
use tracing::Span;
use tracing::field::Empty;

use crate::{AttemptTimedOut, Delivery, Error, OperationKey, RetrySettings};

/// `Retry-After-Ms`: a wait in milliseconds, finer than `Retry-After`'s seconds.
pub(crate) const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");

/// An answer whose status and headers decide whether to try again.
pub(crate) trait Answer {
    fn status(&self) -> StatusCode;
    fn headers(&self) -> &HeaderMap;
}

impl Answer for reqwest::Response {
    fn status(&self) -> StatusCode {
        self.status()
    }
    fn headers(&self) -> &HeaderMap {
        self.headers()
    }
}

/// A failure after which the request may or may not have reached the server: worth another
/// attempt, with the same key, because the key makes a second arrival harmless.
pub(crate) trait Transient {
    fn is_transient(&self) -> bool;
}

impl Transient for reqwest::Error {
    fn is_transient(&self) -> bool {
        // Connect errors never reached the server; the rest (sending, an answer cut off,
        // a timeout) may have: either way the same key makes a retry safe. Builder, redirect
        // and status errors would only fail the same way again.
        self.is_connect()
            || self.is_timeout()
            || self.is_request()
            || self.is_body()
            || self.is_decode()
    }
}

impl Transient for reqwest_middleware::Error {
    fn is_transient(&self) -> bool {
        match self {
            Self::Reqwest(error) => error.is_transient(),
            Self::Middleware(_) => false,
        }
    }
}

/// Whether `status` asks for another attempt. A `409` does only when the server said when
/// to come back (as idem and the IETF draft do for a key still in flight): a `409` without
/// a wait is a conflict that will not resolve itself (idem's `response-not-kept`, an
/// application's own conflict). Every other `4xx` would fail the same way again.
fn retryable_status(status: StatusCode, headers: &HeaderMap) -> bool {
    match status.as_u16() {
        408 | 429 | 502 | 503 | 504 => true,
        409 => server_wait(headers, SystemTime::now()).is_some(),
        _ => false,
    }
}

/// Whether the answer is a replay of a stored outcome (`Idempotent-Replayed: true`).
pub(crate) fn is_replayed(headers: &HeaderMap) -> bool {
    headers
        .get(IDEMPOTENT_REPLAYED)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"true"))
}

/// The wait the server asked for: `Retry-After-Ms` (milliseconds), else `Retry-After`
/// (seconds, or an HTTP date, counted from `now`). Unreadable values are ignored.
pub(crate) fn server_wait(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = text(RETRY_AFTER_MS).and_then(|t| t.parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        return Some(Duration::try_from_secs_f64(ms / 1000.0).unwrap_or(Duration::MAX));
    }
    let after = text(http::header::RETRY_AFTER)?;
    if !after.is_empty() && after.bytes().all(|b| b.is_ascii_digit()) {
        return Some(after.parse().map_or(Duration::MAX, Duration::from_secs));
    }
    let at = httpdate::parse_http_date(after).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// One attempt, ready to send.
pub(crate) struct Attempt {
    pub(crate) request: reqwest::Request,
    pub(crate) span: Span,
    /// How long it may take: the attempt timeout, or what is left of the deadline.
    pub(crate) limit: Duration,
}

/// What the loop does after an attempt.
pub(crate) enum Judged<T, E> {
    /// Hand this answer to the caller, final.
    Answered(T, Delivery),
    /// A failure no retry would cure, as it came.
    Failed(E),
    /// Every attempt failed, or the deadline came.
    GaveUp(Error),
    /// The wait is over: make the next attempt.
    Again,
}

/// The state of one operation's attempts.
pub(crate) struct Retrier<'s> {
    settings: &'s RetrySettings,
    key: Option<OperationKey>,
    template: reqwest::Request,
    started: Instant,
    attempts: u32,
}

impl<'s> Retrier<'s> {
    /// Sets the key header on `request` (when there is a key and the request has none)
    /// once, for every attempt.
    /// Refuses a streaming body: it could be sent only once.
    pub(crate) fn new(
        settings: &'s RetrySettings,
        key: Option<OperationKey>,
        mut template: reqwest::Request,
    ) -> Result<Self, Error> {
        if template.try_clone().is_none() {
            return Err(Error::BodyNotReplayable);
        }
        // A key header the caller wrote stays as written: the server may compare it raw.
        if let Some(key) = &key
            && !template.headers().contains_key(&settings.key_header)
        {
            template
                .headers_mut()
                .insert(settings.key_header.clone(), key.header_value());
        }
        Ok(Self {
            settings,
            key,
            template,
            started: Instant::now(),
            attempts: 0,
        })
    }

    /// The next attempt: a copy of the request with its attempt number, and its span.
    pub(crate) fn attempt(&mut self) -> Attempt {
        self.attempts += 1;
        let mut request = self
            .template
            .try_clone()
            .expect("checked in Retrier::new: the body is in memory");
        if let Some(header) = &self.settings.attempt_header {
            request
                .headers_mut()
                .insert(header.clone(), HeaderValue::from(self.attempts));
        }
        let url = request.url();
        let span = tracing::info_span!(
            "idem_client.attempt",
            attempt = self.attempts,
            key = self.key.as_ref().map(OperationKey::as_str),
            method = %request.method(),
            host = url.host_str(),
            path = url.path(),
            status = Empty,
            outcome = Empty,
            retry_in_ms = Empty,
        );
        let left = self
            .settings
            .deadline
            .saturating_sub(self.started.elapsed());
        Attempt {
            request,
            span,
            limit: self.settings.attempt_timeout.min(left),
        }
    }

    /// Decides what follows `result`, the attempt's answer, failure or timeout, and waits
    /// before the next attempt when there is one.
    pub(crate) async fn judge<T, E>(
        &mut self,
        span: &Span,
        limit: Duration,
        result: Result<Result<T, E>, tokio::time::error::Elapsed>,
    ) -> Judged<T, E>
    where
        T: Answer,
        E: Transient + std::error::Error + Send + Sync + 'static,
    {
        let (wait, last) = match result {
            Err(_) => (None, Last::Failure(Box::new(AttemptTimedOut(limit)))),
            Ok(Err(error)) if error.is_transient() => (None, Last::Failure(Box::new(error))),
            Ok(Err(error)) => {
                span.record("outcome", "failed");
                return Judged::Failed(error);
            }
            Ok(Ok(answer)) => {
                let (status, headers) = (answer.status(), answer.headers());
                span.record("status", status.as_u16());
                // A replay is the operation's recorded outcome: another attempt would only
                // replay it again.
                let replayed = is_replayed(headers);
                if replayed || !retryable_status(status, headers) {
                    span.record("outcome", if replayed { "replayed" } else { "answered" });
                    return Judged::Answered(answer, self.delivery(replayed));
                }
                (
                    server_wait(headers, SystemTime::now()),
                    Last::Answer(answer),
                )
            }
        };
        let wait = match wait {
            Some(asked) => asked.min(self.settings.max_retry_after),
            None => self.settings.backoff(self.attempts),
        };
        let elapsed = self.started.elapsed();
        // Saturating: a server may ask for any wait, and settings may allow it.
        let out_of_time = elapsed.saturating_add(wait) >= self.settings.deadline;
        if self.attempts >= self.settings.max_attempts || out_of_time {
            span.record("outcome", "gave-up");
            return match last {
                Last::Answer(answer) => Judged::Answered(answer, self.delivery(false)),
                Last::Failure(source) => Judged::GaveUp(Error::GaveUp {
                    key: self.key.clone(),
                    attempts: self.attempts,
                    elapsed,
                    source,
                }),
            };
        }
        span.record("outcome", "retrying");
        span.record(
            "retry_in_ms",
            u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
        );
        match &last {
            Last::Answer(answer) => {
                tracing::debug!(parent: span, status = answer.status().as_u16(), ?wait, "retrying")
            }
            Last::Failure(error) => tracing::debug!(parent: span, %error, ?wait, "retrying"),
        }
        // The answer goes first, so its connection returns to the pool during the wait.
        drop(last);
        tokio::time::sleep(wait).await;
        Judged::Again
    }

    fn delivery(&self, replayed: bool) -> Delivery {
        Delivery {
            key: self.key.clone(),
            attempts: self.attempts,
            replayed,
        }
    }
}

/// The last attempt's result, kept in case it is the final one.
enum Last<T> {
    Answer(T),
    Failure(Box<dyn std::error::Error + Send + Sync>),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn retry_after_in_seconds_milliseconds_or_an_http_date() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        let wait = |pairs: &[(&'static str, &str)]| server_wait(&headers(pairs), now);
        assert_eq!(wait(&[("retry-after", "2")]), Some(Duration::from_secs(2)));
        assert_eq!(wait(&[("retry-after", " 0 ")]), Some(Duration::ZERO));
        assert_eq!(
            wait(&[("retry-after", "Sun, 06 Nov 1994 08:49:40 GMT")]),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            wait(&[("retry-after", "Sun, 06 Nov 1994 08:00:00 GMT")]),
            Some(Duration::ZERO),
            "a date in the past: at once"
        );
        assert_eq!(
            wait(&[("retry-after-ms", "250")]),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            wait(&[("retry-after-ms", "1.5"), ("retry-after", "9")]),
            Some(Duration::from_micros(1500)),
            "milliseconds win"
        );
        assert_eq!(
            wait(&[("retry-after-ms", "soon"), ("retry-after", "9")]),
            Some(Duration::from_secs(9)),
            "an unreadable Retry-After-Ms falls back to Retry-After"
        );
        assert_eq!(
            wait(&[("retry-after", "99999999999999999999999")]),
            Some(Duration::MAX),
            "too large to count: as long as can be (the cap applies)"
        );
        for unreadable in ["-1", "1.5", "tomorrow", ""] {
            assert_eq!(wait(&[("retry-after", unreadable)]), None, "{unreadable:?}");
        }
        assert_eq!(wait(&[("retry-after-ms", "-3")]), None);
        assert_eq!(wait(&[]), None);
    }

    #[test]
    fn which_answers_are_retried() {
        let none = HeaderMap::new();
        for status in [408, 429, 502, 503, 504] {
            assert!(
                retryable_status(StatusCode::from_u16(status).unwrap(), &none),
                "{status}"
            );
        }
        for status in [
            200, 201, 204, 301, 400, 401, 403, 404, 409, 412, 413, 422, 500, 501,
        ] {
            assert!(
                !retryable_status(StatusCode::from_u16(status).unwrap(), &none),
                "{status}"
            );
        }
        let in_flight = headers(&[("retry-after", "1")]);
        assert!(retryable_status(StatusCode::CONFLICT, &in_flight));
        assert!(!retryable_status(
            StatusCode::UNPROCESSABLE_ENTITY,
            &in_flight
        ));
    }

    struct Fake(StatusCode, HeaderMap);

    impl Answer for Fake {
        fn status(&self) -> StatusCode {
            self.0
        }
        fn headers(&self) -> &HeaderMap {
            &self.1
        }
    }

    impl Transient for std::io::Error {
        fn is_transient(&self) -> bool {
            true
        }
    }

    #[tokio::test]
    async fn an_endless_wait_within_endless_settings_gives_up_instead_of_overflowing() {
        let settings = RetrySettings {
            max_retry_after: Duration::MAX,
            deadline: Duration::MAX,
            ..RetrySettings::default()
        };
        let request =
            reqwest::Request::new(http::Method::POST, "http://127.0.0.1:1/".parse().unwrap());
        let mut retrier = Retrier::new(&settings, Some(OperationKey::generate()), request).unwrap();
        let attempt = retrier.attempt();
        let answer = Fake(
            StatusCode::SERVICE_UNAVAILABLE,
            headers(&[("retry-after", "99999999999999999999999")]),
        );
        let judged = retrier
            .judge::<_, std::io::Error>(&attempt.span, attempt.limit, Ok(Ok(answer)))
            .await;
        match judged {
            Judged::Answered(answer, delivery) => {
                assert_eq!(answer.status(), 503);
                assert_eq!(delivery.attempts(), 1);
            }
            _ => panic!("expected the answer back"),
        }
    }

    #[test]
    fn replays_are_recognised() {
        assert!(is_replayed(&headers(&[("idempotent-replayed", "true")])));
        assert!(is_replayed(&headers(&[("idempotent-replayed", "TRUE")])));
        assert!(!is_replayed(&headers(&[("idempotent-replayed", "false")])));
        assert!(!is_replayed(&HeaderMap::new()));
    }
}
