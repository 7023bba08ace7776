//! The reverse proxy at the heart of `idem serve`: forwards a request to the upstream over
//! a pooled keep-alive connection, as a proxy must, in plain HTTP or over TLS.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use idem_http::NotSent;
use metrics::Histogram;
use rustls::ClientConfig;
use tokio::time::Instant;

use crate::tls::{TlsError, TlsFiles};

/// Where requests go: scheme, authority and a base path prefixed to every request's path;
/// for `https://`, the TLS client that verifies the upstream.
#[derive(Debug, Clone)]
pub struct Upstream {
    scheme: Scheme,
    authority: Authority,
    base_path: String,
    tls: Arc<ClientConfig>,
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
    /// The TLS settings of an `https://` upstream are unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// TLS settings were given for a plain `http://` upstream.
    #[error("TLS settings are set but the upstream `{0}` is http://; write https:// to use TLS")]
    TlsForPlainHttp(String),
}

impl UpstreamError {
    /// Whether the TLS settings, not the URL, are at fault.
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_) | Self::TlsForPlainHttp(_))
    }
}

impl Upstream {
    /// Parses `http://host:port[/base]` or `https://host[:port][/base]`; an `https://`
    /// upstream is verified against the system's certificate authorities.
    ///
    /// ```
    /// use idem_cli::proxy::Upstream;
    ///
    /// assert!(Upstream::parse("http://127.0.0.1:3000/api").is_ok());
    /// assert!(Upstream::parse("127.0.0.1:3000").is_err());
    /// assert!(Upstream::parse("ftp://127.0.0.1").is_err());
    /// ```
    pub fn parse(url: &str) -> Result<Self, UpstreamError> {
        Self::parse_with_tls(url, &TlsFiles::default())
    }

    /// Parses `url` as [`parse`](Self::parse) does; an `https://` upstream is verified and
    /// authenticated with `tls` (read now, so a bad file fails here, not on the first
    /// request). Non-empty `tls` with an `http://` URL is refused.
    ///
    /// ```
    /// use idem_cli::proxy::Upstream;
    /// use idem_cli::tls::TlsFiles;
    ///
    /// let files = TlsFiles { ca_file: Some("/no/such/ca.pem".into()), ..TlsFiles::default() };
    /// let error = Upstream::parse_with_tls("https://payments.internal", &files).unwrap_err();
    /// assert!(error.is_tls() && error.to_string().contains("/no/such/ca.pem"));
    /// assert!(Upstream::parse_with_tls("http://127.0.0.1:3000", &files).unwrap_err().is_tls());
    /// ```
    pub fn parse_with_tls(url: &str, tls: &TlsFiles) -> Result<Self, UpstreamError> {
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
        let tls = if scheme == Scheme::HTTPS {
            tls.client_config()?
        } else if scheme == Scheme::HTTP {
            if !tls.is_empty() {
                return Err(UpstreamError::TlsForPlainHttp(url.to_owned()));
            }
            // Never used: only `https://` URIs go through TLS.
            crate::tls::trusting_nothing()?
        } else {
            return Err(unsupported("is neither http:// nor https://"));
        };
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
            tls: Arc::new(tls),
        })
    }

    fn uri_for(&self, original: &Uri) -> Result<Uri, http::Error> {
        let original = original.path_and_query();
        // Without a base path the request's own path and query go as they are: cloning
        // them shares their bytes, where formatting and parsing them again would copy.
        let path_and_query = match original {
            Some(original) if self.base_path.is_empty() => original.clone(),
            None if self.base_path.is_empty() => PathAndQuery::from_static("/"),
            _ => {
                let original = original.map_or("/", PathAndQuery::as_str);
                format!("{}{}", self.base_path, original).parse()?
            }
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path_and_query);
        Ok(Uri::from_parts(parts)?)
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

/// A tower service that forwards requests to one upstream. Cheap to clone: its parts are
/// shared.
#[derive(Debug, Clone)]
pub struct Proxy {
    shared: Arc<Forwarder>,
}

/// What every clone of a [`Proxy`] shares: cloned per request, the client and the upstream
/// would cost a dozen reference counts and an allocation each time.
#[derive(Debug, Clone)]
struct Forwarder {
    client: Client<HttpsConnector<HttpConnector>, Body>,
    upstream: Upstream,
    /// The `Host` every forwarded request carries, made once.
    host: Option<HeaderValue>,
    /// Where the time to each upstream answer (or failure) is recorded, if anywhere.
    latency: Option<Histogram>,
}

/// The upstream could not be reached, or the exchange failed. An error that proves the
/// request never left (no connection could be made) carries [`idem_http::NotSent`] in its
/// source chain; any other error is an unknown outcome (the upstream may have processed
/// the request).
pub type ProxyError = Box<dyn std::error::Error + Send + Sync>;

impl Proxy {
    /// A proxy with a pooled keep-alive client.
    pub fn new(upstream: Upstream, connect_timeout: Duration) -> Self {
        let mut tcp = HttpConnector::new();
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(connect_timeout));
        // The TLS connector hands `https://` URIs to TLS; it needs plain TCP underneath.
        tcp.enforce_http(false);
        let tls = HttpsConnectorBuilder::new().with_tls_config(ClientConfig::clone(&upstream.tls));
        let tls = if upstream.scheme == Scheme::HTTPS {
            tls.https_only()
        } else {
            tls.https_or_http()
        };
        let connector = tls.enable_http1().wrap_connector(tcp);
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
        let host = HeaderValue::from_str(upstream.authority.as_str()).ok();
        Self {
            shared: Arc::new(Forwarder {
                client,
                upstream,
                host,
                latency: None,
            }),
        }
    }

    /// Records into `latency` the time from each call to the upstream's response head (or
    /// failure), in seconds.
    pub fn recording_latency(mut self, latency: Histogram) -> Self {
        Arc::make_mut(&mut self.shared).latency = Some(latency);
        self
    }

    /// Where this proxy sends requests.
    pub fn upstream(&self) -> &Upstream {
        &self.shared.upstream
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
        let shared = Arc::clone(&self.shared);
        Box::pin(async move {
            let started = Instant::now();
            let answer = shared.forward(request).await;
            if let Some(latency) = &shared.latency {
                latency.record(started.elapsed().as_secs_f64());
            }
            answer
        })
    }
}

