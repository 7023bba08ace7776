//! What the layer does, as configuration: [`IdempotencyPolicy`].

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};
use serde::{Deserialize, Serialize};

use crate::fingerprint::JsonPointer;

/// How the layer behaves. Every field has a safe default, so an empty configuration is a
/// working one.
///
/// The struct deserializes with `#[serde(default)]` and rejects unknown fields, so a
/// configuration file only names what it changes; durations are human-readable
/// (`"60s"`, `"24h"`). Check a loaded policy with [`validate`](Self::validate) (the layer's
/// constructor does it too): the error names the field at fault.
///
/// ```
/// use std::time::Duration;
/// use idem_http::{IdempotencyPolicy, OnConflict};
///
/// let policy: IdempotencyPolicy = serde_json::from_str(
///     r#"{ "key_required": true, "on_conflict": "wait", "retention": "1h" }"#,
/// ).unwrap();
/// assert!(policy.key_required);
/// assert_eq!(policy.on_conflict, OnConflict::Wait);
/// assert_eq!(policy.retention, Duration::from_secs(3600));
/// assert_eq!(policy.lease, Duration::from_secs(60)); // the default
/// policy.validate().unwrap();
///
/// let bad = IdempotencyPolicy { lease: Duration::ZERO, ..IdempotencyPolicy::default() };
/// assert_eq!(bad.validate().unwrap_err().field(), "lease");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdempotencyPolicy {
    /// The request header carrying the key. Default `Idempotency-Key`.
    ///
    /// It is forwarded to the inner service unchanged, so the service can keep its own
    /// unique constraint as a second line of defence.
    pub header: String,
    /// The methods the layer protects. Default `["POST", "PATCH"]`. Requests with any other
    /// method pass through untouched (their bodies are not buffered). The safe methods
    /// (`GET`, `HEAD`, `OPTIONS`, `TRACE`) are refused here: they need no protection.
    pub methods: Vec<String>,
    /// Whether a protected method must carry a key. Default `false`: a request without a
    /// key passes through untouched. When `true`, it is answered `400`. Has no effect with
    /// [`KeyFrom::Fingerprint`], where a request without a key gets one derived.
    pub key_required: bool,
    /// Where a protected request's key comes from. Default [`KeyFrom::Header`]: only from
    /// the key header. With [`KeyFrom::Fingerprint`], a request without a key is keyed by
    /// its fingerprint for [`fingerprint_window`](Self::fingerprint_window).
    pub key_from: KeyFrom,
    /// With [`KeyFrom::Fingerprint`], how long the outcome of a request keyed by its
    /// fingerprint is kept and replayed (its retention; a request with a key of its own
    /// keeps [`retention`](Self::retention)). An identical request within the window gets
    /// the replay; after it, it runs again. Default 10 min; must be more than zero, at most
    /// 366 days.
    #[serde(with = "humantime_serde")]
    pub fingerprint_window: Duration,
    /// The longest key accepted, in characters. Default 255 (the draft's and Stripe's limit).
    pub max_key_len: usize,
    /// What the `type` URI of every problem answer starts with; the case's slug (e.g.
    /// `in-flight`) follows. Default [`DEFAULT_PROBLEM_TYPE_BASE`], a `tag:` URI (RFC 4151)
    /// that names the cases without pointing at a web page anyone could serve; set it to
    /// your API's documentation (e.g. `https://docs.example.com/errors/`) to link them. At
    /// most 512 printable ASCII characters, no spaces. Stored problems keep the `type` they
    /// were stored with.
    pub problem_type_base: String,
    /// How long a claim holds its key before another request may take it over, should this
    /// process die mid-request. Default 60 s; must be more than zero. While the inner call
    /// runs, the layer renews the lease every third of this.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How long a completed response is kept and replayed. Default 24 h; must be more than
    /// zero.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// The largest request body accepted on a keyed request, in bytes; larger ones are
    /// answered `413` and nothing is stored. Default 1 MiB.
    pub max_request_body: usize,
    /// The largest response body kept for replay, in bytes. Default 1 MiB. A larger response
    /// still reaches its client once; a retry is then told the operation completed but its
    /// response was not kept (`409`, `response-not-kept`), and nothing runs again.
    pub max_stored_body: usize,
    /// Request headers that enter the fingerprint, beside method, path, query and body.
    /// Default `["content-type"]`.
    pub fingerprint_headers: Vec<String>,
    /// For `application/json` and `*+json` bodies, fingerprint the parsed document with
    /// object keys sorted, so key order and whitespace are ignored. A body that does not
    /// parse is fingerprinted as raw bytes. Default `true`.
    pub json_canonical: bool,
    /// JSON pointers (RFC 6901, e.g. `/meta/sent_at`) removed from a JSON body before it is
    /// fingerprinted: timestamps, trace ids. A pointer to an array element blanks it to
    /// `null` (so the other elements keep their positions). Needs `json_canonical`.
    /// Default empty.
    pub json_ignore: Vec<String>,
    /// What a request gets while another with its key is still running. Default
    /// [`OnConflict::Reject`].
    pub on_conflict: OnConflict,
    /// With [`OnConflict::Wait`], how long a request waits for the first to complete before
    /// it is answered `409`. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub wait_timeout: Duration,
    /// When the store cannot be reached: `false` (default) answers `503` with `Retry-After`
    /// (fail closed); `true` forwards the request unprotected and counts it in
    /// [`IdempotencyStats::fail_open`](crate::IdempotencyStats::fail_open).
    pub fail_open: bool,
    /// Whether `5xx` responses are stored and replayed like any other (default `true`: the
    /// failed operation may have had effects). When `false`, the key is released after a
    /// `5xx`, so a retry runs the operation again.
    pub store_server_errors: bool,
    /// Which response headers are stored and replayed. Default: all, except the ones that
    /// are never kept (see [`ReplayHeaders`]).
    pub replay_headers: ReplayHeaders,
    /// Upstream statuses that mean "not processed", beside `408`, `425` and `429` (which
    /// always are): such a response is returned to its client but not stored, and the key
    /// is released so a retry may run. Each must be a `4xx` or `5xx`. Default empty.
    pub release_statuses: Vec<u16>,
    /// How long the inner call may take, up to the end of the part of its response body
    /// that is stored. Past it the request is an unknown outcome (see
    /// [`unknown_outcome`](Self::unknown_outcome)): answered `504` `upstream-timeout` and
    /// never run again automatically. Default 60 s; at most 24 h.
    #[serde(with = "humantime_serde")]
    pub upstream_timeout: Duration,
    /// What happens to a key whose request may have reached the inner service without an
    /// answer (a connection reset or closed after the request was written, or
    /// `upstream_timeout`). Default [`UnknownOutcome::Store`].
    pub unknown_outcome: UnknownOutcome,
    /// The deadline of every single store call (claim, renewal, completion, release).
    /// A store that does not answer in time counts as unavailable. Default 2 s; at most
    /// 5 min.
    #[serde(with = "humantime_serde")]
    pub store_timeout: Duration,
    /// How long storing a completed response is retried when the store fails, while the
    /// lease is renewed. If it still fails, the client gets its response, the key stays
    /// held until its lease ends (never released), and this is logged and counted.
    /// Default 10 s; at most 10 min.
    #[serde(with = "humantime_serde")]
    pub complete_for: Duration,
    /// How long a keyed request's body may take to arrive whole; past it the request is
    /// answered `408` `body-timeout` and nothing runs. Default 10 s; at most 1 h.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// The `Retry-After` hint of a `409` in flight before any upstream latency has been
    /// observed on this layer; afterwards the hint is the observed latency. Never past the
    /// running request's lease. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub in_flight_retry_after: Duration,
    /// Where a caller's identity (its scope) comes from, first present wins: a header name,
    /// or `cookie:NAME` for one named cookie. The whole `cookie` header counts as one
    /// source, so a rotating cookie (a CSRF token, an analytics id) makes a new scope: name
    /// the session cookie instead. Default `["authorization", "x-api-key", "cookie"]`.
    pub scope_sources: Vec<String>,
    /// Refuse keyed requests that carry none of the scope sources with `400`
    /// `missing-identity`, instead of letting them share the anonymous scope. Default
    /// `false`.
    pub scope_required: bool,
}

