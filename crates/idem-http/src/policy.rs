//! What the layer does, as configuration: [`IdempotencyPolicy`].

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
    /// key passes through untouched. When `true`, it is answered `400`.
    pub key_required: bool,
    /// The longest key accepted, in characters. Default 255 (the draft's and Stripe's limit).
    pub max_key_len: usize,
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
}

impl Default for IdempotencyPolicy {
    fn default() -> Self {
        Self {
            header: "Idempotency-Key".to_owned(),
            methods: vec!["POST".to_owned(), "PATCH".to_owned()],
            key_required: false,
            max_key_len: idem::DEFAULT_MAX_KEY_LEN,
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

    pub(crate) fn compile(&self) -> Result<Config, PolicyError> {
        let header = header_name("header", &self.header)?;
        let mut methods = Vec::with_capacity(self.methods.len());
        for method in &self.methods {
            let parsed = Method::from_bytes(method.as_bytes()).map_err(|_| {
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
        if self.lease.is_zero() {
            return Err(PolicyError::new("lease", "must be more than zero"));
        }
        if self.retention.is_zero() {
            return Err(PolicyError::new("retention", "must be more than zero"));
        }
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

/// A validated policy, with names parsed once.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) policy: IdempotencyPolicy,
    pub(crate) header: HeaderName,
    pub(crate) methods: Vec<Method>,
    pub(crate) fingerprint_headers: Vec<HeaderName>,
    pub(crate) json_ignore: Vec<JsonPointer>,
    pub(crate) replay: HeaderFilter,
}

impl Config {
    pub(crate) fn covers(&self, method: &Method) -> bool {
        self.methods.contains(method)
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
