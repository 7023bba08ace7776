//! [`IdemClient`]: the retry loop around a plain `reqwest::Client`, answers read whole.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use reqwest::{IntoUrl, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument;

use crate::middleware::key_for;
use crate::retry::{Answer, Attempt, Judged, Retrier, Transient};
use crate::{Delivery, Error, OperationKey, RetrySettings};

/// The largest answer body [`IdemClient`] reads by default: 16 MiB.
pub const DEFAULT_MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// A thin client that sends each operation with one idempotency key, retries it as
/// [`RetrySettings`] say, and reads the answer whole, so that an answer cut off midway is
/// retried too (the middleware, [`IdempotentRetry`](crate::IdempotentRetry), hands the
/// body to the caller unread and cannot).
///
/// Cloning is cheap and shares the connection pool.
///
/// ```no_run
/// use idem_client::{IdemClient, OperationKey};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let client = IdemClient::new()?;
/// let order = OperationKey::new("order-7")?;
/// let reply = client
///     .post("https://api.example.com/payments")
///     .key(order.derive("charge"))
///     .json(&serde_json::json!({"cents": 100}))
///     .send()
///     .await?;
/// println!(
///     "{} after {} attempt(s){}",
///     reply.status(),
///     reply.attempts(),
///     if reply.replayed() { ", replayed" } else { "" }
/// );
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct IdemClient {
    http: reqwest::Client,
    settings: Arc<RetrySettings>,
    max_answer_bytes: usize,
}

impl IdemClient {
    /// Default settings, over [`reqwest_client`](crate::reqwest_client).
    pub fn new() -> Result<Self, Error> {
        Self::with_settings(RetrySettings::default())
    }

    /// These settings, over [`reqwest_client`](crate::reqwest_client).
    pub fn with_settings(settings: RetrySettings) -> Result<Self, Error> {
        Self::from_parts(crate::reqwest_client().map_err(Error::Request)?, settings)
    }

    /// These settings, over your own `reqwest::Client` (its own timeout, if any, counts as
    /// a failed attempt and is retried).
    pub fn from_parts(http: reqwest::Client, settings: RetrySettings) -> Result<Self, Error> {
        settings.validate()?;
        Ok(Self {
            http,
            settings: Arc::new(settings),
            max_answer_bytes: DEFAULT_MAX_ANSWER_BYTES,
        })
    }

    /// The largest answer body read ([`DEFAULT_MAX_ANSWER_BYTES`] by default); a larger one
    /// fails the call with [`Error::AnswerTooLarge`], without a retry.
    pub fn max_answer_bytes(mut self, limit: usize) -> Self {
        self.max_answer_bytes = limit;
        self
    }

    /// The settings in use.
    pub fn settings(&self) -> &RetrySettings {
        &self.settings
    }

    /// A request to `url`; an unusable URL fails at [`send`](IdemRequest::send).
    pub fn request(&self, method: Method, url: impl IntoUrl) -> IdemRequest {
        IdemRequest {
            client: self.clone(),
            builder: self.http.request(method, url),
            key: None,
            json_error: None,
        }
    }

    /// A `POST` to `url`.
    pub fn post(&self, url: impl IntoUrl) -> IdemRequest {
        self.request(Method::POST, url)
    }

    /// A `PUT` to `url`.
    pub fn put(&self, url: impl IntoUrl) -> IdemRequest {
        self.request(Method::PUT, url)
    }

    /// A `PATCH` to `url`.
    pub fn patch(&self, url: impl IntoUrl) -> IdemRequest {
        self.request(Method::PATCH, url)
    }

    /// A `DELETE` of `url`.
    pub fn delete(&self, url: impl IntoUrl) -> IdemRequest {
        self.request(Method::DELETE, url)
    }

    /// A `GET` of `url` (retried, without a generated key).
    pub fn get(&self, url: impl IntoUrl) -> IdemRequest {
        self.request(Method::GET, url)
    }

    /// Sends a built request as one operation. Its key is its own key header, else `key`,
    /// else a new one (none for safe methods), as with
    /// [`IdempotentRetry`](crate::IdempotentRetry).
    pub async fn execute(
        &self,
        request: reqwest::Request,
        key: Option<OperationKey>,
    ) -> Result<Reply, Error> {
        let key = key_for(&self.settings, &request, key.as_ref())?;
        let mut retrier = Retrier::new(&self.settings, key, request)?;
        loop {
            let Attempt {
                request,
                span,
                limit,
            } = retrier.attempt();
            let result = tokio::time::timeout(limit, self.fetch(request))
                .instrument(span.clone())
                .await;
            match retrier.judge(&span, limit, result).await {
                Judged::Answered(fetched, delivery) => return Ok(fetched.into_reply(delivery)),
                Judged::Failed(FetchError::Http(error)) => return Err(Error::Request(error)),
                Judged::Failed(FetchError::TooLarge { limit }) => {
                    return Err(Error::AnswerTooLarge { limit });
                }
                Judged::GaveUp(error) => return Err(error),
                Judged::Again => {}
            }
        }
    }

