//! `idem keys get|delete|stuck`: look up, delete and find stuck keys, directly against a
//! store (`--store URL`), and the same on the admin listener (`GET`/`DELETE
//! /keys/{scope}/{key}`, `GET /keys/stuck`), behind a bearer token.
//!
//! ```
//! use std::time::Duration;
//! use idem_cli::keys::{AdminToken, routes};
//! use idem_core::{MemoryStore, Store};
//!
//! let store: std::sync::Arc<dyn Store> = std::sync::Arc::new(MemoryStore::new());
//! let token = AdminToken::new("a long random admin token").unwrap();
//! // Merged into the admin listener's router; every route demands `Authorization: Bearer …`.
//! let router: axum::Router = routes(store, Some(token), Duration::from_secs(2));
//! # let _ = router;
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use idem_core::{InFlightRecord, Key, Record, RecordState, Scope, ScopedKey, Store, StoreError};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::store_url::StoreUrl;

/// The environment variable holding the admin token.
pub const ADMIN_TOKEN_ENV: &str = "IDEM_ADMIN_TOKEN";
/// The shortest admin token accepted, so a trivially guessable one is refused.
pub const MIN_TOKEN_LEN: usize = 16;
/// The default and the largest `limit` of a stuck-key listing.
pub const DEFAULT_STUCK_LIMIT: usize = 100;
/// The largest `limit` of a stuck-key listing, so one call's work stays bounded.
pub const MAX_STUCK_LIMIT: usize = 10_000;

/// The bearer token the admin `/keys` routes demand. Compared in constant time.
///
/// ```
/// use idem_cli::keys::AdminToken;
///
/// let token = AdminToken::new("a long random admin token").unwrap();
/// assert!(token.accepts(b"a long random admin token"));
/// assert!(!token.accepts(b"a long random admin tokeN"));
/// assert!(AdminToken::new("short").is_err());
/// ```
#[derive(Clone)]
pub struct AdminToken {
    // Only a digest is kept: comparing digests of equal length takes the same time however
    // many bytes of a guess are right, and the token's length does not show either.
    digest: [u8; 32],
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(***)")
    }
}

/// Why no admin token could be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Too short to resist guessing.
    #[error("the admin token is shorter than {MIN_TOKEN_LEN} bytes")]
    TooShort,
    /// The admin listener would be reachable from other hosts with nothing guarding it.
    #[error(
        "the admin listener {addr} is not on a loopback address and no admin token is set \
         (set {ADMIN_TOKEN_ENV} or --admin-token-file, or listen on 127.0.0.1)"
    )]
    ExposedWithoutToken {
        /// The admin address.
        addr: std::net::SocketAddr,
    },
}

impl AdminToken {
    /// A token from its text, every byte of it. (`idem serve` drops a final newline from
    /// `IDEM_ADMIN_TOKEN` and from `--admin-token-file` before it gets here.)
    pub fn new(text: impl AsRef<[u8]>) -> Result<Self, TokenError> {
        let text = text.as_ref();
        if text.len() < MIN_TOKEN_LEN {
            return Err(TokenError::TooShort);
        }
        Ok(Self {
            digest: Scope::key_from_secret(text),
        })
    }

    /// Whether `presented` is the token.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let other = Scope::key_from_secret(presented);
        // No early exit: every byte is looked at whatever the first difference.
        self.digest
            .iter()
            .zip(other.iter())
            .fold(0u8, |differ, (a, b)| differ | (a ^ b))
            == 0
    }
}

