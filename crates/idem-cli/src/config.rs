//! The gateway's configuration: a TOML file, overridden by command-line flags, validated
//! into a [`GatewayConfig`] whose errors name the field at fault.
//!
//! ```toml
//! listen = "127.0.0.1:8080"
//! upstream = "http://127.0.0.1:3000"
//! store = "fjall:idem.fjall"
//!
//! # The policy for every route (any field of idem_http::IdempotencyPolicy).
//! [policy]
//! retention = "24h"
//!
//! # Routes, first match wins; each overrides only the policy fields it names.
//! [[route]]
//! prefix = "/payments"
//! policy = { key_required = true, on_conflict = "wait" }
//!
//! [[route]]
//! pattern = "/orders/*/items"
//! methods = ["POST"]
//! policy = { json_ignore = ["/sent_at"] }
//! ```
//!
//! Routes match the path as the upstream will see it: percent-decoded by
//! [`idem_http::path::normalize_path`], with methods compared case-insensitively. A path that
//! `normalize_path` refuses (an encoded `/`, a dot segment, …) never reaches a route: see
//! [`GatewayConfig::route`].
//!
//! The server's own limits are top-level keys, each with a safe default (see
//! [`ServerLimits`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Method;
use idem_http::path::{PathError, normalize_path};
use idem_http::{IdempotencyPolicy, KeyFrom, OnConflict, ValidPolicy};
use serde::Deserialize;

use crate::proxy::Upstream;
use crate::store_url::StoreUrl;
use crate::tls::TlsFiles;

/// The configuration file, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// Address to listen on.
    pub listen: Option<String>,
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`), or `off`.
    pub admin_listen: Option<String>,
    /// How long a key may stay in flight before `/metrics` counts it as a stuck lease.
    #[serde(with = "humantime_serde")]
    pub stuck_after: Option<Duration>,
    /// The service behind the gateway.
    pub upstream: Option<String>,
    /// `[upstream_tls]`: the authorities an `https://` upstream is verified against, and
    /// the client certificate to present to it.
    pub upstream_tls: TlsFiles,
    /// Where records live.
    pub store: Option<String>,
    /// How long to wait for a connection to the upstream.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    /// How long shutdown waits for requests in flight.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Option<Duration>,
    /// Open client connections at most; beyond it a new connection is answered `503`.
    pub max_connections: Option<usize>,
    /// Concurrent requests (streams) on one HTTP/2 connection at most.
    pub http2_max_concurrent_streams: Option<u32>,
    /// The largest request head (request line and headers), in bytes.
    pub max_header_bytes: Option<usize>,
    /// How long a request head may take to arrive, and how long a connection may stay
    /// without a request.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Option<Duration>,
    /// Bytes of keyed request bodies buffered at once, across every route.
    pub max_buffered_bodies: Option<usize>,
    /// How long a keyed request waits for room under `max_buffered_bodies`.
    #[serde(with = "humantime_serde")]
    pub buffer_wait: Option<Duration>,
    /// The policy for every route.
    pub policy: toml::Table,
    /// Per-route policies.
    pub route: Vec<RouteConfig>,
}

/// One `[[route]]` of the file.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteConfig {
    /// Matches this path and everything below it (`/payments` matches `/payments/1`, not
    /// `/paymentsx`).
    pub prefix: Option<String>,
    /// Matches paths segment by segment: `*` is any one segment, a final `**` any rest.
    pub pattern: Option<String>,
    /// Matches only these methods (default: any).
    pub methods: Option<Vec<String>>,
    /// Policy fields that differ from the file's `[policy]`.
    pub policy: toml::Table,
}

/// Command-line settings; each one set overrides the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--admin-listen`: an address, or `off`.
    pub admin_listen: Option<String>,
    /// `--upstream`.
    pub upstream: Option<String>,
    /// `--store`.
    pub store: Option<String>,
    /// `--require-key`.
    pub require_key: bool,
    /// `--on-conflict`.
    pub on_conflict: Option<OnConflict>,
    /// The `IDEM_SCOPE_SECRET` environment variable, as read by the caller (the library does
    /// not read the environment itself).
    pub scope_secret: Option<Vec<u8>>,
    /// `--scope-secret-file`: a file holding the scope secret (a final newline is dropped).
    pub scope_secret_file: Option<PathBuf>,
    /// The `IDEM_ADMIN_TOKEN` environment variable, as read by the caller (a final newline
    /// is dropped).
    pub admin_token: Option<Vec<u8>>,
    /// `--admin-token-file`: a file holding the admin token (a final newline is dropped).
    pub admin_token_file: Option<PathBuf>,
}

