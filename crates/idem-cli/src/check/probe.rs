//! One probe: a request to the target, its answer read whole within the deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, StatusCode};

use super::CheckError;
use super::args::{KeyForm, Settings};

/// An answer, read whole.
#[derive(Debug, Clone)]
pub(super) struct Answer {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
}

impl Answer {
    /// Marked as a replay, as Stripe and idem do.
    pub(super) fn is_replay(&self) -> bool {
        self.headers
            .get(idem_http::IDEMPOTENT_REPLAYED)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"))
    }

    /// The same status and body: what a client compares.
    pub(super) fn same_as(&self, other: &Self) -> bool {
        self.status == other.status && self.body == other.body
    }

    /// `Retry-After`, when it is delta-seconds or an HTTP date.
    pub(super) fn retry_after(&self) -> Option<&str> {
        let value = self.headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
        let seconds = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
        (seconds || parse_http_date(value).is_some()).then_some(value)
    }

    /// The status, and a replay mark: `201 (replayed)`.
    pub(super) fn describe(&self) -> String {
        if self.is_replay() {
            format!("{} (replayed)", self.status.as_u16())
        } else {
            self.status.as_u16().to_string()
        }
    }
}

/// Why a probe has no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub(super) enum ProbeError {
    #[error("no answer within {}", humantime_serde::re::humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("the answer's body is over {0} bytes (--max-body-bytes)")]
    BodyTooLarge(usize),
    #[error("{0}")]
    Failed(String),
}

/// What a probe puts in the key header.
#[derive(Debug, Clone, Copy)]
pub(super) enum KeyHeader<'a> {
    /// No key header at all.
    Absent,
    /// A key, written in the configured form.
    Key(&'a str),
    /// This exact header value.
    Raw(&'a str),
}

/// Sends the probes: the target, the common headers, the deadline.
#[derive(Debug, Clone)]
pub(super) struct Prober {
    client: reqwest::Client,
    settings: Settings,
    /// Makes every key of this run unique, and unlike any other run's.
    run_id: String,
    next_key: std::sync::Arc<AtomicU64>,
}

impl Prober {
    pub(super) fn new(settings: &Settings) -> Result<Self, CheckError> {
        // reqwest is built without a crypto provider of its own (aws-lc needs cmake): ring
        // is installed as the process default. An error only says one is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .timeout(settings.timeout)
            // A redirect would probe another endpoint, and turn a POST into a GET.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("idem-check/", env!("CARGO_PKG_VERSION")));
        if let Some(trusted) = &settings.trusted {
            builder = builder.tls_certs_only(trusted.iter().cloned());
        }
        let client = builder.build().map_err(|e| CheckError::Client(chain(&e)))?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Ok(Self {
            client,
            settings: settings.clone(),
            run_id: format!("{nanos:x}-{:x}", std::process::id()),
            next_key: std::sync::Arc::default(),
        })
    }

    /// A key no earlier probe used, naming the check it is for.
    pub(super) fn fresh_key(&self, check: &str) -> String {
        let n = self.next_key.fetch_add(1, Ordering::Relaxed);
        format!("idem-check-{}-{n}-{check}", self.run_id)
    }

    /// Sends the configured request with `body` and the key header, reads the answer.
    pub(super) async fn send(
        &self,
        key: KeyHeader<'_>,
        body: &Bytes,
    ) -> Result<Answer, ProbeError> {
        let settings = &self.settings;
        let mut headers = settings.headers.clone();
        let value = match key {
            KeyHeader::Absent => None,
            KeyHeader::Key(key) => Some(match settings.key_form {
                KeyForm::SfString => format!("\"{key}\""),
                KeyForm::Bare => key.to_owned(),
            }),
            KeyHeader::Raw(raw) => Some(raw.to_owned()),
        };
        if let Some(value) = value {
            let value = HeaderValue::from_str(&value)
                .map_err(|_| ProbeError::Failed(format!("cannot send the key {value:?}")))?;
            headers.insert(settings.key_header.clone(), value);
        }
        let request = self
            .client
            .request(settings.method.clone(), settings.url.clone())
            .headers(headers)
            .body(body.clone());
        let mut response = request.send().await.map_err(|e| self.failure(&e))?;
        let status = response.status();
        let headers = std::mem::take(response.headers_mut());
        let mut body = BytesMut::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| self.failure(&e))? {
            if body.len() + chunk.len() > settings.max_body_bytes {
                return Err(ProbeError::BodyTooLarge(settings.max_body_bytes));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer {
            status,
            headers,
            body: body.freeze(),
        })
    }

    fn failure(&self, error: &reqwest::Error) -> ProbeError {
        if error.is_timeout() {
            ProbeError::Timeout(self.settings.timeout)
        } else {
            ProbeError::Failed(chain(error))
        }
    }
}

/// An error and its causes; reqwest's own message alone hides the cause ("error sending
/// request").
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

const WEEKDAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the HTTP date senders must
/// use (RFC 9110 §5.6.7); the obsolete forms are not accepted, since judging a sender is
/// the point.
pub(super) fn parse_http_date(value: &str) -> Option<SystemTime> {
    let value = value.trim();
    if value.len() != 29
        || value.get(3..5) != Some(", ")
        || !WEEKDAYS.iter().any(|day| value.starts_with(day))
    {
        return None;
    }
    let rest = value.get(5..)?;
    let mut parts = rest.split(' ');
    let (day, month, year, time, zone) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    if zone != "GMT" || parts.next().is_some() {
        return None;
    }
    let number = |text: &str, digits: usize| -> Option<u64> {
        (text.len() == digits && text.bytes().all(|b| b.is_ascii_digit()))
            .then(|| text.parse().ok())
            .flatten()
    };
    let day = number(day, 2)?;
    let month = MONTHS.iter().position(|m| *m == month)? as u64 + 1;
    let year = number(year, 4)?;
    let mut clock = time.split(':');
    let (hour, minute, second) = (
        number(clock.next()?, 2)?,
        number(clock.next()?, 2)?,
        number(clock.next()?, 2)?,
    );
    if clock.next().is_some()
        || year < 1970
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

/// Days from 1970-01-01 to the date (Howard Hinnant's `days_from_civil`, the inverse of
/// the `civil_from_days` behind `idem_http::fmt_http_date`), for years from 1970.
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year / 400;
    let yoe = year - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_round_trip_with_the_gateway_formatter() {
        for secs in [0, 784_111_777, 951_782_400, 1_767_225_599, 4_107_542_400] {
            let at = UNIX_EPOCH + Duration::from_secs(secs);
            assert_eq!(
                parse_http_date(&idem_http::fmt_http_date(at)),
                Some(at),
                "{secs}"
            );
        }
    }

    #[test]
    fn malformed_dates_are_none() {
        for value in [
            "",
            "tomorrow",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun, 06 Nox 1994 08:49:37 GMT",
            "Sun, 36 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 28:49:37 GMT",
            "Sun, 06 Nov 1994 08:49:3a GMT",
            "Sun, 06 Nov 1960 08:49:37 GMT",
            "Sü, 06 Nov 1994 08:49:37 GMT",
        ] {
            assert_eq!(parse_http_date(value), None, "{value:?}");
        }
    }
}