/// Refuses an admin listener reachable from other hosts without a token.
///
/// ```
/// use idem_cli::keys::{AdminToken, check_exposure};
///
/// assert!(check_exposure("127.0.0.1:9090".parse().unwrap(), None).is_ok());
/// assert!(check_exposure("0.0.0.0:9090".parse().unwrap(), None).is_err());
/// let token = AdminToken::new("a long random admin token").unwrap();
/// assert!(check_exposure("0.0.0.0:9090".parse().unwrap(), Some(&token)).is_ok());
/// ```
pub fn check_exposure(
    addr: std::net::SocketAddr,
    token: Option<&AdminToken>,
) -> Result<(), TokenError> {
    if addr.ip().is_loopback() || token.is_some() {
        Ok(())
    } else {
        Err(TokenError::ExposedWithoutToken { addr })
    }
}

/// How an operator names a key's scope.
#[derive(Debug, Clone, clap::Args)]
pub struct ScopeArgs {
    /// The scope as stored (`anonymous`, `cred…` from a credential, or a custom scope)
    #[arg(long, value_name = "SCOPE", conflicts_with = "credential")]
    pub scope: Option<String>,
    /// The caller's credential, e.g. 'Bearer sk_live_…': idem computes its scope the way
    /// the gateway does (with IDEM_SCOPE_SECRET or --scope-secret-file)
    #[arg(long, value_name = "VALUE")]
    pub credential: Option<String>,
    /// The header the credential travels in
    #[arg(long, value_name = "NAME", default_value = "authorization")]
    pub credential_header: String,
    /// File holding the gateway's scope secret (instead of IDEM_SCOPE_SECRET)
    #[arg(long, value_name = "PATH")]
    pub scope_secret_file: Option<PathBuf>,
}

impl ScopeArgs {
    /// The scope these arguments name.
    pub fn scope(&self) -> Result<Scope, String> {
        match (&self.scope, &self.credential) {
            (Some(scope), _) => Ok(Scope::new(scope.clone())),
            (None, Some(credential)) => {
                // Read exactly as `idem serve` reads it, so the scope is the gateway's.
                let env = std::env::var_os(crate::config::SCOPE_SECRET_ENV);
                let secret = crate::config::ScopeSecret::load(
                    env.as_ref().map(|value| value.as_encoded_bytes()),
                    self.scope_secret_file.as_deref(),
                )
                .map_err(|error| error.to_string())?;
                scope_of_credential(
                    &self.credential_header,
                    credential,
                    secret.as_ref().map(|secret| secret.bytes()),
                )
            }
            (None, None) => Ok(Scope::anonymous()),
        }
    }
}

/// The scope the gateway gives a request carrying `credential` in `header`, computed by the
/// layer's own code (the default policy's scope sources), hashed with the gateway's scope
/// `secret` as it holds it.
///
/// ```
/// use idem_cli::keys::scope_of_credential;
///
/// let secret = Some(&b"a secret of 16+ bytes"[..]);
/// let a = scope_of_credential("authorization", "Bearer a", secret).unwrap();
/// assert_ne!(a, scope_of_credential("authorization", "Bearer b", secret).unwrap());
/// assert!(a.as_str().starts_with("cred"));
/// ```
pub fn scope_of_credential(
    header: &str,
    credential: &str,
    secret: Option<&[u8]>,
) -> Result<Scope, String> {
    use idem_http::MakeScope;
    let make = idem_http::ScopeFromRequest::new(&idem_http::IdempotencyPolicy::default(), secret)
        .map_err(|error| format!("the default policy is invalid: {error}"))?;
    let parts = http::Request::builder()
        .header(header, credential)
        .body(())
        .map_err(|error| format!("invalid credential header: {error}"))?
        .into_parts()
        .0;
    let scope = make.make_scope(&parts);
    if scope.is_anonymous() {
        return Err(format!(
            "the gateway does not read a scope from the {header} header by default"
        ));
    }
    Ok(scope)
}

/// `idem keys`.
#[derive(Debug, clap::Args)]
pub struct KeysArgs {
    /// The store, as `idem serve --store` takes it (redb:PATH, redis://…, postgres://…)
    #[arg(long, value_name = "URL", global = true)]
    pub store: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: KeysCommand,
}