/// A configuration problem, naming where it is.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    /// The field, as spelled in the file or on the command line.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Self {
            field: field.into(),
            message: message.to_string(),
        }
    }
}

/// Which requests a route covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    /// The path and everything below it.
    Prefix(String),
    /// Segment by segment, `*` for one segment, a final `**` for any rest.
    Pattern(Vec<String>),
}

impl PathMatch {
    /// Whether `path` (normalised: see [`normalize_path`]) is covered.
    ///
    /// Matching errs towards protecting: letters match without regard to case, and one
    /// trailing `/` is ignored, because frameworks behind the gateway (Express, ASP.NET
    /// Core, Spring) route `/PAY` and `/pay/` to the `/pay` handler. A path that only
    /// looks alike to idem at worst needs a key the upstream would not have needed.
    ///
    /// ```
    /// use idem_cli::config::PathMatch;
    ///
    /// let prefix = PathMatch::Prefix("/payments".into());
    /// assert!(prefix.matches("/payments") && prefix.matches("/payments/7"));
    /// assert!(prefix.matches("/Payments/") && prefix.matches("/PAYMENTS"));
    /// assert!(!prefix.matches("/paymentsx"));
    /// let pattern = PathMatch::Pattern(vec!["orders".into(), "*".into(), "items".into()]);
    /// assert!(pattern.matches("/orders/9/items") && !pattern.matches("/orders/9/items/1"));
    /// assert!(pattern.matches("/orders/9/items/") && pattern.matches("/Orders/9/ITEMS"));
    /// ```
    pub fn matches(&self, path: &str) -> bool {
        let path = path
            .strip_suffix('/')
            .filter(|p| !p.is_empty())
            .unwrap_or(path);
        match self {
            Self::Prefix(prefix) => {
                let prefix = prefix.trim_end_matches('/');
                path.len() >= prefix.len()
                    && path.is_char_boundary(prefix.len())
                    && path[..prefix.len()].eq_ignore_ascii_case(prefix)
                    && (path.len() == prefix.len() || path[prefix.len()..].starts_with('/'))
            }
            Self::Pattern(segments) => {
                let mut parts = path.trim_start_matches('/').split('/');
                for segment in segments {
                    if segment == "**" {
                        return true;
                    }
                    match parts.next() {
                        Some(part) if segment == "*" || segment.eq_ignore_ascii_case(part) => {}
                        _ => return false,
                    }
                }
                parts.next().is_none()
            }
        }
    }
}

/// A route: what it covers and its policy.
#[derive(Debug, Clone)]
pub struct Route {
    /// Paths covered.
    pub path: PathMatch,
    /// Methods covered, upper case; empty means any.
    pub methods: Vec<Method>,
    /// Its policy.
    pub policy: ValidPolicy,
}

impl Route {
    /// Whether this route covers a request with `method` (in any case) for `path` (already
    /// normalised: see [`normalize_path`]).
    ///
    /// ```
    /// use http::Method;
    /// use idem_cli::config::{PathMatch, Route};
    ///
    /// let route = Route {
    ///     path: PathMatch::Prefix("/pay".into()),
    ///     methods: vec![Method::POST],
    ///     policy: Default::default(),
    /// };
    /// let lower = Method::from_bytes(b"post").unwrap();
    /// assert!(route.covers(&lower, "/pay") && route.covers(&Method::POST, "/pay/1"));
    /// assert!(!route.covers(&Method::GET, "/pay"));
    /// ```
    pub fn covers(&self, method: &Method, path: &str) -> bool {
        self.admits(method) && self.path.matches(path)
    }

    /// Whether the route's method filter lets `method` (in any case) in.
    pub fn admits(&self, method: &Method) -> bool {
        self.methods.is_empty()
            || self
                .methods
                .iter()
                .any(|own| own.as_str().eq_ignore_ascii_case(method.as_str()))
    }
}

/// Whether `policy` protects `method`, compared case-insensitively.
pub fn protects(policy: &IdempotencyPolicy, method: &Method) -> bool {
    policy
        .methods
        .iter()
        .any(|own| own.eq_ignore_ascii_case(method.as_str()))
}

