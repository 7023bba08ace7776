//! [`Answer`]: a response read whole, with the assertions idem's tests make on it.

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;

/// A response, read whole.
///
/// ```
/// use idem_testkit::Answer;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let response = http::Response::builder()
///     .status(409)
///     .header("content-type", "application/problem+json")
///     .header("retry-after", "2")
///     .body(http_body_util::Full::new(bytes::Bytes::from(
///         r#"{"type":"tag:idem.invalid,2026:problem:in-flight","status":409,"title":"t","detail":"d"}"#,
///     )))
///     .unwrap();
/// let answer = Answer::read(response).await;
/// answer.assert_problem(409, "in-flight");
/// assert_eq!(answer.retry_after(), 2);
/// assert!(!answer.is_replay());
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// Every header.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Answer {
    /// Reads `response` to its end; panics if the body fails.
    pub async fn read<B>(response: http::Response<B>) -> Self
    where
        B: http_body::Body,
        B::Error: std::fmt::Debug,
    {
        let (parts, body) = response.into_parts();
        Self {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    /// The body as JSON; panics (showing the body) when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// Whether it carries `Idempotent-Replayed: true`.
    pub fn is_replay(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }

    /// Asserts a problem+json answer of this status and type slug; returns the problem.
    pub fn assert_problem(&self, status: u16, slug: &str) -> serde_json::Value {
        assert_eq!(self.status.as_u16(), status, "{self:?}");
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{self:?}"
        );
        let problem = self.json();
        assert_eq!(
            problem["type"],
            format!("tag:idem.invalid,2026:problem:{slug}"),
            "{problem}"
        );
        assert_eq!(problem["status"], status, "{problem}");
        assert!(problem["title"].is_string(), "{problem}");
        assert!(problem["detail"].is_string(), "{problem}");
        problem
    }

    /// Whether it is a problem+json answer whose type is this slug (no assertion).
    pub fn is_problem(&self, slug: &str) -> bool {
        self.header("content-type") == Some("application/problem+json")
            && serde_json::from_slice::<serde_json::Value>(&self.body)
                .is_ok_and(|p| p["type"] == format!("tag:idem.invalid,2026:problem:{slug}"))
    }

    /// `Retry-After`, as whole seconds; panics when absent.
    pub fn retry_after(&self) -> u64 {
        self.header("retry-after")
            .unwrap_or_else(|| panic!("no Retry-After: {self:?}"))
            .parse()
            .unwrap()
    }

    /// `Idempotency-Key-Expires`, checked to be an IMF-fixdate.
    pub fn expires(&self) -> &str {
        let value = self
            .header("idempotency-key-expires")
            .unwrap_or_else(|| panic!("no Idempotency-Key-Expires: {self:?}"));
        assert!(value.ends_with(" GMT") && value.len() == 29, "{value}");
        value
    }

    /// The headers, sorted, minus the ones a replay may legitimately change or add.
    pub fn replayable_headers(&self) -> Vec<(String, Vec<u8>)> {
        let mut headers: Vec<(String, Vec<u8>)> = self
            .headers
            .iter()
            .filter(|(name, _)| !matches!(name.as_str(), "date" | "idempotent-replayed"))
            .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
            .collect();
        headers.sort();
        headers
    }
}
