//! # idem-client: retries that keep their idempotency key
//!
//! A payment request that timed out may have been charged. Retrying it is only safe if the
//! retry carries the same `Idempotency-Key` as the original, so that the server (idem's
//! gateway or layer, Stripe, any API that follows the IETF draft) answers it with the
//! first outcome instead of running it again. This crate is the client half of that
//! contract, on reqwest:
//!
//! - **One key per logical operation**, kept across every attempt: generated
//!   ([`OperationKey::generate`], a UUIDv7), given by the caller ([`OperationKey::new`]),
//!   or derived for each step of a fan-out ([`OperationKey::derive`]) so a retried saga
//!   reuses every child key.
//! - **Retries** with exponential backoff and full jitter, within a number of attempts and
//!   an overall deadline ([`RetrySettings`]), on connect errors, timeouts, answers cut off,
//!   and `408`, `409` with a `Retry-After` (a key still in flight), `429`, `502`, `503`,
//!   `504`. `Retry-After` (seconds or an HTTP date) and `Retry-After-Ms` are honoured up
//!   to [`max_retry_after`](RetrySettings::max_retry_after). Never `400`, `422` or any
//!   other client error, and never a replay (`Idempotent-Replayed: true`), which is
//!   already the recorded outcome.
//! - **A request whose outcome is unknown** (sent, then no answer) is retried with the same
//!   key: that is the point of the key.
//! - **Every attempt says which it is** in `Idempotency-Attempt: N` ([`IDEMPOTENCY_ATTEMPT`]),
//!   and runs in a tracing span `idem_client.attempt` (attempt, key, method, host, path,
//!   status, outcome, retry_in_ms).
//! - **The caller learns** whether the answer was replayed and how many attempts it took
//!   ([`Delivery`]).
//!
//! Two faces, one retry loop: [`IdempotentRetry`], a [`reqwest_middleware::Middleware`],
//! and [`IdemClient`], a thin wrapper that also reads the answer whole (so an answer cut off
//! midway is retried too).
//!
//! Bodies must be in memory (bytes, a string, JSON): a streaming body could be sent only
//! once, so it is refused before anything is sent ([`Error::BodyNotReplayable`]).
//!
//! ## TLS
//!
//! reqwest is built here with rustls and no crypto provider of its own (its default,
//! aws-lc, needs cmake). [`reqwest_client`] installs *ring* as the process's rustls
//! provider if none is installed yet; build your own `reqwest::Client` only after
//! [`install_crypto_provider`] (reqwest panics without a provider).
//!
//! ## Example
//!
//! ```
//! use std::time::Duration;
//! use idem_client::{IdemClient, OperationKey, RetrySettings};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! # let url = format!("http://{}/payments", listener.local_addr()?);
//! # tokio::spawn(async move {
//! #     let app = axum::Router::new().fallback(|| async { (http::StatusCode::CREATED, "charged") });
//! #     axum::serve(listener, app).await
//! # });
//! let client = IdemClient::with_settings(RetrySettings {
//!     max_attempts: 5,
//!     deadline: Duration::from_secs(20),
//!     ..RetrySettings::default()
//! })?;
//! let order = OperationKey::new("order-7")?;
//!
//! let reply = client
//!     .post(&url)
//!     .key(order.derive("charge"))
//!     .json(&serde_json::json!({"cents": 100}))
//!     .send()
//!     .await?;
//!
//! assert_eq!(reply.status(), 201);
//! assert_eq!(reply.key(), Some(&order.derive("charge")));
//! assert_eq!(reply.attempts(), 1);
//! assert!(!reply.replayed());
//! # Ok(()) }
//! ```

mod client;
mod key;
mod middleware;
mod retry;
mod settings;

use std::time::Duration;

use http::HeaderName;
use idem_core::KeyError;