/// Where a request goes: the one routing decision ([`GatewayConfig::route`]), the
/// gateway's and its tests'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routing {
    /// The route at this index of [`GatewayConfig::routes`] covers it.
    Route(usize),
    /// No route covers it: the default policy applies.
    Default,
    /// A protected method on a path that [`normalize_path`] refuses: answer `400`
    /// `ambiguous-path`.
    Ambiguous(PathError),
}

/// The server's limits: connections, request heads, buffered bodies. Every field has a safe
/// default and is bounded in validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLimits {
    /// Open client connections at most (default 1024). A connection beyond it gets a minimal
    /// `503` with `Retry-After: 1` and `Connection: close`, and is closed.
    pub max_connections: usize,
    /// Concurrent streams on one HTTP/2 connection (default 100).
    pub http2_max_concurrent_streams: u32,
    /// The largest request head in bytes (default 64 KiB): HTTP/1's read buffer and
    /// HTTP/2's header list size.
    pub max_header_bytes: usize,
    /// How long a request head may take to arrive, and how long a connection may stay open
    /// without a request in flight (default 10 s).
    pub header_read_timeout: Duration,
    /// Bytes of keyed request bodies buffered at once across every route (default 64 MiB):
    /// one [`idem_http::BodyBudget`].
    pub max_buffered_bodies: usize,
    /// How long a keyed request waits for room in that budget before `503` (default 1 s).
    pub buffer_wait: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            http2_max_concurrent_streams: 100,
            max_header_bytes: 64 << 10,
            header_read_timeout: Duration::from_secs(10),
            max_buffered_bodies: idem_http::DEFAULT_BODY_BUDGET,
            buffer_wait: idem_http::DEFAULT_BODY_BUDGET_WAIT,
        }
    }
}

/// The secret that keys scope digests: at least [`MIN_SCOPE_SECRET`] bytes. Its `Debug`
/// never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ScopeSecret {
    bytes: Vec<u8>,
    from: String,
}

/// The shortest scope secret accepted, in bytes.
pub const MIN_SCOPE_SECRET: usize = 16;

/// The environment variable the `idem` command reads the scope secret from.
pub const SCOPE_SECRET_ENV: &str = "IDEM_SCOPE_SECRET";

/// `bytes` without one final `\n` or `\r\n`: the line ending that editors and `echo` add
/// to a secret's file. The one place a given secret loses its line ending.
fn without_final_line_ending(bytes: &[u8]) -> &[u8] {
    match bytes.strip_suffix(b"\n") {
        Some(line) => line.strip_suffix(b"\r").unwrap_or(line),
        None => bytes,
    }
}

impl ScopeSecret {
    /// The secret's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Where it came from (`IDEM_SCOPE_SECRET` or the file), for `--check` and logs.
    pub fn source(&self) -> &str {
        &self.from
    }
}

impl std::fmt::Debug for ScopeSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ScopeSecret(*** from {})", self.from)
    }
}

/// The validated configuration of `idem serve`.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Where the admin listener (`/metrics`, `/healthz`, `/readyz`) listens (default
    /// [`DEFAULT_ADMIN_LISTEN`]); `None` when turned `off`.
    pub admin_listen: Option<SocketAddr>,
    /// How long a key may stay in flight before `/metrics` counts it in `idem_stuck_leases`
    /// (default 5 min).
    pub stuck_after: Duration,
    /// Where to forward.
    pub upstream: Upstream,
    /// Where records live.
    pub store: StoreUrl,
    /// Upstream connect timeout (default 5 s).
    pub connect_timeout: Duration,
    /// How long shutdown waits for requests in flight (default 30 s).
    pub shutdown_timeout: Duration,
    /// Connection, head and body limits.
    pub limits: ServerLimits,
    /// The key of scope digests; `None` leaves them unkeyed (a warning at startup).
    pub scope_secret: Option<ScopeSecret>,
    /// The bearer token of the admin `/keys` routes; `None` closes them.
    pub admin_token: Option<crate::keys::AdminToken>,
    /// The policy of requests no route covers.
    pub default_policy: ValidPolicy,
    /// Routes, first match wins.
    pub routes: Vec<Route>,
}

/// The default `--listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// The default `--admin-listen`: loopback only, since metrics tell a lot about traffic.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// The default `--store`.
pub const DEFAULT_STORE: &str = "fjall:idem.fjall";