    /// One attempt: the answer, read whole.
    async fn fetch(&self, request: reqwest::Request) -> Result<Fetched, FetchError> {
        let mut response = self.http.execute(request).await?;
        let (status, headers) = (response.status(), response.headers().clone());
        let url = response.url().clone();
        let mut body = BytesMut::new();
        while let Some(chunk) = response.chunk().await? {
            if body.len() + chunk.len() > self.max_answer_bytes {
                return Err(FetchError::TooLarge {
                    limit: self.max_answer_bytes,
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Fetched {
            status,
            headers,
            url,
            body: body.freeze(),
        })
    }
}

/// One operation being put together; [`send`](Self::send) runs it.
#[derive(Debug)]
#[must_use = "nothing is sent until `send` is awaited"]
pub struct IdemRequest {
    client: IdemClient,
    builder: reqwest::RequestBuilder,
    key: Option<OperationKey>,
    json_error: Option<serde_json::Error>,
}

impl IdemRequest {
    /// The operation's key (by default a new one, see [`OperationKey::generate`]).
    pub fn key(mut self, key: OperationKey) -> Self {
        self.key = Some(key);
        self
    }

    /// Adds a header.
    pub fn header<K, V>(mut self, name: K, value: V) -> Self
    where
        HeaderName: TryFrom<K>,
        <HeaderName as TryFrom<K>>::Error: Into<http::Error>,
        HeaderValue: TryFrom<V>,
        <HeaderValue as TryFrom<V>>::Error: Into<http::Error>,
    {
        self.builder = self.builder.header(name, value);
        self
    }

    /// Adds these headers.
    pub fn headers(mut self, headers: HeaderMap) -> Self {
        self.builder = self.builder.headers(headers);
        self
    }

    /// `Authorization: Bearer TOKEN`.
    pub fn bearer_auth(mut self, token: impl std::fmt::Display) -> Self {
        self.builder = self.builder.bearer_auth(token);
        self
    }

    /// The body, in memory so that every attempt sends it.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.builder = self.builder.body(body.into());
        self
    }

    /// `value` as a JSON body, with `Content-Type: application/json`.
    pub fn json<T: Serialize + ?Sized>(mut self, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => {
                self.builder = self
                    .builder
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(body);
            }
            Err(error) => self.json_error = Some(error),
        }
        self
    }

    /// Sends the operation, retrying as the client's settings say.
    pub async fn send(self) -> Result<Reply, Error> {
        if let Some(error) = self.json_error {
            return Err(Error::Json(error));
        }
        let request = self.builder.build().map_err(Error::Request)?;
        self.client.execute(request, self.key).await
    }
}

/// The final answer of an operation, read whole, and how it came.
#[derive(Debug, Clone)]
pub struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    url: Url,
    body: Bytes,
    delivery: Delivery,
}

impl Reply {
    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The URL that answered (after redirects).
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.body).map_err(Error::Json)
    }

    /// Key, attempts and replay mark.
    pub fn delivery(&self) -> &Delivery {
        &self.delivery
    }

    /// Whether the server answered with a stored outcome (`Idempotent-Replayed: true`)
    /// rather than running the operation for this attempt.
    pub fn replayed(&self) -> bool {
        self.delivery.replayed()
    }

    /// Attempts made, the original included.
    pub fn attempts(&self) -> u32 {
        self.delivery.attempts()
    }

    /// The key every attempt carried (`None` for a safe method sent without one).
    pub fn key(&self) -> Option<&OperationKey> {
        self.delivery.key()
    }
}

/// An answer read whole, before it is judged.
struct Fetched {
    status: StatusCode,
    headers: HeaderMap,
    url: Url,
    body: Bytes,
}

impl Fetched {
    fn into_reply(self, delivery: Delivery) -> Reply {
        Reply {
            status: self.status,
            headers: self.headers,
            url: self.url,
            body: self.body,
            delivery,
        }
    }
}

impl Answer for Fetched {
    fn status(&self) -> StatusCode {
        self.status
    }
    fn headers(&self) -> &HeaderMap {
        &self.headers
    }
}

/// Why one attempt of [`IdemClient::fetch`] failed.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error(transparent)]
    Http(#[from] reqwest::Error),
    #[error("the answer is larger than {limit} bytes")]
    TooLarge { limit: usize },
}

impl Transient for FetchError {
    fn is_transient(&self) -> bool {
        match self {
            Self::Http(error) => error.is_transient(),
            // It would be as large the next time.
            Self::TooLarge { .. } => false,
        }
    }
}