impl Forwarder {
    async fn forward(&self, request: Request<Body>) -> Result<Response<Incoming>, ProxyError> {
        let (mut parts, body) = request.into_parts();
        // HTTP/2 (and absolute-form HTTP/1.1) clients name the host in the URI.
        let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
            let authority = parts.uri.authority()?;
            HeaderValue::from_str(authority.as_str()).ok()
        });
        // Nothing has been sent if the upstream URI cannot even be built.
        parts.uri = self
            .upstream
            .uri_for(&parts.uri)
            .map_err(|error| -> ProxyError { Box::new(NotSent::new(error)) })?;
        let client_addr = parts.extensions.get::<ClientAddr>().copied();
        strip_hop_by_hop(&mut parts.headers);
        if let Some(host) = &self.host {
            parts.headers.insert(header::HOST, host.clone());
        }
        add_forwarded(&mut parts.headers, client_addr, original_host);
        // Always HTTP/1.1 to the upstream, whatever the client spoke.
        parts.version = http::Version::HTTP_11;
        let mut response = self
            .client
            .request(Request::from_parts(parts, body))
            .await
            .map_err(mark_not_sent)?;
        strip_hop_by_hop(response.headers_mut());
        Ok(response)
    }
}

/// Marks the client's error [`NotSent`] when it proves no byte of the request was written.
///
/// `is_connect()` is true only for errors before any connection carried the request: the
/// connector's own (refused, connect timeout, DNS, a failed TLS handshake: the upstream's
/// certificate not trusted, or ours refused) and a failed pool checkout. Everything
/// else stays unmarked, an unknown outcome: a reset or close after the request may have
/// been written, a body error midway, and also failures hyper_util does not tell apart
/// publicly (an HTTP handshake failure, or a request handed back unwritten on a fresh
/// connection), which are treated as unknown to be safe.
fn mark_not_sent(error: hyper_util::client::legacy::Error) -> ProxyError {
    if error.is_connect() || handshake_refused(&error) {
        Box::new(NotSent::new(ConnectFailed(error)))
    } else {
        Box::new(error)
    }
}