impl GatewayConfig {
    /// Reads `file` (if given), applies `overrides`, and validates everything.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let parsed = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
                })?;
                toml::from_str::<FileConfig>(&text).map_err(|e| {
                    ConfigError::new(path.display().to_string(), e.to_string().trim_end())
                })?
            }
            None => FileConfig::default(),
        };
        Self::resolve(parsed, overrides)
    }

    /// Validates a parsed file with overrides applied.
    pub fn resolve(file: FileConfig, overrides: &Overrides) -> Result<Self, ConfigError> {
        let listen_text = overrides
            .listen
            .clone()
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen = listen_text.parse().map_err(|_| {
            ConfigError::new(
                "listen",
                format!("`{listen_text}` is not an address like 127.0.0.1:8080"),
            )
        })?;
        let admin_listen = admin_address(
            overrides
                .admin_listen
                .as_deref()
                .or(file.admin_listen.as_deref())
                .unwrap_or(DEFAULT_ADMIN_LISTEN),
        )?;
        let admin_token = given_secret(
            crate::keys::ADMIN_TOKEN_ENV,
            // Unlike the scope secret's (which keys digests, so it is taken as it is), the
            // admin token's variable drops a final line ending too: it is only compared.
            overrides
                .admin_token
                .as_deref()
                .map(without_final_line_ending),
            "--admin-token-file",
            overrides.admin_token_file.as_deref(),
        )?
        .map(|given| {
            crate::keys::AdminToken::new(&given.bytes)
                .map_err(|e| ConfigError::new(given.field, e.to_string()))
        })
        .transpose()?;
        if let Some(addr) = admin_listen {
            crate::keys::check_exposure(addr, admin_token.as_ref())
                .map_err(|e| ConfigError::new("admin_listen", e.to_string()))?;
        }
        let upstream_text = overrides
            .upstream
            .clone()
            .or(file.upstream)
            .ok_or_else(|| {
                ConfigError::new(
                    "upstream",
                    "is required: pass --upstream http://host:port or set `upstream` in the file",
                )
            })?;
        let upstream =
            Upstream::parse_with_tls(&upstream_text, &file.upstream_tls).map_err(|e| {
                ConfigError::new(
                    if e.is_tls() {
                        "upstream_tls"
                    } else {
                        "upstream"
                    },
                    e,
                )
            })?;
        let store_text = overrides
            .store
            .clone()
            .or(file.store)
            .unwrap_or_else(|| DEFAULT_STORE.to_owned());
        let store = store_text
            .parse()
            .map_err(|e| ConfigError::new("store", e))?;

        let mut base = file.policy;
        if overrides.require_key {
            base.insert("key_required".into(), toml::Value::Boolean(true));
        }
        if let Some(mode) = overrides.on_conflict {
            // Into the file's table rather than onto the parsed policy, so that a route's own
            // `on_conflict` overrides the flag as it overrides `[policy]`; spelled by the
            // policy's own serde names, so the two cannot drift apart.
            let value =
                toml::Value::try_from(mode).map_err(|e| ConfigError::new("--on-conflict", e))?;
            base.insert("on_conflict".into(), value);
        }
        let default_policy = policy_from(base.clone(), "policy")?;
        let mut routes = Vec::with_capacity(file.route.len());
        for (i, route) in file.route.into_iter().enumerate() {
            let at = format!("route[{i}]");
            let path = match (route.prefix, route.pattern) {
                (Some(prefix), None) if prefix.starts_with('/') => {
                    PathMatch::Prefix(route_path(&prefix, &format!("{at}.prefix"))?)
                }
                (None, Some(pattern)) if pattern.starts_with('/') => PathMatch::Pattern(
                    route_path(&pattern, &format!("{at}.pattern"))?
                        .trim_start_matches('/')
                        .split('/')
                        .map(str::to_owned)
                        .collect(),
                ),
                (Some(_), Some(_)) => {
                    return Err(ConfigError::new(at, "give `prefix` or `pattern`, not both"));
                }
                (None, None) => {
                    return Err(ConfigError::new(at, "needs a `prefix` or a `pattern`"));
                }
                _ => {
                    return Err(ConfigError::new(
                        at,
                        "`prefix` and `pattern` are paths and start with `/`",
                    ));
                }
            };
            let methods = route
                .methods
                .unwrap_or_default()
                .iter()
                .map(|m| route_method(m, &format!("{at}.methods")))
                .collect::<Result<_, _>>()?;
            let mut merged = base.clone();
            merged.extend(route.policy);
            let policy = policy_from(merged, &format!("{at}.policy"))?;
            routes.push(Route {
                path,
                methods,
                policy,
            });
        }
        let defaults = ServerLimits::default();
        let limits = ServerLimits {
            max_connections: bounded(
                "max_connections",
                file.max_connections,
                defaults.max_connections,
                1..=MAX_CONNECTIONS,
            )?,
            http2_max_concurrent_streams: bounded(
                "http2_max_concurrent_streams",
                file.http2_max_concurrent_streams,
                defaults.http2_max_concurrent_streams,
                1..=MAX_STREAMS,
            )?,
            max_header_bytes: bounded(
                "max_header_bytes",
                file.max_header_bytes,
                defaults.max_header_bytes,
                MIN_HEADER_BYTES..=MAX_HEADER_BYTES,
            )?,
            header_read_timeout: duration(
                "header_read_timeout",
                file.header_read_timeout,
                defaults.header_read_timeout,
                Duration::from_millis(100)..=Duration::from_secs(10 * 60),
            )?,
            max_buffered_bodies: bounded(
                "max_buffered_bodies",
                file.max_buffered_bodies,
                defaults.max_buffered_bodies,
                MIN_BUFFERED_BODIES..=MAX_BUFFERED_BODIES,
            )?,
            buffer_wait: duration(
                "buffer_wait",
                file.buffer_wait,
                defaults.buffer_wait,
                Duration::ZERO..=Duration::from_secs(60),
            )?,
        };
        Ok(Self {
            listen,
            admin_listen,
            stuck_after: duration(
                "stuck_after",
                file.stuck_after,
                crate::admin::DEFAULT_STUCK_AFTER,
                Duration::from_secs(1)..=Duration::from_secs(7 * 24 * 60 * 60),
            )?,
            upstream,
            store,
            connect_timeout: duration(
                "connect_timeout",
                file.connect_timeout,
                Duration::from_secs(5),
                Duration::from_millis(1)..=Duration::from_secs(5 * 60),
            )?,
            shutdown_timeout: duration(
                "shutdown_timeout",
                file.shutdown_timeout,
                Duration::from_secs(30),
                Duration::ZERO..=Duration::from_secs(60 * 60),
            )?,
            limits,
            scope_secret: ScopeSecret::load(
                overrides.scope_secret.as_deref(),
                overrides.scope_secret_file.as_deref(),
            )?,
            admin_token,
            default_policy,
            routes,
        })
    }

    /// Where a request with `method` (in any case) for `raw_path` (as the client sent it)
    /// goes. The path is normalised with [`normalize_path`] and matched against the routes,
    /// first match wins.
    ///
    /// A path that `normalize_path` refuses could mean different routes to idem and to the
    /// upstream, so which policy applies cannot be known. The safe rule: if **any** policy
    /// that could apply to `method` protects it (the default policy, or the policy of any
    /// route whose method filter admits `method`, whatever its path), the request is
    /// [`Routing::Ambiguous`]; otherwise it goes to the default policy, which passes it
    /// through untouched.
    ///
    /// ```
    /// use http::Method;
    /// use idem_cli::config::{FileConfig, GatewayConfig, Overrides, Routing};
    ///
    /// let overrides = Overrides {
    ///     upstream: Some("http://127.0.0.1:3000".into()),
    ///     ..Overrides::default()
    /// };
    /// let file: FileConfig = toml::from_str(r#"
    ///     [[route]]
    ///     prefix = "/pay"
    ///     methods = ["post"]
    ///     policy = { key_required = true }
    /// "#).unwrap();
    /// let config = GatewayConfig::resolve(file, &overrides).unwrap();
    /// let post = Method::from_bytes(b"post").unwrap();
    /// assert_eq!(config.route(&post, "/pay/1"), Routing::Route(0));
    /// assert_eq!(config.route(&Method::POST, "/other"), Routing::Default);
    /// assert!(config.routes[0].policy.key_required);
    /// ```
    pub fn route(&self, method: &Method, raw_path: &str) -> Routing {
        match normalize_path(raw_path) {
            Ok(path) => self
                .routes
                .iter()
                .position(|route| route.covers(method, &path))
                .map_or(Routing::Default, Routing::Route),
            Err(error) if self.protects_somewhere(method) => Routing::Ambiguous(error),
            Err(_) => Routing::Default,
        }
    }

    /// Whether any policy that could apply to `method` protects it (see
    /// [`route`](Self::route)).
    pub fn protects_somewhere(&self, method: &Method) -> bool {
        protects(&self.default_policy, method)
            || self
                .routes
                .iter()
                .any(|route| route.admits(method) && protects(&route.policy, method))
    }

    /// What `--check` prints: what the gateway would do.
    pub fn describe(&self) -> String {
        let limits = &self.limits;
        let secret = match &self.scope_secret {
            Some(secret) => format!("keyed with the secret from {}", secret.source()),
            None => format!("UNKEYED (set {SCOPE_SECRET_ENV} or --scope-secret-file)"),
        };
        let mut out = format!(
            "listen     {}\nadmin      {}\nupstream   {} (connect timeout {:?})\nstore      {}\n\
             shutdown   waits up to {:?}\n\
             clients    max_connections {}; http2_max_concurrent_streams {}\n\
             heads      max_header_bytes {}; header_read_timeout {:?}\n\
             bodies     max_buffered_bodies {} bytes; buffer_wait {:?}\n\
             scopes     {secret}\n\ndefault policy\n{}",
            self.listen,
            self.admin_listen.map_or_else(
                || "off".to_owned(),
                |addr| {
                    format!(
                        "{addr} (/metrics, /healthz, /readyz); stuck leases after {:?}",
                        self.stuck_after
                    )
                }
            ),
            self.upstream,
            self.connect_timeout,
            self.store,
            self.shutdown_timeout,
            limits.max_connections,
            limits.http2_max_concurrent_streams,
            limits.max_header_bytes,
            limits.header_read_timeout,
            limits.max_buffered_bodies,
            limits.buffer_wait,
            describe_policy(&self.default_policy)
        );
        for (i, route) in self.routes.iter().enumerate() {
            let methods = if route.methods.is_empty() {
                "any method".to_owned()
            } else {
                route
                    .methods
                    .iter()
                    .map(Method::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let path = match &route.path {
                PathMatch::Prefix(p) => format!("prefix {p}"),
                PathMatch::Pattern(s) => format!("pattern /{}", s.join("/")),
            };
            out.push_str(&format!(
                "\nroute[{i}]: {path}, {methods}\n{}",
                describe_policy(&route.policy)
            ));
        }
        out
    }
}

/// Bounds of the server limits.
const MAX_CONNECTIONS: usize = 1 << 20;
const MAX_STREAMS: u32 = 10_000;
/// hyper's HTTP/1 read buffer cannot be smaller than 8 KiB.
const MIN_HEADER_BYTES: usize = 8 << 10;
const MAX_HEADER_BYTES: usize = 1 << 20;
const MIN_BUFFERED_BODIES: usize = 64 << 10;
const MAX_BUFFERED_BODIES: usize = 1 << 40;

/// `value` (or `default`) if within `range`, else an error naming `field`.
fn bounded<T>(
    field: &str,
    value: Option<T>,
    default: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError>
where
    T: PartialOrd + std::fmt::Display + Copy,
{
    let value = value.unwrap_or(default);
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(ConfigError::new(
            field,
            format!(
                "{value} is out of range; use {} to {}",
                range.start(),
                range.end()
            ),
        ))
    }
}

/// A duration setting, bounded so that adding it to an instant can never overflow.
fn duration(
    field: &str,
    value: Option<Duration>,
    default: Duration,
    range: std::ops::RangeInclusive<Duration>,
) -> Result<Duration, ConfigError> {
    let value = value.unwrap_or(default);
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(ConfigError::new(
            field,
            format!(
                "{} is out of range; use {} to {}",
                humantime_serde::re::humantime::format_duration(value),
                humantime_serde::re::humantime::format_duration(*range.start()),
                humantime_serde::re::humantime::format_duration(*range.end())
            ),
        ))
    }
}

