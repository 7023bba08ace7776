//! # idem-http: exactly-once HTTP requests, as a tower layer
//!
//! A client that timed out and retries `POST /payments` with the same `Idempotency-Key`
//! must get the first answer back, not a second charge. [`IdempotencyLayer`] gives any
//! tower HTTP service (an axum router, a hyper service, a proxy) that behaviour, keeping
//! its records in any [`idem_core::Store`].
//!
//! It follows the IETF draft *The Idempotency-Key HTTP Header Field* and Stripe's
//! behaviour where the draft is silent:
//!
//! | request | answer |
//! |---|---|
//! | a protected method (`POST`, `PATCH` by default) with a new key | forwarded once; the response is stored, then returned |
//! | same key, same request, completed | the stored status, headers and body, plus `Idempotent-Replayed: true`; never forwarded again |
//! | same key while the first is still running | `409` with `Retry-After`; or, with [`OnConflict::Wait`], the replay once the first completes (up to `wait_timeout`) |
//! | same key, different request (method, path, query, fingerprinted headers, body) | `422` |
//! | no key where [`key_required`](IdempotencyPolicy::key_required) | `400` |
//! | no key where [`key_from`](IdempotencyPolicy::key_from) is [`KeyFrom::Fingerprint`] | keyed by its fingerprint for [`fingerprint_window`](IdempotencyPolicy::fingerprint_window): the same request again gets the replay (never a `422`); the derived key is not forwarded |
//! | a malformed key (empty, too long, not printable ASCII, bad sf-string, sent twice) | `400`, saying what is wrong |
//! | a body over [`max_request_body`](IdempotencyPolicy::max_request_body) | `413`; nothing stored |
//! | the store cannot be reached | `503` with `Retry-After` (fail closed); or, with [`fail_open`](IdempotencyPolicy::fail_open), forwarded unprotected and counted |
//! | the inner service fails before anything was sent (its error carries [`NotSent`]: connect refused, connect timeout) | `502` `upstream-unavailable`; the key is released, so a retry may run |
//! | the inner service fails after the request may have been sent (reset, closed) | an unknown outcome: `502` `outcome-unknown`, **stored** and replayed; never run again automatically (or, with [`unknown_outcome`](IdempotencyPolicy::unknown_outcome) `= "hold"`, the key stays claimed until its lease ends) |
//! | no answer within [`upstream_timeout`](IdempotencyPolicy::upstream_timeout) | an unknown outcome: `504` `upstream-timeout`, stored and replayed (or held) |
//! | the inner service answers `408`, `425`, `429` or a status in [`release_statuses`](IdempotencyPolicy::release_statuses) | returned, not stored; the key is released (nothing was processed) |
//! | a keyed body slower than [`body_read_timeout`](IdempotencyPolicy::body_read_timeout) | `408` `body-timeout`; nothing ran |
//! | the shared [`BodyBudget`] of buffered keyed bodies is spent | `503` `overloaded` + `Retry-After`; nothing ran |
//! | a protected method on an ambiguous path (encoded `/`, dot segments; see [`path::normalize_path`]) | `400` `ambiguous-path` |
//! | no caller identity where [`scope_required`](IdempotencyPolicy::scope_required) | `400` `missing-identity` |
//! | any other method (`GET`, `HEAD`, `OPTIONS`, `TRACE`, …), or no key where it is optional (and not derived) | passed through untouched, body not buffered |
//!
//! Methods are compared without regard to case (`post` is `POST`, as the frameworks behind
//! the layer treat it), and the path is the normalised, percent-decoded one, so idem
//! decides on the request the inner service will see.
//!
//! Every answer the layer makes itself is an RFC 9457 `application/problem+json` body with a
//! stable `type` URI (see [`IdempotencyError`]).
//!
//! ## Headers
//!
//! - The key header (default `Idempotency-Key`) takes an sf-string (`"abc"`) or a bare
//!   value (`abc`); both are the same key. It is **forwarded to the inner service
//!   unchanged**, so the service can keep its own unique constraint as a second line of
//!   defence.
//! - `Idempotent-Replayed: true` marks a replayed response.
//! - `Idempotency-Key-Expires` (an HTTP date, IMF-fixdate) says when the key's record
//!   ends: for a stored or replayed response, the end of retention; for a `409` in flight,
//!   the end of the running request's lease; for a `422`, the end of the record the key
//!   belongs to. Answers that leave no record for the key (`400`, `413`, `502`, `503`, a
//!   `5xx` that is not stored, a response whose storing failed) do not carry it.
//!
//! ## What makes two requests the same
//!
//! The key is looked up within a *scope*: by default a hash of the `Authorization` header,
//! else of `X-Api-Key`, else of `Cookie`, else anonymous ([`ScopeFromRequest`], from the
//! policy's [`scope_sources`](IdempotencyPolicy::scope_sources); keyed with
//! [`IdempotencyLayer::scope_secret`]; replace it with [`IdempotencyLayer::make_scope`]).
//! One caller never receives another's stored response.
//! Within the scope, the key is bound to the request's fingerprint: method, path, query, the
//! [`fingerprint_headers`](IdempotencyPolicy::fingerprint_headers) and the body, with JSON
//! bodies canonicalized and [`json_ignore`](IdempotencyPolicy::json_ignore)d fields left
//! out (see [`fingerprint`]).
//!
//! ## Keys from the request
//!
//! For clients that send no key, [`key_from`](IdempotencyPolicy::key_from) =
//! [`KeyFrom::Fingerprint`] keys a protected request without one by its fingerprint, in
//! the caller's scope, for [`fingerprint_window`](IdempotencyPolicy::fingerprint_window)
//! (default 10 min). A retry within the window is replayed; so is a second, genuinely
//! identical operation, which is the limit of the idea. A request with a key of its own
//! still uses it. Only callers with an identity (a credential among the
//! [`scope_sources`](IdempotencyPolicy::scope_sources)) get derived keys: anonymous callers
//! share one scope, so their keyless requests pass through.
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU32, Ordering};
//!
//! use axum::{Router, body::Body, routing::post};
//! use http::Request;
//! use idem_core::MemoryStore;
//! use idem_http::{IdempotencyLayer, IdempotencyPolicy, KeyFrom};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let orders = Arc::new(AtomicU32::new(0));
//! let counter = Arc::clone(&orders);
//! let policy = IdempotencyPolicy { key_from: KeyFrom::Fingerprint, ..IdempotencyPolicy::default() };
//! let app = Router::new()
//!     .route("/orders", post(move || async move { counter.fetch_add(1, Ordering::SeqCst); "placed" }))
//!     .layer(IdempotencyLayer::with_policy(MemoryStore::new(), policy)?);
//!
//! // No Idempotency-Key: the request itself is the key, within the caller's scope.
//! let order = || {
//!     Request::post("/orders")
//!         .header("authorization", "Bearer shop-42")
//!         .body(Body::from("1 book"))
//! };
//! let first = app.clone().oneshot(order()?).await?;
//! let retry = app.clone().oneshot(order()?).await?;
//!
//! assert!(!first.headers().contains_key("idempotent-replayed"));
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! assert_eq!(orders.load(Ordering::SeqCst), 1);
//! # Ok(()) }
//! ```
//!
//! ## Guarantees and their limits
//!
//! - **Detached from the client.** The claim, the inner call and the storing of its
//!   response run on their own tokio task. A client that disconnects does not cancel
//!   them; the response is stored and the retry replays it.
//! - **Stored, then returned.** A fresh response reaches its client only after the store
//!   accepted it, so a client that got an answer will get the same answer on retry.
//! - **Held while running.** The key's lease is renewed every third of the lease, on a task
//!   of its own, while the inner call runs. If this process dies mid-request, the key is
//!   held until the lease ends; a retry after that may run the operation again (the
//!   forwarded key lets the upstream catch that).
//! - **Deadlines everywhere.** Every store call has [`store_timeout`](IdempotencyPolicy::store_timeout),
//!   the inner call [`upstream_timeout`](IdempotencyPolicy::upstream_timeout), the body
//!   [`body_read_timeout`](IdempotencyPolicy::body_read_timeout).
//! - **What is stored**: any response, `5xx` included (it may have had effects), unless
//!   [`store_server_errors`](IdempotencyPolicy::store_server_errors) is off. A response
//!   body over [`max_stored_body`](IdempotencyPolicy::max_stored_body) is streamed through
//!   once and only its status is kept: a retry gets `409` `response-not-kept` (with the
//!   `original_status`), never a second execution. A response whose body fails midway is
//!   treated the same way. Trailers are not stored.
//! - If storing the outcome fails, it is retried with backoff for
//!   [`complete_for`](IdempotencyPolicy::complete_for) while the lease is renewed. If it
//!   still fails, the client gets its response, the key is never released (it stays
//!   claimed until its lease ends), and it is logged and counted
//!   ([`IdempotencyStats::not_stored`]).
//!
//! ## Example: an axum app
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU32, Ordering};
//!
//! use axum::{Router, body::Body, routing::post};
//! use http::{Request, StatusCode};
//! use http_body_util::BodyExt;
//! use idem_core::MemoryStore;
//! use idem_http::{IdempotencyLayer, IdempotencyPolicy};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let charges = Arc::new(AtomicU32::new(0));
//! let counter = Arc::clone(&charges);
//! let policy = IdempotencyPolicy { key_required: true, ..IdempotencyPolicy::default() };
//! let app = Router::new()
//!     .route("/payments", post(move || async move {
//!         let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
//!         (StatusCode::CREATED, format!("charge #{n}"))
//!     }))
//!     .layer(IdempotencyLayer::with_policy(MemoryStore::new(), policy)?);
//!
//! let pay = || {
//!     Request::post("/payments")
//!         .header("idempotency-key", "order-7")
//!         .header("content-type", "application/json")
//!         .body(Body::from(r#"{"cents": 100}"#))
//! };
//! let first = app.clone().oneshot(pay()?).await?;
//! let retry = app.clone().oneshot(pay()?).await?;
//!
//! assert_eq!(first.status(), StatusCode::CREATED);
//! assert_eq!(retry.status(), StatusCode::CREATED);
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! assert!(retry.headers().contains_key("idempotency-key-expires"));
//! assert_eq!(retry.into_body().collect().await?.to_bytes(), "charge #1");
//! assert_eq!(charges.load(Ordering::SeqCst), 1);
//! # Ok(()) }
//! ```
//!
//! To serve it: `axum::serve(listener, app).await`.
//!
//! ## With hyper
//!
//! The layer rebuilds a keyed request's body from the bytes it read, so the request body
//! type must implement `From<Bytes>`. hyper's `Incoming` does not: map it first, for
//! example to `axum::body::Body`:
//!
//! ```no_run
//! # use std::convert::Infallible;
//! # use axum::body::Body;
//! # use http::{Request, Response};
//! # use hyper::body::Incoming;
//! # use idem_core::MemoryStore;
//! # use idem_http::IdempotencyLayer;
//! # use tower::{Layer, ServiceExt};
//! # async fn run(stream: tokio::net::TcpStream) {
//! let handler = tower::service_fn(|_: Request<Body>| async {
//!     Ok::<_, Infallible>(Response::new(Body::from("done")))
//! });
//! let service = IdempotencyLayer::new(MemoryStore::new()).layer(handler);
//! let hyper_service = hyper::service::service_fn(move |request: Request<Incoming>| {
//!     service.clone().oneshot(request.map(Body::new))
//! });
//! hyper::server::conn::http1::Builder::new()
//!     .serve_connection(hyper_util::rt::TokioIo::new(stream), hyper_service)
//!     .await
//!     .ok();
//! # }
//! ```