/// What `idem keys` does.
#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Print a key's record as JSON (exit 1 if there is none)
    Get {
        /// The idempotency key, as the client sent it (without quotes)
        key: String,
        /// The key's scope.
        #[command(flatten)]
        scope: ScopeArgs,
        /// Include the stored body
        #[arg(long)]
        body: bool,
    },
    /// Forget a key, so its next request runs again (exit 1 if there was none)
    Delete {
        /// The idempotency key
        key: String,
        /// The key's scope.
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// List keys held in flight for at least --older-than (stuck leases), oldest first
    Stuck {
        /// Minimum age of the claim, e.g. 30s, 5m
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
        older_than: Duration,
        /// The most keys listed
        #[arg(long, default_value_t = DEFAULT_STUCK_LIMIT, value_parser = parse_limit)]
        limit: usize,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime_serde::re::humantime::parse_duration(text).map_err(|error| error.to_string())
}

fn parse_limit(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(limit) if (1..=MAX_STUCK_LIMIT).contains(&limit) => Ok(limit),
        _ => Err(format!("must be a number from 1 to {MAX_STUCK_LIMIT}")),
    }
}

/// Runs `idem keys`: 0 when done, 1 when the key was not there, 2 on bad usage or an
/// unusable store.
pub fn main(args: &KeysArgs) -> ExitCode {
    let fail = |message: String| {
        eprintln!("error: {message}");
        ExitCode::from(2)
    };
    let Some(url) = &args.store else {
        return fail("--store URL is required (redb:PATH, redis://…, postgres://…)".into());
    };
    let url: StoreUrl = match url.parse() {
        Ok(url) => url,
        Err(error) => return fail(error.to_string()),
    };
    if matches!(url, StoreUrl::Memory(_)) {
        return fail("memory: holds nothing outside the process that made it".into());
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return fail(format!("cannot start the runtime: {error}")),
    };
    runtime.block_on(async {
        let store = match url.open().await {
            Ok(store) => store,
            Err(error) => {
                return fail(format!("cannot open {url}: {}", crate::error_chain(&error)));
            }
        };
        let answer = match &args.command {
            KeysCommand::Get { key, scope, body } => match scoped(key, scope) {
                Ok(key) => get_view(&*store, &key, *body).await,
                Err(message) => return fail(message),
            },
            KeysCommand::Delete { key, scope } => match scoped(key, scope) {
                Ok(key) => delete_view(&*store, &key).await,
                Err(message) => return fail(message),
            },
            KeysCommand::Stuck { older_than, limit } => {
                stuck_view(&*store, *older_than, *limit).await
            }
        };
        match answer {
            Ok((found, view)) => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&view).unwrap_or_default()
                );
                if found {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(error) => fail(format!("the store failed: {}", crate::error_chain(&error))),
        }
    })
}

fn scoped(key: &str, scope: &ScopeArgs) -> Result<ScopedKey, String> {
    let key = operator_key(key).map_err(|error| format!("invalid key: {error}"))?;
    Ok(ScopedKey::new(scope.scope()?, key))
}

/// A key an operator typed or pasted, read as the gateway reads the header: as it was
/// sent (`pay-1`, or the structured-field string `"pay-1"`), of any length a policy may
/// have allowed.
fn operator_key(text: &str) -> Result<Key, idem_core::KeyError> {
    Key::parse_with_max_len(text.as_bytes(), usize::MAX)
}