/// The admin listener's address: `off` (or `none`) turns it off.
fn admin_address(text: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if ["off", "none"]
        .iter()
        .any(|off| text.eq_ignore_ascii_case(off))
    {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        ConfigError::new(
            "admin_listen",
            format!("`{text}` is not an address like 127.0.0.1:9090, nor `off`"),
        )
    })
}

/// A route's method: upper-cased, so `post` and `POST` are one method (frameworks upper-case
/// it too); anything that is not an HTTP method token is refused.
fn route_method(text: &str, at: &str) -> Result<Method, ConfigError> {
    let upper = text.to_ascii_uppercase();
    if upper.is_empty() || !upper.bytes().all(is_token_byte) {
        return Err(ConfigError::new(at, format!("`{text}` is not a method")));
    }
    Method::from_bytes(upper.as_bytes())
        .map_err(|_| ConfigError::new(at, format!("`{text}` is not a method")))
}

/// RFC 9110 `tchar`.
fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// A route's path, normalised as request paths are so that both compare alike; one that
/// `normalize_path` refuses could never match and is an error.
fn route_path(text: &str, at: &str) -> Result<String, ConfigError> {
    let trimmed = match text.trim_end_matches('/') {
        "" => "/",
        trimmed => trimmed,
    };
    normalize_path(trimmed)
        .map(|path| path.into_owned())
        .map_err(|e| ConfigError::new(at, format!("`{text}`: {}", e.reason())))
}

