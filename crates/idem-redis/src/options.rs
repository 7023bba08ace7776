//! How to reach Redis: URLs, options, and why connecting failed.

use std::sync::Arc;
use std::time::Duration;

use fred::prelude::{Config, ServerConfig};
use fred::types::config::TlsConfig;

/// Tuning for a [`RedisStore`](crate::RedisStore); the defaults suit a gateway.
///
/// ```
/// use std::time::Duration;
/// use idem_redis::RedisOptions;
///
/// let options = RedisOptions {
///     prefix: "payments-idem".into(),
///     command_timeout: Duration::from_millis(500),
///     ..RedisOptions::default()
/// };
/// assert_eq!(options.pool_size, RedisOptions::default().pool_size);
/// ```
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// The start of every record's key (default `"idem"`): records live at
    /// `<prefix>:{<64 hex digits>}`. It may not contain `{` or `}`, which would change
    /// the hash slot a record lands in.
    pub prefix: String,
    /// How long [`RedisStore::connect_with`](crate::RedisStore::connect_with) waits for every
    /// pooled connection (in a cluster, to every primary), and the limit on each TCP connect
    /// attempt (default 5 s, at most a day).
    pub connect_timeout: Duration,
    /// How long one command may take, queueing while disconnected included, before the
    /// store call fails with [`StoreError::Backend`](idem_core::StoreError::Backend)
    /// (default 2 s, at most a day).
    pub command_timeout: Duration,
    /// How many connections (in a cluster: sets of connections, one per primary) the store
    /// spreads its commands over (default 4).
    pub pool_size: usize,
    /// The TLS client settings for a `rediss://` URL (default `None`: trust the system's
    /// certificate authorities, present no client certificate). Set it to trust a private
    /// authority or to present a client certificate, as Redis asks by default
    /// (`tls-auth-clients yes`). Only `rediss://` and `rediss+cluster://` URLs use TLS;
    /// setting this with a plain `redis://` URL is refused rather than silently ignored.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The most record keys one [`in_flight`](idem_core::Store::in_flight) call reads
    /// (default 100 000). Redis keeps no index by claim time, so listing in-flight keys
    /// scans the prefix's keys (`SCAN`, on every primary of a cluster); past this many the
    /// listing, and `idem_stuck_leases`, cover only the keys scanned so far.
    pub max_in_flight_scan: usize,
}

/// The longest timeout an option accepts: longer ones are mistakes, and would overflow
/// deadline arithmetic in the client.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            prefix: "idem".to_owned(),
            connect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(2),
            pool_size: 4,
            tls: None,
            max_in_flight_scan: 100_000,
        }
    }
}

