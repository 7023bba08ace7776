//! The gateway's configuration: a TOML file, overridden by command-line flags, validated
//! into a [`GatewayConfig`] whose errors name the field at fault.
//!
//! ```toml
//! listen = "127.0.0.1:8080"
//! upstream = "http://127.0.0.1:3000"
//! store = "redb:idem.redb"
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

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::Method;
use idem_http::IdempotencyPolicy;
use serde::Deserialize;

use crate::proxy::Upstream;
use crate::store_url::StoreUrl;

/// The configuration file, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// Address to listen on.
    pub listen: Option<String>,
    /// The service behind the gateway.
    pub upstream: Option<String>,
    /// Where records live.
    pub store: Option<String>,
    /// How long to wait for a connection to the upstream.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    /// How long shutdown waits for requests in flight.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Option<Duration>,
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
    /// `--upstream`.
    pub upstream: Option<String>,
    /// `--store`.
    pub store: Option<String>,
    /// `--require-key`.
    pub require_key: bool,
    /// `--on-conflict`.
    pub on_conflict: Option<String>,
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
    /// Whether `path` is covered.
    ///
    /// ```
    /// use idem_cli::config::PathMatch;
    ///
    /// let prefix = PathMatch::Prefix("/payments".into());
    /// assert!(prefix.matches("/payments") && prefix.matches("/payments/7"));
    /// assert!(!prefix.matches("/paymentsx"));
    /// let pattern = PathMatch::Pattern(vec!["orders".into(), "*".into(), "items".into()]);
    /// assert!(pattern.matches("/orders/9/items") && !pattern.matches("/orders/9/items/1"));
    /// ```
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Self::Prefix(prefix) => {
                let prefix = prefix.trim_end_matches('/');
                path == prefix
                    || path
                        .strip_prefix(prefix)
                        .is_some_and(|rest| rest.starts_with('/'))
            }
            Self::Pattern(segments) => {
                let mut parts = path.trim_start_matches('/').split('/');
                for segment in segments {
                    if segment == "**" {
                        return true;
                    }
                    match parts.next() {
                        Some(part) if segment == "*" || segment == part => {}
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
    /// Methods covered; empty means any.
    pub methods: Vec<Method>,
    /// Its policy.
    pub policy: IdempotencyPolicy,
}

impl Route {
    /// Whether this route covers the request.
    pub fn covers(&self, method: &Method, path: &str) -> bool {
        (self.methods.is_empty() || self.methods.contains(method)) && self.path.matches(path)
    }
}

/// The validated configuration of `idem serve`.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Where to forward.
    pub upstream: Upstream,
    /// Where records live.
    pub store: StoreUrl,
    /// Upstream connect timeout (default 5 s).
    pub connect_timeout: Duration,
    /// How long shutdown waits for requests in flight (default 30 s).
    pub shutdown_timeout: Duration,
    /// The policy of requests no route covers.
    pub default_policy: IdempotencyPolicy,
    /// Routes, first match wins.
    pub routes: Vec<Route>,
}

/// The default `--listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// The default `--store`.
pub const DEFAULT_STORE: &str = "redb:idem.redb";

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
            Upstream::parse(&upstream_text).map_err(|e| ConfigError::new("upstream", e))?;
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
        if let Some(mode) = &overrides.on_conflict {
            base.insert("on_conflict".into(), toml::Value::String(mode.clone()));
        }
        let default_policy = policy_from(base.clone(), "policy")?;
        let mut routes = Vec::with_capacity(file.route.len());
        for (i, route) in file.route.into_iter().enumerate() {
            let at = format!("route[{i}]");
            let path = match (route.prefix, route.pattern) {
                (Some(prefix), None) if prefix.starts_with('/') => PathMatch::Prefix(prefix),
                (None, Some(pattern)) if pattern.starts_with('/') => PathMatch::Pattern(
                    pattern
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
                .map(|m| {
                    Method::from_bytes(m.as_bytes()).map_err(|_| {
                        ConfigError::new(format!("{at}.methods"), format!("`{m}` is not a method"))
                    })
                })
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
        Ok(Self {
            listen,
            upstream,
            store,
            connect_timeout: file.connect_timeout.unwrap_or(Duration::from_secs(5)),
            shutdown_timeout: file.shutdown_timeout.unwrap_or(Duration::from_secs(30)),
            default_policy,
            routes,
        })
    }

    /// The policy for a request.
    pub fn policy_for(&self, method: &Method, path: &str) -> &IdempotencyPolicy {
        self.routes
            .iter()
            .find(|route| route.covers(method, path))
            .map_or(&self.default_policy, |route| &route.policy)
    }

    /// What `--check` prints: what the gateway would do.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "listen     {}\nupstream   {}\nstore      {}\n\ndefault policy\n{}",
            self.listen,
            self.upstream,
            self.store,
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

fn policy_from(table: toml::Table, at: &str) -> Result<IdempotencyPolicy, ConfigError> {
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
        .validate()
        .map_err(|e| ConfigError::new(format!("{at}.{}", e.field()), e.reason()))?;
    Ok(policy)
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
            if policy.key_required {
                "required"
            } else {
                "optional (requests without one pass through)"
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