/// A secret as given: its bytes, the setting that gave it (for errors) and where it came
/// from (for `--check`).
pub(crate) struct GivenSecret {
    pub(crate) bytes: Vec<u8>,
    pub(crate) field: &'static str,
    pub(crate) from: String,
}

/// The one way every secret is read: from the environment variable `env` (its value,
/// `env_value`, taken as it is) or from the file `file` given by the flag `file_flag` (its
/// final line ending dropped: editors and `echo` add one), never both; `None` when neither.
pub(crate) fn given_secret(
    env: &'static str,
    env_value: Option<&[u8]>,
    file_flag: &'static str,
    file: Option<&Path>,
) -> Result<Option<GivenSecret>, ConfigError> {
    match (env_value, file) {
        (Some(_), Some(_)) => Err(ConfigError::new(
            file_flag,
            format!("{env} is set too; give the secret one way only"),
        )),
        (None, None) => Ok(None),
        (Some(bytes), None) => Ok(Some(GivenSecret {
            bytes: bytes.to_vec(),
            field: env,
            from: env.to_owned(),
        })),
        (None, Some(path)) => {
            let mut bytes = std::fs::read(path).map_err(|e| {
                ConfigError::new(file_flag, format!("cannot read {}: {e}", path.display()))
            })?;
            bytes.truncate(without_final_line_ending(&bytes).len());
            Ok(Some(GivenSecret {
                bytes,
                field: file_flag,
                from: path.display().to_string(),
            }))
        }
    }
}