/// The JSON view of a record; the body only with `body`.
pub fn record_view(key: &ScopedKey, record: &Record, with_body: bool) -> Value {
    let now = SystemTime::now();
    let mut view = json!({
        "scope": key.scope().as_str(),
        "key": key.key().as_str(),
        "fingerprint": record.fingerprint.to_string(),
        "token": record.token.get(),
    });
    match &record.state {
        RecordState::InFlight { lease_expires_at } => {
            view["state"] = "in_flight".into();
            view["lease_expires_at"] = time(*lease_expires_at);
            view["lease_left_ms"] = left_ms(*lease_expires_at, now).into();
        }
        RecordState::Completed { stored, expires_at } => {
            view["state"] = "completed".into();
            view["expires_at"] = time(*expires_at);
            view["expires_in_ms"] = left_ms(*expires_at, now).into();
            view["status"] = stored.status.into();
            view["headers"] = stored
                .headers
                .iter()
                .map(|(name, _)| Value::from(name.as_str()))
                .collect();
            view["body_kept"] = stored.body.is_some().into();
            view["body_bytes"] = stored.body.as_ref().map_or(0, |body| body.len()).into();
            if with_body && let Some(body) = &stored.body {
                match std::str::from_utf8(body) {
                    Ok(text) => view["body"] = text.into(),
                    Err(_) => view["body_hex"] = hex(body).into(),
                }
            }
        }
    }
    view
}

fn stuck_record_view(record: &InFlightRecord) -> Value {
    let now = SystemTime::now();
    json!({
        "scope": record.key.scope().as_str(),
        "key": record.key.key().as_str(),
        "token": record.token.get(),
        "claimed_at": time(record.claimed_at),
        "held_for_ms": now.duration_since(record.claimed_at).map_or(0, |d| d.as_millis() as u64),
        "lease_expires_at": time(record.lease_expires_at),
        "lease_left_ms": left_ms(record.lease_expires_at, now),
    })
}

async fn get_view(
    store: &dyn Store,
    key: &ScopedKey,
    with_body: bool,
) -> Result<(bool, Value), StoreError> {
    Ok(match store.get(key).await? {
        Some(record) => (true, record_view(key, &record, with_body)),
        None => (false, not_found(key)),
    })
}

async fn delete_view(store: &dyn Store, key: &ScopedKey) -> Result<(bool, Value), StoreError> {
    let deleted = store.delete(key).await?;
    Ok((
        deleted,
        json!({"scope": key.scope().as_str(), "key": key.key().as_str(), "deleted": deleted}),
    ))
}

async fn stuck_view(
    store: &dyn Store,
    older_than: Duration,
    limit: usize,
) -> Result<(bool, Value), StoreError> {
    let stuck = store.in_flight(older_than, limit).await?;
    Ok((
        true,
        json!({
            "older_than_ms": older_than.as_millis() as u64,
            "limit": limit,
            "stuck": stuck.iter().map(stuck_record_view).collect::<Vec<_>>(),
        }),
    ))
}

fn not_found(key: &ScopedKey) -> Value {
    json!({"scope": key.scope().as_str(), "key": key.key().as_str(), "error": "no live record"})
}

fn time(at: SystemTime) -> Value {
    idem_core::unix_millis(at).into()
}

fn left_ms(until: SystemTime, now: SystemTime) -> u64 {
    until
        .duration_since(now)
        .map_or(0, |d| d.as_millis() as u64)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Clone)]
struct KeysState {
    store: Arc<dyn Store>,
    token: Option<AdminToken>,
    store_timeout: Duration,
}

/// The admin `/keys` routes on `store`: `GET /keys/{scope}/{key}[?body=true]`,
/// `DELETE /keys/{scope}/{key}`, `GET /keys/stuck[?older_than=30s&limit=100]`. Every one
/// answers `401` without `Authorization: Bearer <token>`, and always when `token` is
/// `None`; each store call is given `store_timeout`.
pub fn routes(store: Arc<dyn Store>, token: Option<AdminToken>, store_timeout: Duration) -> Router {
    Router::new()
        .route("/keys/stuck", get(stuck_route))
        .route("/keys/{scope}/{key}", get(get_route).delete(delete_route))
        .with_state(KeysState {
            store,
            token,
            store_timeout,
        })
}

/// A status and its explanation, turned into a response by [`problem`].
type Refusal = (StatusCode, String);