/// Where a protected request's key comes from.
///
/// ```
/// use std::time::Duration;
/// use idem_http::{IdempotencyPolicy, KeyFrom};
///
/// let policy: IdempotencyPolicy = serde_json::from_str(
///     r#"{ "key_from": "fingerprint", "fingerprint_window": "2m" }"#,
/// ).unwrap();
/// assert_eq!(policy.key_from, KeyFrom::Fingerprint);
/// assert_eq!(policy.fingerprint_window, Duration::from_secs(120));
/// policy.validate().unwrap();
/// assert!(serde_json::from_str::<IdempotencyPolicy>(r#"{ "key_from": "body" }"#).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyFrom {
    /// Only the key header: a request without one passes through (or is refused, with
    /// [`key_required`](IdempotencyPolicy::key_required)).
    #[default]
    Header,
    /// The key header when the request has one (the client's key wins, and a malformed
    /// one is still refused); otherwise a key derived from the request fingerprint
    /// (method, path, query, the fingerprint headers, the body as fingerprinted), kept
    /// for [`fingerprint_window`](IdempotencyPolicy::fingerprint_window) within the
    /// caller's scope. For clients that send no key: a retry of the same request within the
    /// window gets the first answer, so do two genuinely identical operations. Only for
    /// callers with an identity: anonymous callers share one scope, so their keyless
    /// requests are handled as on a [`Header`](Self::Header) route.
    ///
    /// Derived keys live apart from the keys clients send, so a derived key never meets a
    /// request with another fingerprint (no `422`), and a derived key is not forwarded:
    /// the inner service sees the request as the client sent it.
    Fingerprint,
}