impl ScopeSecret {
    /// The scope secret from the value of `IDEM_SCOPE_SECRET` or from the file of
    /// `--scope-secret-file` (not both), at least [`MIN_SCOPE_SECRET`] bytes: what
    /// `idem serve` uses, and what `idem keys --credential` must use to find the same
    /// scope.
    ///
    /// ```
    /// use idem_cli::config::ScopeSecret;
    ///
    /// let secret = ScopeSecret::load(Some(b"sixteen+ random bytes"), None).unwrap().unwrap();
    /// assert_eq!(secret.source(), "IDEM_SCOPE_SECRET");
    /// assert!(ScopeSecret::load(Some(b"short"), None).is_err());
    /// assert!(ScopeSecret::load(None, None).unwrap().is_none());
    /// ```
    pub fn load(
        env_value: Option<&[u8]>,
        file: Option<&Path>,
    ) -> Result<Option<Self>, ConfigError> {
        let Some(given) = given_secret(SCOPE_SECRET_ENV, env_value, "--scope-secret-file", file)?
        else {
            return Ok(None);
        };
        if given.bytes.len() < MIN_SCOPE_SECRET {
            return Err(ConfigError::new(
                given.field,
                format!(
                    "the scope secret is {} bytes; use at least {MIN_SCOPE_SECRET} random bytes",
                    given.bytes.len()
                ),
            ));
        }
        Ok(Some(Self {
            bytes: given.bytes,
            from: given.from,
        }))
    }
}

fn policy_from(table: toml::Table, at: &str) -> Result<ValidPolicy, ConfigError> {
    let policy: IdempotencyPolicy = table.clone().try_into().map_err(|e: toml::de::Error| {
        // The error does not say which key is at fault: find the one that fails on its own.
        let field = table
            .iter()
            .find(|(name, value)| {
                let alone = toml::Table::from_iter([((*name).clone(), (*value).clone())]);
                alone.try_into::<IdempotencyPolicy>().is_err()
            })
            .map_or_else(|| at.to_owned(), |(name, _)| format!("{at}.{name}"));
        ConfigError::new(field, e.message())
    })?;
    policy
        .validated()
        .map_err(|e| ConfigError::new(format!("{at}.{}", e.field()), e.reason()))
}