mod body;
mod budget;
mod date;
mod execute;
mod extract;
pub mod fingerprint;
mod future;
mod layer;
mod outcome;
pub mod path;
mod policy;
mod problem;
mod replay;
mod request;
mod service;
mod stats;
mod upstream;

pub use body::IdempotencyBody;
pub use budget::{BodyBudget, DEFAULT_BODY_BUDGET, DEFAULT_BODY_BUDGET_WAIT};
pub use date::fmt_http_date;
pub use extract::{ExtractKey, KeyFromHeader, MakeScope, ScopeFromRequest};
pub use future::ResponseFuture;
pub use layer::IdempotencyLayer;
pub use policy::{
    DEFAULT_PROBLEM_TYPE_BASE, IdempotencyPolicy, KeyFrom, OnConflict, PolicyError,
    RELEASED_ALWAYS, ReplayHeaders, UnknownOutcome, ValidPolicy,
};
pub use problem::{IdempotencyError, PROBLEM_JSON, Problem};
pub use service::Idempotency;
pub use stats::{IdempotencyStats, Outcome};
pub use upstream::NotSent;

use http::HeaderName;

/// `Idempotent-Replayed`: set to `true` on a replayed response.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// `Idempotency-Key-Expires`: when the key's record ends, as an HTTP date (see the
/// [crate docs](crate#headers)).
pub const IDEMPOTENCY_KEY_EXPIRES: HeaderName = HeaderName::from_static("idempotency-key-expires");

/// The README's Rust examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