/// What happens to a key whose request may have been processed without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownOutcome {
    /// Store the `502` `outcome-unknown` (or `504` `upstream-timeout`) problem as the key's
    /// outcome and replay it for `retention`, like a stored `5xx`. The safe default: the
    /// operation never runs twice; the client checks with the upstream before using a
    /// new key.
    #[default]
    Store,
    /// Leave the key claimed (no renewal) until its lease ends: retries meanwhile get
    /// `409`; after the lease one may run again. For upstreams that catch duplicates
    /// themselves by the forwarded key.
    Hold,
}

impl Default for IdempotencyPolicy {
    fn default() -> Self {
        Self {
            header: "Idempotency-Key".to_owned(),
            methods: vec!["POST".to_owned(), "PATCH".to_owned()],
            key_required: false,
            key_from: KeyFrom::Header,
            fingerprint_window: Duration::from_secs(10 * 60),
            max_key_len: idem_core::DEFAULT_MAX_KEY_LEN,
            problem_type_base: DEFAULT_PROBLEM_TYPE_BASE.to_owned(),
            lease: Duration::from_secs(60),
            retention: Duration::from_secs(24 * 60 * 60),
            max_request_body: 1024 * 1024,
            max_stored_body: 1024 * 1024,
            fingerprint_headers: vec!["content-type".to_owned()],
            json_canonical: true,
            json_ignore: Vec::new(),
            on_conflict: OnConflict::Reject,
            wait_timeout: Duration::from_secs(10),
            fail_open: false,
            store_server_errors: true,
            replay_headers: ReplayHeaders::default(),
            release_statuses: Vec::new(),
            upstream_timeout: Duration::from_secs(60),
            unknown_outcome: UnknownOutcome::Store,
            store_timeout: Duration::from_secs(2),
            complete_for: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            in_flight_retry_after: Duration::from_secs(1),
            scope_sources: vec![
                "authorization".to_owned(),
                "x-api-key".to_owned(),
                "cookie".to_owned(),
            ],
            scope_required: false,
        }
    }
}