pub use client::{DEFAULT_MAX_ANSWER_BYTES, IdemClient, IdemRequest, Reply};
pub use key::OperationKey;
pub use middleware::{DeliveryExt, IdempotentRetry};
pub use settings::{IDEMPOTENCY_ATTEMPT, IDEMPOTENCY_KEY, RetrySettings, SettingsError};

/// How an operation's final answer came: under which key, after how many attempts, and
/// whether it was a replay of a stored outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    key: Option<OperationKey>,
    attempts: u32,
    replayed: bool,
}

impl Delivery {
    /// The key every attempt carried; `None` for a safe method sent without one.
    pub fn key(&self) -> Option<&OperationKey> {
        self.key.as_ref()
    }

    /// Attempts made, the original included (1 when the first one was answered).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Whether the answer carried `Idempotent-Replayed: true`: the server returned the
    /// stored outcome of an earlier attempt (perhaps one whose answer was lost) instead of
    /// running the operation again.
    pub fn replayed(&self) -> bool {
        self.replayed
    }
}

/// Why an operation has no answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The body is a stream: it could be sent once, so it cannot be retried. Nothing was
    /// sent.
    #[error(
        "the request body is a stream, which can be sent only once; a retried request needs \
         its body in memory (bytes, a string, JSON). Nothing was sent"
    )]
    BodyNotReplayable,
    /// The request's own key header is not a valid key. Nothing was sent.
    #[error("the `{header}` header is not a valid idempotency key: {source}. Nothing was sent")]
    InvalidKey {
        /// The key header.
        header: HeaderName,
        /// What is wrong with it.
        #[source]
        source: KeyError,
    },
    /// The request carries its key header more than once. Nothing was sent.
    #[error("the `{header}` header appears more than once; send one key. Nothing was sent")]
    RepeatedKey {
        /// The key header.
        header: HeaderName,
    },
    /// Every attempt failed without an answer (or the deadline came). The operation may or
    /// may not have taken effect: retry it later with the same key to learn which.
    #[error(
        "gave up after {attempts} attempt(s) in {elapsed:?}{}: {source}",
        key_note(key.as_ref())
    )]
    GaveUp {
        /// The key every attempt carried.
        key: Option<OperationKey>,
        /// Attempts made.
        attempts: u32,
        /// Time spent, waits included.
        elapsed: Duration,
        /// The last attempt's failure.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The answer body is larger than [`IdemClient::max_answer_bytes`].
    #[error("the answer body is larger than the {limit} bytes allowed (max_answer_bytes)")]
    AnswerTooLarge {
        /// The limit.
        limit: usize,
    },
    /// A failure no retry would cure (a bad URL, a redirect loop, …).
    #[error(transparent)]
    Request(reqwest::Error),
    /// The settings are unusable.
    #[error("invalid retry settings: {0}")]
    Settings(#[from] SettingsError),
    /// A JSON body could not be written, or an answer read, as JSON.
    #[error("JSON: {0}")]
    Json(#[source] serde_json::Error),
}

fn key_note(key: Option<&OperationKey>) -> String {
    key.map_or_else(String::new, |key| {
        format!(" (the operation may have taken effect; retry with key {key} to find out)")
    })
}

/// The failure of an attempt that got no answer within
/// [`attempt_timeout`](RetrySettings::attempt_timeout) (or what was left of the deadline).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no answer within {0:?}")]
pub struct AttemptTimedOut(pub Duration);

/// Installs *ring* as the process's default rustls crypto provider, unless one is installed
/// already. reqwest here has no provider of its own: call this (or use
/// [`reqwest_client`]) before building a `reqwest::Client`.
///
/// ```
/// idem_client::install_crypto_provider();
/// let client = reqwest::Client::builder().build().unwrap();
/// # drop(client);
/// ```
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another installer is fine: a provider is installed either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// A `reqwest::Client` with the defaults, after [`install_crypto_provider`].
pub fn reqwest_client() -> reqwest::Result<reqwest::Client> {
    install_crypto_provider();
    reqwest::Client::builder().build()
}