/// Whether the upstream refused the TLS handshake: then it never read the request.
///
/// In TLS 1.3 the client's side of the handshake is done before the server has checked the
/// client's certificate, so a server that refuses it (none presented, or one it does not
/// trust) says so with an alert only after the request was written, and the error is not a
/// connect error. But a server decrypts no request before the handshake is complete (the
/// client sends no early data), so nothing ran: such an error proves nothing was processed,
/// and treating it as unknown would burn every key until the certificate is fixed.
fn handshake_refused(error: &(dyn std::error::Error + 'static)) -> bool {
    use rustls::AlertDescription as Alert;
    let mut current = Some(error);
    while let Some(error) = current {
        // io::Error's `source` skips the error it wraps; look inside it too.
        let tls = error.downcast_ref::<rustls::Error>().or_else(|| {
            error
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::AlertReceived(alert)) = tls {
            return matches!(
                alert,
                Alert::CertificateRequired
                    | Alert::BadCertificate
                    | Alert::UnsupportedCertificate
                    | Alert::CertificateRevoked
                    | Alert::CertificateExpired
                    | Alert::CertificateUnknown
                    | Alert::UnknownCA
                    | Alert::AccessDenied
                    | Alert::HandshakeFailure
            );
        }
        current = error.source();
    }
    false
}

/// No connection to the upstream could be made. Its message carries every cause, because
/// the client's own says only "client error (Connect)", and the one line an operator sees
/// must tell a refused connection from an untrusted certificate.
#[derive(Debug)]
struct ConnectFailed(hyper_util::client::legacy::Error);

impl std::fmt::Display for ConnectFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cannot connect to the upstream")?;
        let mut cause = std::error::Error::source(&self.0);
        while let Some(error) = cause {
            write!(f, ": {error}")?;
            // io::Error's `source` skips the error it wraps (a TLS alert, say).
            cause = match error.downcast_ref::<std::io::Error>() {
                Some(io) => io.get_ref().and_then(|inner| inner.source()),
                None => error.source(),
            };
        }
        Ok(())
    }
}

impl std::error::Error for ConnectFailed {}

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
    // Most messages carry none: one look at each name spares hashing eight absent ones.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
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

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

fn add_forwarded(headers: &mut HeaderMap, client: Option<ClientAddr>, host: Option<HeaderValue>) {
    if let Some(ClientAddr(addr)) = client {
        let ip = addr.ip();
        let value = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(earlier) => HeaderValue::from_str(&format!("{earlier}, {ip}")),
            None => ip_value(ip),
        };
        if let Ok(value) = value {
            headers.insert(X_FORWARDED_FOR, value);
        }
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST, host);
    }
}

/// `ip` as a header value. An IPv4 address is written by hand: through `Display` it cost
/// more than all the rest of the forwarding headers.
fn ip_value(ip: IpAddr) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
    let IpAddr::V4(v4) = ip else {
        return HeaderValue::from_str(&ip.to_string());
    };
    let mut text = [0_u8; 15];
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text[len] = b'.';
            len += 1;
        }
        if octet >= 100 {
            text[len] = b'0' + octet / 100;
            len += 1;
        }
        if octet >= 10 {
            text[len] = b'0' + octet / 10 % 10;
            len += 1;
        }
        text[len] = b'0' + octet % 10;
        len += 1;
    }
    HeaderValue::from_bytes(&text[..len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ip_is_written_as_display_writes_it() {
        let mut ips: Vec<IpAddr> = vec![
            "::1".parse().unwrap(),
            "::ffff:10.0.0.1".parse().unwrap(),
            "2001:db8::8a2e:370:7334".parse().unwrap(),
        ];
        for octet in 0..=255_u8 {
            ips.push(IpAddr::from([octet, 255 - octet, octet / 2, 9]));
        }
        for ip in ips {
            assert_eq!(ip_value(ip).unwrap(), ip.to_string().as_str());
        }
    }

    #[test]
    fn hop_by_hop_headers_go_and_the_rest_stay() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.insert("x-trace", HeaderValue::from_static("1"));
        let untouched = headers.clone();
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers, untouched);
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("x-trace, keep-alive"),
        );
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key(header::CONTENT_TYPE));
    }
}