/// What a request gets while another request with its key is still running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnConflict {
    /// Answer `409` problem+json at once, with `Retry-After` set to the seconds left on the
    /// running request's lease (rounded up, at least 1).
    #[default]
    Reject,
    /// Poll the store with backoff until the first request completes, then answer with its
    /// replay; after `wait_timeout`, answer `409` as [`Reject`](Self::Reject) does.
    Wait,
}

/// Which response headers are stored and replayed.
///
/// Whatever the choice, these are never stored: the hop-by-hop headers (`connection`,
/// `keep-alive`, `proxy-*`, `te`, `trailer`, `transfer-encoding`, `upgrade`, and any header
/// the response's `Connection` names), `date` (a replay is dated by the server sending it),
/// `content-length` (recomputed), and the layer's own `idempotent-replayed` and
/// `idempotency-key-expires`.
///
/// In a configuration file: `{ "all_except": ["set-cookie"] }` or
/// `{ "only": ["content-type", "location"] }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayHeaders {
    /// Every header except the listed ones. The default is `AllExcept([])`.
    AllExcept(Vec<String>),
    /// Only the listed headers.
    Only(Vec<String>),
}

impl Default for ReplayHeaders {
    fn default() -> Self {
        Self::AllExcept(Vec::new())
    }
}

/// A policy field with an unusable value, as [`IdempotencyPolicy::validate`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid idempotency policy: `{field}` {reason}")]
pub struct PolicyError {
    field: &'static str,
    reason: String,
}

