//! The reverse proxy at the heart of `idem serve`: forwards a request to the upstream over
//! a pooled keep-alive connection, as a proxy must.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use idem_http::NotSent;

/// Where requests go: scheme, authority and a base path prefixed to every request's path.
#[derive(Debug, Clone)]
pub struct Upstream {
    scheme: Scheme,
    authority: Authority,
    base_path: String,
}

/// Why an upstream URL is unusable.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Not a URL at all.
    #[error("`{url}` is not a URL: {source}")]
    Invalid {
        /// What was given.
        url: String,
        /// The parser's complaint.
        #[source]
        source: http::uri::InvalidUri,
    },
    /// A URL idem cannot proxy to.
    #[error("`{url}` {reason}")]
    Unsupported {
        /// What was given.
        url: String,
        /// Why.
        reason: &'static str,
    },
}

impl Upstream {
    /// Parses `http://host:port[/base]`.
    ///
    /// ```
    /// use idem_cli::proxy::Upstream;
    ///
    /// assert!(Upstream::parse("http://127.0.0.1:3000/api").is_ok());
    /// assert!(Upstream::parse("https://example.com").is_err()); // TLS upstreams: not yet
    /// assert!(Upstream::parse("127.0.0.1:3000").is_err());
    /// ```
    pub fn parse(url: &str) -> Result<Self, UpstreamError> {
        let uri: Uri = url.parse().map_err(|source| UpstreamError::Invalid {
            url: url.to_owned(),
            source,
        })?;
        let unsupported = |reason| UpstreamError::Unsupported {
            url: url.to_owned(),
            reason,
        };
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| unsupported("has no scheme; write it as http://host:port"))?;
        if scheme != Scheme::HTTP {
            return Err(unsupported(
                "is not http://; idem serve talks plain HTTP to its upstream (put TLS in front)",
            ));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| unsupported("has no host"))?;
        if uri.query().is_some() {
            return Err(unsupported(
                "has a query; give only scheme, host, port and path",
            ));
        }
        let base_path = uri.path().trim_end_matches('/').to_owned();
        Ok(Self {
            scheme,
            authority,
            base_path,
        })
    }

    fn uri_for(&self, original: &Uri) -> Result<Uri, http::Error> {
        let path_and_query = original
            .path_and_query()
            .map(PathAndQuery::as_str)
            .unwrap_or("/");
        let path_and_query: PathAndQuery =
            format!("{}{}", self.base_path, path_and_query).parse()?;
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
    }
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

/// The client's address, put in request extensions by the server so the proxy can add
/// `X-Forwarded-For`.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// A tower service that forwards requests to one upstream.
#[derive(Debug, Clone)]
pub struct Proxy {
    client: Client<HttpConnector, Body>,
    upstream: Upstream,
}

/// The upstream could not be reached, or the exchange failed. An error that proves the
/// request never left (no connection could be made) carries [`idem_http::NotSent`] in its
/// source chain; any other error is an unknown outcome (the upstream may have processed
/// the request).
pub type ProxyError = Box<dyn std::error::Error + Send + Sync>;

impl Proxy {
    /// A proxy with a pooled keep-alive client.
    pub fn new(upstream: Upstream, connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            // The client never sends a request twice. Its one retry (`retry_canceled_requests`,
            // on by default) is for a request hyper hands back unwritten: a pooled
            // connection that turned out closed before the dispatcher took the request off
            // its queue (hyper's `TrySendError::take_message` is `Some` only then: "the
            // message was never even started"), and only on a reused connection. Once the
            // dispatcher has started writing, a failure comes back as an error with no
            // request, and is never retried. So the retry cannot run anything twice, and
            // keeping it spares clients errors from connections the upstream closed while
            // idle.
            .retry_canceled_requests(true)
            // Without a timer the idle timeout is never enforced.
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .build(connector);
        Self { client, upstream }
    }

    /// Where this proxy sends requests.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }
}

impl tower::Service<Request<Body>> for Proxy {
    type Response = Response<Incoming>;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Incoming>, ProxyError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let client = self.client.clone();
        let upstream = self.upstream.clone();
        Box::pin(async move {
            let (mut parts, body) = request.into_parts();
            // HTTP/2 (and absolute-form HTTP/1.1) clients name the host in the URI.
            let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
                let authority = parts.uri.authority()?;
                HeaderValue::from_str(authority.as_str()).ok()
            });
            // Nothing has been sent if the upstream URI cannot even be built.
            parts.uri = upstream
                .uri_for(&parts.uri)
                .map_err(|error| -> ProxyError { Box::new(NotSent::new(error)) })?;
            let client_addr = parts.extensions.get::<ClientAddr>().copied();
            strip_hop_by_hop(&mut parts.headers);
            if let Ok(host) = HeaderValue::from_str(upstream.authority.as_str()) {
                parts.headers.insert(header::HOST, host);
            }
            add_forwarded(&mut parts.headers, client_addr, original_host);
            // Always HTTP/1.1 to the upstream, whatever the client spoke.
            parts.version = http::Version::HTTP_11;
            let mut response = client
                .request(Request::from_parts(parts, body))
                .await
                .map_err(mark_not_sent)?;
            strip_hop_by_hop(response.headers_mut());
            Ok(response)
        })
    }
}

/// Marks the client's error [`NotSent`] when it proves no byte of the request was written.
///
/// `is_connect()` is true only for errors before any connection carried the request: the
/// connector's own (refused, connect timeout, DNS) and a failed pool checkout. Everything
/// else stays unmarked, an unknown outcome: a reset or close after the request may have
/// been written, a body error midway, and also failures hyper_util does not tell apart
/// publicly (an HTTP handshake failure, or a request handed back unwritten on a fresh
/// connection), which are treated as unknown to be safe.
fn mark_not_sent(error: hyper_util::client::legacy::Error) -> ProxyError {
    if error.is_connect() {
        Box::new(NotSent::new(error))
    } else {
        Box::new(error)
    }
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes the headers that concern one connection only (RFC 9110 §7.6.1), including any
/// that `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

fn add_forwarded(headers: &mut HeaderMap, client: Option<ClientAddr>, host: Option<HeaderValue>) {
    if let Some(ClientAddr(addr)) = client {
        let ip = addr.ip().to_string();
        let chain = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(earlier) => format!("{earlier}, {ip}"),
            None => ip,
        };
        if let Ok(value) = HeaderValue::from_str(&chain) {
            headers.insert("x-forwarded-for", value);
        }
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Some(host) = host {
        headers.insert("x-forwarded-host", host);
    }
}