fn describe_policy(policy: &IdempotencyPolicy) -> String {
    let lines = [
        format!(
            "  protects   {} (key header {})",
            policy.methods.join(", "),
            policy.header
        ),
        format!(
            "  key        {}, at most {} characters",
            if policy.key_from == KeyFrom::Fingerprint {
                format!(
                    "optional (requests without one are keyed by their fingerprint for {:?})",
                    policy.fingerprint_window
                )
            } else if policy.key_required {
                "required".to_owned()
            } else {
                "optional (requests without one pass through)".to_owned()
            },
            policy.max_key_len
        ),
        format!(
            "  lease      {:?}; retention {:?}",
            policy.lease, policy.retention
        ),
        format!(
            "  bodies     request at most {} bytes; responses kept up to {} bytes",
            policy.max_request_body, policy.max_stored_body
        ),
        format!(
            "  conflict   {:?} (wait timeout {:?}); store down: {}",
            policy.on_conflict,
            policy.wait_timeout,
            if policy.fail_open {
                "forward unprotected"
            } else {
                "503"
            }
        ),
    ];
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &[u8] = b"a long random admin token";
    const SECRET: &[u8] = b"sixteen+ random bytes";

    fn admin_token(overrides: Overrides) -> crate::keys::AdminToken {
        let overrides = Overrides {
            upstream: Some("http://127.0.0.1:3000".into()),
            ..overrides
        };
        GatewayConfig::resolve(FileConfig::default(), &overrides)
            .expect("valid configuration")
            .admin_token
            .expect("an admin token")
    }

    fn file_holding(dir: &tempfile::TempDir, bytes: &[u8]) -> PathBuf {
        let path = dir.path().join(format!("secret-{}", bytes.len()));
        std::fs::write(&path, bytes).expect("write the secret's file");
        path
    }

    /// What `idem serve` accepts as the bearer token, given `IDEM_ADMIN_TOKEN=…` or
    /// `--admin-token-file` whose text ends with a newline, a CRLF, or nothing.
    #[test]
    fn the_admin_token_drops_one_final_line_ending_from_its_variable_and_its_file() {
        let dir = tempfile::tempdir().expect("temporary directory");
        for ending in [&b""[..], b"\n", b"\r\n"] {
            let given = [TOKEN, ending].concat();
            let from_env = admin_token(Overrides {
                admin_token: Some(given.clone()),
                ..Overrides::default()
            });
            let from_file = admin_token(Overrides {
                admin_token_file: Some(file_holding(&dir, &given)),
                ..Overrides::default()
            });
            for token in [from_env, from_file] {
                assert!(token.accepts(TOKEN), "given {given:?}");
                assert!(
                    !token.accepts(&given) || ending.is_empty(),
                    "given {given:?}"
                );
            }
        }
        // One line ending, not every one: the rest is part of the token.
        let given = [TOKEN, b"\n\n"].concat();
        for token in [
            admin_token(Overrides {
                admin_token: Some(given.clone()),
                ..Overrides::default()
            }),
            admin_token(Overrides {
                admin_token_file: Some(file_holding(&dir, &given)),
                ..Overrides::default()
            }),
        ] {
            assert!(token.accepts(&given[..given.len() - 1]));
            assert!(!token.accepts(TOKEN));
        }
    }

    /// The scope secret keys digests: its variable is taken as it is, its file drops one
    /// final line ending.
    #[test]
    fn the_scope_secret_drops_a_final_line_ending_from_its_file_only() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let load = |env: Option<&[u8]>, file: Option<&Path>| {
            ScopeSecret::load(env, file)
                .expect("valid secret")
                .expect("a secret")
                .bytes()
                .to_vec()
        };
        let with_newline = [SECRET, b"\n"].concat();
        assert_eq!(load(Some(&with_newline), None), with_newline);
        for ending in [&b""[..], b"\n", b"\r\n"] {
            let path = file_holding(&dir, &[SECRET, ending].concat());
            assert_eq!(load(None, Some(&path)), SECRET, "ending {ending:?}");
        }
    }
}