fn authorized(state: &KeysState, headers: &HeaderMap) -> Result<(), Refusal> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "));
    match (&state.token, presented) {
        (Some(token), Some(presented)) if token.accepts(presented) => Ok(()),
        (None, _) => Err((
            StatusCode::UNAUTHORIZED,
            format!("the /keys routes are off: no admin token is set ({ADMIN_TOKEN_ENV})"),
        )),
        _ => Err((
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token (Authorization: Bearer …)".into(),
        )),
    }
}

fn problem(status: StatusCode, detail: String) -> Response {
    let mut response = (status, axum::Json(json!({"error": detail}))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"idem admin\""),
        );
    }
    response
}

fn answer(state: &KeysState, result: Result<Result<(bool, Value), StoreError>, ()>) -> Response {
    match result {
        Ok(Ok((true, view))) => axum::Json(view).into_response(),
        Ok(Ok((false, view))) => (StatusCode::NOT_FOUND, axum::Json(view)).into_response(),
        Ok(Err(error)) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the store failed: {}", crate::error_chain(&error)),
        ),
        Err(()) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the store did not answer within {:?}", state.store_timeout),
        ),
    }
}

async fn within<T>(state: &KeysState, call: impl Future<Output = T>) -> Result<T, ()> {
    tokio::time::timeout(state.store_timeout, call)
        .await
        .map_err(|_| ())
}

fn path_key(scope: String, key: &str) -> Result<ScopedKey, Refusal> {
    operator_key(key)
        .map(|key| ScopedKey::new(Scope::new(scope), key))
        .map_err(|error| (StatusCode::BAD_REQUEST, format!("invalid key: {error}")))
}

#[derive(Debug, Deserialize)]
struct GetQuery {
    #[serde(default)]
    body: bool,
}

async fn get_route(
    State(state): State<KeysState>,
    headers: HeaderMap,
    UrlPath((scope, key)): UrlPath<(String, String)>,
    Query(query): Query<GetQuery>,
) -> Response {
    if let Err((status, detail)) = authorized(&state, &headers) {
        return problem(status, detail);
    }
    let key = match path_key(scope, &key) {
        Ok(key) => key,
        Err((status, detail)) => return problem(status, detail),
    };
    let result = within(&state, get_view(&*state.store, &key, query.body)).await;
    answer(&state, result)
}

async fn delete_route(
    State(state): State<KeysState>,
    headers: HeaderMap,
    UrlPath((scope, key)): UrlPath<(String, String)>,
) -> Response {
    if let Err((status, detail)) = authorized(&state, &headers) {
        return problem(status, detail);
    }
    let key = match path_key(scope, &key) {
        Ok(key) => key,
        Err((status, detail)) => return problem(status, detail),
    };
    let result = within(&state, delete_view(&*state.store, &key)).await;
    answer(&state, result)
}

#[derive(Debug, Deserialize)]
struct StuckQuery {
    older_than: Option<String>,
    limit: Option<String>,
}

async fn stuck_route(
    State(state): State<KeysState>,
    headers: HeaderMap,
    Query(query): Query<StuckQuery>,
) -> Response {
    if let Err((status, detail)) = authorized(&state, &headers) {
        return problem(status, detail);
    }
    let older_than = match query.older_than.as_deref().map(parse_duration) {
        None => Duration::from_secs(30),
        Some(Ok(duration)) => duration,
        Some(Err(error)) => {
            return problem(StatusCode::BAD_REQUEST, format!("older_than: {error}"));
        }
    };
    let limit = match query.limit.as_deref().map(parse_limit) {
        None => DEFAULT_STUCK_LIMIT,
        Some(Ok(limit)) => limit,
        Some(Err(error)) => return problem(StatusCode::BAD_REQUEST, format!("limit: {error}")),
    };
    let result = within(&state, stuck_view(&*state.store, older_than, limit)).await;
    answer(&state, result)
}