impl RedisOptions {
    /// Checks the options, naming the field that is wrong.
    pub fn validate(&self) -> Result<(), ConnectError> {
        let invalid = |field: &'static str, reason: &str| ConnectError::InvalidOption {
            field,
            reason: reason.to_owned(),
        };
        if self.prefix.is_empty() {
            return Err(invalid("prefix", "must not be empty"));
        }
        if self.prefix.contains(['{', '}']) {
            return Err(invalid(
                "prefix",
                "must not contain `{` or `}`: braces pick a record's Redis Cluster hash slot",
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(invalid("connect_timeout", "must be more than zero"));
        }
        if self.command_timeout < Duration::from_millis(1) {
            return Err(invalid("command_timeout", "must be at least 1 ms"));
        }
        for (field, timeout) in [
            ("connect_timeout", self.connect_timeout),
            ("command_timeout", self.command_timeout),
        ] {
            if timeout > MAX_TIMEOUT {
                return Err(invalid(field, "must be at most a day"));
            }
        }
        if self.max_in_flight_scan == 0 {
            return Err(invalid("max_in_flight_scan", "must be at least 1"));
        }
        if self.pool_size == 0 {
            return Err(invalid("pool_size", "must be at least 1"));
        }
        Ok(())
    }
}

/// Why a [`RedisStore`](crate::RedisStore) could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The URL is not one this store understands.
    #[error("invalid Redis URL: {reason}")]
    InvalidUrl {
        /// What is wrong with it.
        reason: String,
        /// The client's own complaint, if it had one.
        #[source]
        source: Option<fred::error::Error>,
    },
    /// An option is out of range.
    #[error("invalid Redis store option `{field}`: {reason}")]
    InvalidOption {
        /// The [`RedisOptions`] field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The store must be made inside a Tokio runtime: its connections run as tasks there.
    #[error("a Redis store must be created inside a Tokio runtime")]
    NoRuntime,
    /// Redis could not be reached, or refused the connection or the scripts.
    #[error("cannot connect to Redis")]
    Redis(#[source] fred::error::Error),
    /// Redis did not answer within [`RedisOptions::connect_timeout`].
    #[error("Redis did not accept the connection within {0:?}")]
    Timeout(Duration),
}

/// Parses a store URL into the client's configuration, with TLS set up when the scheme asks
/// for it (`rediss…`): from `tls` if given, else trusting the system's authorities.
///
/// - `redis://[user:password@]host[:port][/db]`: one node (or a primary behind a proxy);
/// - `redis+cluster://[user:password@]host:port[,host:port...]`: a Redis Cluster, found
///   from any of the listed nodes;
/// - `redis-cluster://host:port?node=host:port&...`: the `fred` spelling of the same;
/// - each with an `s` for TLS: `rediss://`, `rediss+cluster://`, `rediss-cluster://`.
pub(crate) fn parse_url(
    url: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Config, ConnectError> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| invalid("expected `redis://…` or `redis+cluster://…`", None))?;
    // fred is handed the plain scheme so that it never builds a TLS client of its own: its
    // default one takes rustls' process-wide crypto provider, which may be ambiguous (or
    // absent) in a program that links several.
    let (plain, uses_tls) = match scheme {
        "rediss" => ("redis", true),
        "rediss+cluster" => ("redis+cluster", true),
        "rediss-cluster" => ("redis-cluster", true),
        "valkeys" => ("valkey", true),
        "valkeys+cluster" => ("valkey+cluster", true),
        "valkeys-cluster" => ("valkey-cluster", true),
        other => (other, false),
    };
    let mut config = parse_plain_url(plain, rest)?;
    match (uses_tls, tls) {
        (true, Some(tls)) => {
            config.tls = Some(TlsConfig::from(rustls::ClientConfig::clone(tls)));
        }
        (true, None) => config.tls = Some(TlsConfig::from(system_tls()?)),
        (false, Some(_)) => {
            return Err(ConnectError::InvalidOption {
                field: "tls",
                reason: format!(
                    "is set but the URL is `{scheme}://`, which does not use TLS: write \
                     `rediss://` or `rediss+cluster://` to connect over TLS"
                ),
            });
        }
        (false, None) => {}
    }
    Ok(config)
}

fn invalid(reason: &str, source: Option<fred::error::Error>) -> ConnectError {
    ConnectError::InvalidUrl {
        reason: reason.to_owned(),
        source,
    }
}

fn parse_plain_url(scheme: &str, rest: &str) -> Result<Config, ConnectError> {
    match scheme {
        "redis+cluster" | "valkey+cluster" => {
            // `[userinfo@]host:port,host:port[/…]`: fred wants the extra nodes as `node=`
            // query parameters, so rewrite into its form and let it parse credentials.
            let (authority, tail) = match rest.find(['/', '?']) {
                Some(at) => rest.split_at(at),
                None => (rest, ""),
            };
            if !tail.is_empty() && tail != "/" && tail != "/0" {
                return Err(invalid(
                    "a cluster URL takes no path or query: Redis Cluster has only database 0",
                    None,
                ));
            }
            let (userinfo, hosts) = match authority.rsplit_once('@') {
                Some((userinfo, hosts)) => (Some(userinfo), hosts),
                None => (None, authority),
            };
            let mut nodes = hosts.split(',');
            let first = nodes.next().unwrap_or_default();
            let mut rewritten = String::from("redis-cluster://");
            if let Some(userinfo) = userinfo {
                rewritten.push_str(userinfo);
                rewritten.push('@');
            }
            rewritten.push_str(first);
            for (i, node) in nodes.enumerate() {
                if node.is_empty() || !node.contains(':') {
                    return Err(invalid(
                        "every cluster node must be written host:port",
                        None,
                    ));
                }
                rewritten.push(if i == 0 { '?' } else { '&' });
                rewritten.push_str("node=");
                rewritten.push_str(node);
            }
            if first.is_empty() || !first.contains(':') {
                return Err(invalid(
                    "every cluster node must be written host:port",
                    None,
                ));
            }
            Config::from_url_clustered(&rewritten)
                .map_err(|e| invalid("the cluster URL does not parse", Some(e)))
        }
        "redis" | "valkey" | "redis-cluster" | "valkey-cluster" => {
            let config = Config::from_url(&format!("{scheme}://{rest}"))
                .map_err(|e| invalid("the URL does not parse", Some(e)))?;
            match config.server {
                ServerConfig::Centralized { .. } | ServerConfig::Clustered { .. } => Ok(config),
                _ => Err(invalid(
                    "only single-node and cluster URLs are supported",
                    None,
                )),
            }
        }
        _ => Err(invalid(
            "unsupported scheme: use `redis://` or `redis+cluster://`, or `rediss://` or \
             `rediss+cluster://` for TLS",
            None,
        )),
    }
}

/// A TLS client trusting the system's certificate authorities, presenting no certificate.
fn system_tls() -> Result<rustls::ClientConfig, ConnectError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _unparsable) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map_or_else(|| "none were found".to_owned(), ToString::to_string);
        return Err(ConnectError::InvalidOption {
            field: "tls",
            reason: format!(
                "is not set, and the system's certificate authorities cannot be used ({why}): \
                 install them, or set `tls` to trust a certificate authority of your own"
            ),
        });
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| ConnectError::InvalidOption {
            field: "tls",
            reason: error.to_string(),
        })?;
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// The URL with any password replaced, for logs and `Debug`.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<unparsable URL>".to_owned();
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..end].rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let user = userinfo.split_once(':').map_or("", |(user, _)| user);
            format!("{scheme}://{user}:***@{hosts}{}", &rest[end..])
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fred::types::config::Server;

    fn hosts(config: &Config) -> Vec<(String, u16)> {
        let mut hosts: Vec<_> = config
            .server
            .hosts()
            .into_iter()
            .map(|Server { host, port, .. }| (host.to_string(), port))
            .collect();
        hosts.sort();
        hosts
    }

    #[test]
    fn single_node_urls() {
        let config = parse_url("redis://127.0.0.1:6380/2", None).unwrap();
        assert!(config.server.is_centralized());
        assert_eq!(config.database, Some(2));
        assert_eq!(hosts(&config), [("127.0.0.1".to_owned(), 6380)]);
        let config = parse_url("redis://user:secret@example.com", None).unwrap();
        assert_eq!(config.password.as_deref(), Some("secret"));
        assert_eq!(hosts(&config), [("example.com".to_owned(), 6379)]);
    }

    #[test]
    fn cluster_urls_list_their_nodes() {
        let config =
            parse_url("redis+cluster://u:p%40ss@10.0.0.1:7000,10.0.0.2:7001", None).unwrap();
        assert!(config.server.is_clustered());
        assert_eq!(config.username.as_deref(), Some("u"));
        assert_eq!(config.password.as_deref(), Some("p@ss"));
        assert_eq!(
            hosts(&config),
            [("10.0.0.1".to_owned(), 7000), ("10.0.0.2".to_owned(), 7001)]
        );
        let single = parse_url("redis+cluster://127.0.0.1:7000", None).unwrap();
        assert!(single.server.is_clustered());
        let native = parse_url("redis-cluster://127.0.0.1:7000?node=127.0.0.1:7001", None).unwrap();
        assert_eq!(hosts(&native).len(), 2);
    }

    #[test]
    fn tls_urls_use_tls_and_plain_urls_do_not() {
        for url in [
            "rediss://127.0.0.1:6380/1",
            "rediss+cluster://10.0.0.1:7000,10.0.0.2:7001",
            "rediss-cluster://10.0.0.1:7000",
        ] {
            // This machine's trust store may be empty; a given configuration always works.
            let config = parse_url(url, Some(&Arc::new(any_tls()))).unwrap();
            assert!(config.tls.is_some(), "{url} should use TLS");
        }
        let config = parse_url("rediss://127.0.0.1:6380/1", Some(&Arc::new(any_tls()))).unwrap();
        assert_eq!(config.database, Some(1));
        assert_eq!(hosts(&config), [("127.0.0.1".to_owned(), 6380)]);
        for url in ["redis://127.0.0.1", "redis+cluster://127.0.0.1:7000"] {
            assert!(
                parse_url(url, None).unwrap().tls.is_none(),
                "{url} is plain"
            );
        }
    }

    #[test]
    fn tls_settings_on_a_plain_url_are_refused() {
        let refused = parse_url("redis://127.0.0.1:6379", Some(&Arc::new(any_tls())));
        assert!(
            matches!(
                &refused,
                Err(ConnectError::InvalidOption { field: "tls", reason }) if reason.contains("rediss://")
            ),
            "{refused:?}"
        );
    }

    fn any_tls() -> rustls::ClientConfig {
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth()
    }

    #[test]
    fn bad_urls_are_refused() {
        for url in [
            "127.0.0.1:6379",
            "http://127.0.0.1",
            "redis+cluster://127.0.0.1",
            "redis+cluster://127.0.0.1:7000,",
            "redis+cluster://127.0.0.1:7000/3",
            "redis://",
        ] {
            assert!(
                matches!(parse_url(url, None), Err(ConnectError::InvalidUrl { .. })),
                "{url} should be refused"
            );
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("redis://user:secret@host:6379/1"),
            "redis://user:***@host:6379/1"
        );
        assert_eq!(
            redact("redis+cluster://:secret@a:1,b:2"),
            "redis+cluster://:***@a:1,b:2"
        );
        assert_eq!(redact("redis://host:6379"), "redis://host:6379");
    }

    #[test]
    fn options_name_the_bad_field() {
        let bad = RedisOptions {
            prefix: "a{b}".into(),
            ..RedisOptions::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(ConnectError::InvalidOption {
                field: "prefix",
                ..
            })
        ));
        let bad = RedisOptions {
            pool_size: 0,
            ..RedisOptions::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(ConnectError::InvalidOption {
                field: "pool_size",
                ..
            })
        ));
        for huge in [MAX_TIMEOUT + Duration::from_millis(1), Duration::MAX] {
            let bad = RedisOptions {
                command_timeout: huge,
                ..RedisOptions::default()
            };
            assert!(matches!(
                bad.validate(),
                Err(ConnectError::InvalidOption {
                    field: "command_timeout",
                    ..
                })
            ));
            let bad = RedisOptions {
                connect_timeout: huge,
                ..RedisOptions::default()
            };
            assert!(matches!(
                bad.validate(),
                Err(ConnectError::InvalidOption {
                    field: "connect_timeout",
                    ..
                })
            ));
        }
        assert!(RedisOptions::default().validate().is_ok());
    }
}