impl PolicyError {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }

    /// The name of the field at fault, as it is spelled in a configuration file.
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// What is wrong with it.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl IdempotencyPolicy {
    /// Checks every field; the error names the first one at fault.
    pub fn validate(&self) -> Result<(), PolicyError> {
        self.compile().map(drop)
    }

    /// Checks every field once and keeps the result, so that whoever holds the
    /// [`ValidPolicy`] (a configuration loader, then [`IdempotencyLayer::validated`]) never
    /// checks it again; the error names the first field at fault.
    ///
    /// [`IdempotencyLayer::validated`]: crate::IdempotencyLayer::validated
    pub fn validated(self) -> Result<ValidPolicy, PolicyError> {
        self.compile().map(|config| ValidPolicy(Arc::new(config)))
    }

    pub(crate) fn compile(&self) -> Result<Config, PolicyError> {
        let header = header_name("header", &self.header)?;
        let mut methods = Vec::with_capacity(self.methods.len());
        for method in &self.methods {
            // Frameworks upper-case the method they receive, so idem decides on the same.
            let parsed =
                Method::from_bytes(method.to_ascii_uppercase().as_bytes()).map_err(|_| {
                    PolicyError::new("methods", format!("has {method:?}, which is not a method"))
                })?;
            if matches!(
                parsed,
                Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
            ) {
                return Err(PolicyError::new(
                    "methods",
                    format!("has {method}, a safe method that is always passed through"),
                ));
            }
            methods.push(parsed);
        }
        if self.max_key_len == 0 {
            return Err(PolicyError::new("max_key_len", "must be at least 1"));
        }
        let base = &self.problem_type_base;
        if base.is_empty()
            || base.len() > MAX_PROBLEM_TYPE_BASE
            || !base.bytes().all(|byte| byte.is_ascii_graphic())
        {
            return Err(PolicyError::new(
                "problem_type_base",
                format!(
                    "must be 1 to {MAX_PROBLEM_TYPE_BASE} printable ASCII characters without \
                     spaces (a URI such as https://docs.example.com/errors/), got {base:?}"
                ),
            ));
        }
        for (field, value, at_most) in [
            ("lease", self.lease, MAX_LEASE),
            ("retention", self.retention, MAX_RETENTION),
            ("fingerprint_window", self.fingerprint_window, MAX_RETENTION),
            ("wait_timeout", self.wait_timeout, MAX_WAIT),
            (
                "upstream_timeout",
                self.upstream_timeout,
                MAX_UPSTREAM_TIMEOUT,
            ),
            ("store_timeout", self.store_timeout, MAX_STORE_TIMEOUT),
            (
                "body_read_timeout",
                self.body_read_timeout,
                MAX_BODY_READ_TIMEOUT,
            ),
            (
                "in_flight_retry_after",
                self.in_flight_retry_after,
                MAX_WAIT,
            ),
        ] {
            if value.is_zero() {
                return Err(PolicyError::new(field, "must be more than zero"));
            }
            if value > at_most {
                return Err(PolicyError::new(
                    field,
                    format!("is {value:?}; at most {at_most:?} is allowed"),
                ));
            }
        }
        if self.complete_for > MAX_COMPLETE_FOR {
            return Err(PolicyError::new(
                "complete_for",
                format!(
                    "is {:?}; at most {MAX_COMPLETE_FOR:?} is allowed",
                    self.complete_for
                ),
            ));
        }
        let mut release_statuses = RELEASED_ALWAYS.to_vec();
        for &status in &self.release_statuses {
            if !(400..=599).contains(&status) {
                return Err(PolicyError::new(
                    "release_statuses",
                    format!("has {status}; only 4xx and 5xx statuses can mean \"not processed\""),
                ));
            }
            release_statuses.push(status);
        }
        let scope_sources = self
            .scope_sources
            .iter()
            .map(|source| {
                ScopeSource::parse(source).ok_or_else(|| {
                    PolicyError::new(
                        "scope_sources",
                        format!("has {source:?}, which is neither a header name nor `cookie:NAME`"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let fingerprint_headers = self
            .fingerprint_headers
            .iter()
            .map(|name| header_name("fingerprint_headers", name))
            .collect::<Result<Vec<_>, _>>()?;
        if !self.json_canonical && !self.json_ignore.is_empty() {
            return Err(PolicyError::new(
                "json_ignore",
                "needs `json_canonical = true`: fields are only left out of parsed JSON",
            ));
        }
        let json_ignore = self
            .json_ignore
            .iter()
            .map(|pointer| {
                pointer.parse::<JsonPointer>().map_err(|e| {
                    PolicyError::new("json_ignore", format!("has {pointer:?}, which {e}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let replay = match &self.replay_headers {
            ReplayHeaders::AllExcept(names) => HeaderFilter {
                only: false,
                names: header_names("replay_headers", names)?,
            },
            ReplayHeaders::Only(names) => HeaderFilter {
                only: true,
                names: header_names("replay_headers", names)?,
            },
        };
        Ok(Config {
            policy: self.clone(),
            header,
            methods,
            fingerprint_headers,
            json_ignore,
            replay,
            release_statuses,
            scope_sources,
        })
    }
}

fn header_name(field: &'static str, name: &str) -> Result<HeaderName, PolicyError> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| PolicyError::new(field, format!("has {name:?}, which is not a header name")))
}

fn header_names(field: &'static str, names: &[String]) -> Result<Vec<HeaderName>, PolicyError> {
    names.iter().map(|name| header_name(field, name)).collect()
}

/// Upstream statuses that always mean "not processed": `408` Request Timeout, `425` Too
/// Early, `429` Too Many Requests.
pub const RELEASED_ALWAYS: [u16; 3] = [408, 425, 429];

/// The default start of problem `type` URIs: a `tag:` URI (RFC 4151, which RFC 9457 names
/// for types that are not meant to be dereferenced) under `idem.invalid`, a name no one can
/// ever own (RFC 6761), so the URIs cannot collide with anyone else's nor be served by them.
pub const DEFAULT_PROBLEM_TYPE_BASE: &str = "tag:idem.invalid,2026:problem:";
const MAX_PROBLEM_TYPE_BASE: usize = 512;
const MAX_LEASE: Duration = Duration::from_secs(24 * 60 * 60);
const MAX_RETENTION: Duration = Duration::from_secs(366 * 24 * 60 * 60);
const MAX_WAIT: Duration = Duration::from_secs(10 * 60);
const MAX_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);
const MAX_STORE_TIMEOUT: Duration = Duration::from_secs(5 * 60);
const MAX_COMPLETE_FOR: Duration = Duration::from_secs(10 * 60);
const MAX_BODY_READ_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// An [`IdempotencyPolicy`] known to be valid, with its header names, methods and JSON
/// pointers parsed once: made by [`IdempotencyPolicy::validated`], taken by
/// [`IdempotencyLayer::validated`](crate::IdempotencyLayer::validated). It reads as the
/// policy it was made from, and is cheap to clone.
///
/// ```
/// use std::time::Duration;
/// use idem_core::MemoryStore;
/// use idem_http::{IdempotencyLayer, IdempotencyPolicy};
///
/// let policy = IdempotencyPolicy { key_required: true, ..IdempotencyPolicy::default() }
///     .validated()?;
/// assert!(policy.key_required);
/// let layer = IdempotencyLayer::validated(MemoryStore::new(), policy.clone());
/// # let _ = layer;
///
/// let bad = IdempotencyPolicy { lease: Duration::ZERO, ..IdempotencyPolicy::default() };
/// assert_eq!(bad.validated().unwrap_err().field(), "lease");
/// # Ok::<(), idem_http::PolicyError>(())
/// ```
#[derive(Debug, Clone)]
pub struct ValidPolicy(Arc<Config>);

impl ValidPolicy {
    /// The policy as it was given.
    pub fn policy(&self) -> &IdempotencyPolicy {
        &self.0.policy
    }

    pub(crate) fn config(&self) -> &Arc<Config> {
        &self.0
    }
}

impl Deref for ValidPolicy {
    type Target = IdempotencyPolicy;

    fn deref(&self) -> &IdempotencyPolicy {
        self.policy()
    }
}

impl Default for ValidPolicy {
    /// The default policy, which is valid.
    fn default() -> Self {
        IdempotencyPolicy::default()
            .validated()
            .expect("the default policy is valid")
    }
}

impl TryFrom<IdempotencyPolicy> for ValidPolicy {
    type Error = PolicyError;

    fn try_from(policy: IdempotencyPolicy) -> Result<Self, PolicyError> {
        policy.validated()
    }
}

/// A validated policy, with names parsed once.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) policy: IdempotencyPolicy,
    pub(crate) header: HeaderName,
    pub(crate) methods: Vec<Method>,
    pub(crate) fingerprint_headers: Vec<HeaderName>,
    pub(crate) json_ignore: Vec<JsonPointer>,
    pub(crate) replay: HeaderFilter,
    pub(crate) release_statuses: Vec<u16>,
    pub(crate) scope_sources: Vec<ScopeSource>,
}

impl Config {
    /// Whether `method` is protected, compared as the frameworks behind the layer compare
    /// it: without regard to case.
    pub(crate) fn covers(&self, method: &Method) -> bool {
        self.methods
            .iter()
            .any(|covered| covered.as_str().eq_ignore_ascii_case(method.as_str()))
    }

    /// Whether a protected request without a key gets one derived from its fingerprint.
    pub(crate) fn derives_keys(&self) -> bool {
        self.policy.key_from == KeyFrom::Fingerprint
    }

    /// Whether an upstream answer with `status` means nothing was processed, so the key is
    /// released rather than the answer stored.
    pub(crate) fn releases(&self, status: http::StatusCode) -> bool {
        self.release_statuses.contains(&status.as_u16())
            || (status.is_server_error() && !self.policy.store_server_errors)
    }

    /// The headers idem decides on, which a client's `Connection` must not strip before
    /// the inner service sees them.
    pub(crate) fn relied_on(&self, name: &str) -> bool {
        self.header.as_str().eq_ignore_ascii_case(name)
            || self
                .fingerprint_headers
                .iter()
                .any(|header| header.as_str().eq_ignore_ascii_case(name))
            || self.scope_sources.iter().any(|source| match source {
                ScopeSource::Header(header) => header.as_str().eq_ignore_ascii_case(name),
                ScopeSource::Cookie(_) => name.eq_ignore_ascii_case("cookie"),
            })
    }
}

/// One place a caller's identity is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ScopeSource {
    /// Every value of this header.
    Header(HeaderName),
    /// The value of this one cookie.
    Cookie(String),
}

impl ScopeSource {
    fn parse(text: &str) -> Option<Self> {
        match text.split_once(':') {
            Some((kind, name)) if kind.eq_ignore_ascii_case("cookie") => {
                let valid = !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
                valid.then(|| Self::Cookie(name.to_owned()))
            }
            Some(_) => None,
            None => HeaderName::from_bytes(text.as_bytes())
                .ok()
                .map(Self::Header),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct HeaderFilter {
    only: bool,
    names: Vec<HeaderName>,
}

impl HeaderFilter {
    pub(crate) fn keeps(&self, name: &HeaderName) -> bool {
        self.names.contains(name) == self.only
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let policy = IdempotencyPolicy::default();
        policy.validate().unwrap();
        assert_eq!(policy.header, "Idempotency-Key");
        assert_eq!(policy.methods, ["POST", "PATCH"]);
        assert_eq!(policy.max_key_len, 255);
        assert_eq!(policy.key_from, KeyFrom::Header);
        assert_eq!(policy.fingerprint_window, Duration::from_secs(600));
        assert_eq!(policy.lease, Duration::from_secs(60));
        assert_eq!(policy.retention, Duration::from_secs(86_400));
        assert_eq!(policy.max_request_body, 1 << 20);
        assert_eq!(policy.max_stored_body, 1 << 20);
        assert_eq!(policy.fingerprint_headers, ["content-type"]);
        assert!(policy.json_canonical);
        assert_eq!(policy.on_conflict, OnConflict::Reject);
        assert_eq!(policy.wait_timeout, Duration::from_secs(10));
        assert!(!policy.fail_open);
        assert!(policy.store_server_errors);
        assert!(policy.release_statuses.is_empty());
        assert_eq!(policy.upstream_timeout, Duration::from_secs(60));
        assert_eq!(policy.unknown_outcome, UnknownOutcome::Store);
        assert_eq!(policy.store_timeout, Duration::from_secs(2));
        assert_eq!(policy.complete_for, Duration::from_secs(10));
        assert_eq!(policy.body_read_timeout, Duration::from_secs(10));
        assert_eq!(policy.in_flight_retry_after, Duration::from_secs(1));
        assert_eq!(
            policy.scope_sources,
            ["authorization", "x-api-key", "cookie"]
        );
        assert!(!policy.scope_required);
    }

    #[test]
    fn scope_sources_are_headers_or_named_cookies() {
        let config = IdempotencyPolicy {
            scope_sources: vec!["X-Tenant".into(), "cookie:session".into()],
            ..Default::default()
        }
        .compile()
        .unwrap();
        assert_eq!(
            config.scope_sources,
            [
                ScopeSource::Header(HeaderName::from_static("x-tenant")),
                ScopeSource::Cookie("session".into())
            ]
        );
        for bad in ["cookie:", "cookie:a b", "bad header", "other:x"] {
            let policy = IdempotencyPolicy {
                scope_sources: vec![bad.into()],
                ..Default::default()
            };
            assert_eq!(
                policy.validate().unwrap_err().field(),
                "scope_sources",
                "{bad}"
            );
        }
    }

    #[test]
    fn an_empty_document_is_the_default_policy() {
        let policy: IdempotencyPolicy = serde_json::from_str("{}").unwrap();
        assert_eq!(policy, IdempotencyPolicy::default());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_json::from_str::<IdempotencyPolicy>(r#"{"leese": "5s"}"#).unwrap_err();
        assert!(err.to_string().contains("leese"), "{err}");
    }

    #[test]
    fn reads_durations_and_replay_headers() {
        let policy: IdempotencyPolicy = serde_json::from_str(
            r#"{"lease": "90s", "wait_timeout": "250ms",
                "replay_headers": {"only": ["content-type"]}}"#,
        )
        .unwrap();
        assert_eq!(policy.lease, Duration::from_secs(90));
        assert_eq!(policy.wait_timeout, Duration::from_millis(250));
        assert_eq!(
            policy.replay_headers,
            ReplayHeaders::Only(vec!["content-type".into()])
        );
        let round_trip: IdempotencyPolicy =
            serde_json::from_str(&serde_json::to_string(&policy).unwrap()).unwrap();
        assert_eq!(round_trip, policy);
    }

    #[test]
    fn validate_names_the_bad_field() {
        let cases: Vec<(&str, IdempotencyPolicy)> = vec![
            (
                "header",
                IdempotencyPolicy {
                    header: "bad header".into(),
                    ..Default::default()
                },
            ),
            (
                "methods",
                IdempotencyPolicy {
                    methods: vec!["GET".into()],
                    ..Default::default()
                },
            ),
            (
                "methods",
                IdempotencyPolicy {
                    methods: vec!["PO ST".into()],
                    ..Default::default()
                },
            ),
            (
                "max_key_len",
                IdempotencyPolicy {
                    max_key_len: 0,
                    ..Default::default()
                },
            ),
            (
                "lease",
                IdempotencyPolicy {
                    lease: Duration::ZERO,
                    ..Default::default()
                },
            ),
            (
                "retention",
                IdempotencyPolicy {
                    retention: Duration::ZERO,
                    ..Default::default()
                },
            ),
            (
                "fingerprint_window",
                IdempotencyPolicy {
                    fingerprint_window: Duration::ZERO,
                    ..Default::default()
                },
            ),
            (
                "fingerprint_window",
                IdempotencyPolicy {
                    fingerprint_window: Duration::from_secs(367 * 24 * 60 * 60),
                    ..Default::default()
                },
            ),
            (
                "fingerprint_headers",
                IdempotencyPolicy {
                    fingerprint_headers: vec!["a:b".into()],
                    ..Default::default()
                },
            ),
            (
                "json_ignore",
                IdempotencyPolicy {
                    json_ignore: vec!["no-slash".into()],
                    ..Default::default()
                },
            ),
            (
                "json_ignore",
                IdempotencyPolicy {
                    json_canonical: false,
                    json_ignore: vec!["/ts".into()],
                    ..Default::default()
                },
            ),
            (
                "replay_headers",
                IdempotencyPolicy {
                    replay_headers: ReplayHeaders::Only(vec!["".into()]),
                    ..Default::default()
                },
            ),
        ];
        for (field, policy) in cases {
            let err = policy.validate().unwrap_err();
            assert_eq!(err.field(), field, "{err}");
            assert!(err.to_string().contains(field), "{err}");
        }
    }

    #[test]
    fn replay_filter_keeps_what_it_should() {
        let all = IdempotencyPolicy::default().compile().unwrap().replay;
        assert!(all.keeps(&HeaderName::from_static("set-cookie")));
        let except = IdempotencyPolicy {
            replay_headers: ReplayHeaders::AllExcept(vec!["Set-Cookie".into()]),
            ..Default::default()
        }
        .compile()
        .unwrap()
        .replay;
        assert!(!except.keeps(&HeaderName::from_static("set-cookie")));
        assert!(except.keeps(&HeaderName::from_static("location")));
        let only = IdempotencyPolicy {
            replay_headers: ReplayHeaders::Only(vec!["location".into()]),
            ..Default::default()
        }
        .compile()
        .unwrap()
        .replay;
        assert!(only.keeps(&HeaderName::from_static("location")));
        assert!(!only.keeps(&HeaderName::from_static("set-cookie")));
    }
}
