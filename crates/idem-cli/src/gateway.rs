//! `idem serve`: the idempotency layer around a reverse proxy, on a hyper server with
//! graceful shutdown, a connection cap, bounded request heads, one shared budget for
//! buffered keyed bodies, and a watch on the store's health.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use idem_core::Store;
use idem_http::{
    BodyBudget, Idempotency, IdempotencyError, IdempotencyLayer, IdempotencyStats, NotSent,
    PROBLEM_JSON, Problem,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tower::{Layer, ServiceExt};

use crate::config::{GatewayConfig, Routing, ServerLimits};
use crate::metrics::{GatewayMetrics, TimedProxy, TimedStore};
use crate::proxy::{ClientAddr, Proxy, ProxyError};

type Protected = Idempotency<TimedProxy, Arc<dyn Store>>;

/// How often the gateway asks its store whether it can still serve.
const STORE_WATCH_EVERY: Duration = Duration::from_secs(1);

/// Why the gateway could not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listen address (or the admin listener's) could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] crate::store_url::StoreUrlError),
    /// The store reported that it can no longer serve ([`Store::fatal_error`]), so the
    /// gateway stopped rather than answer every keyed request `503`.
    #[error("the store can no longer serve: {reason}")]
    StoreFailed {
        /// What the store said.
        reason: String,
    },
}

/// The request handler: picks the route's protected proxy and answers.
#[derive(Clone)]
pub struct Gateway {
    config: Arc<GatewayConfig>,
    /// One service per route of `config.routes`, in the same order.
    routes: Arc<[Protected]>,
    default: Protected,
    store: Arc<dyn Store>,
    metrics: Arc<GatewayMetrics>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("routes", &self.routes.len())
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Builds the services for `config` around one shared store. Every route's layer shares
    /// one [`BodyBudget`] of `max_buffered_bodies` and the scope secret, if any.
    pub fn new(config: &GatewayConfig, store: Arc<dyn Store>) -> Self {
        let metrics = Arc::new(GatewayMetrics::new());
        let proxy = TimedProxy::new(
            Proxy::new(config.upstream.clone(), config.connect_timeout),
            Arc::clone(&metrics),
        );
        let timed: Arc<dyn Store> =
            Arc::new(TimedStore::new(Arc::clone(&store), Arc::clone(&metrics)));
        let budget = BodyBudget::new(config.limits.max_buffered_bodies, config.limits.buffer_wait);
        let protect = |policy: &idem_http::ValidPolicy| -> Protected {
            let mut layer = IdempotencyLayer::validated(Arc::clone(&timed), policy.clone())
                .body_budget(budget.clone());
            if let Some(secret) = &config.scope_secret {
                layer = layer.scope_secret(secret.bytes());
            }
            layer.layer(proxy.clone())
        };
        let routes: Vec<_> = config
            .routes
            .iter()
            .map(|route| protect(&route.policy))
            .collect();
        Self {
            config: Arc::new(config.clone()),
            routes: routes.into(),
            default: protect(&config.default_policy),
            store,
            metrics,
        }
    }

    /// The store it serves from, as opened (its calls are not timed into the metrics).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Its metrics, rendered by the admin listener's `/metrics`.
    pub fn metrics(&self) -> &Arc<GatewayMetrics> {
        &self.metrics
    }

    /// Every layer's counters, default route first.
    pub fn stats(&self) -> Vec<Arc<IdempotencyStats>> {
        std::iter::once(&self.default)
            .chain(self.routes.iter())
            .map(|service| Arc::clone(service.stats()))
            .collect()
    }

    /// Keyed requests whose work is still under way, on every route.
    pub fn running(&self) -> u64 {
        self.stats().iter().map(|stats| stats.running()).sum()
    }

    /// The server limits it was built with.
    pub fn limits(&self) -> &ServerLimits {
        &self.config.limits
    }

    /// Why the store can no longer serve, if it cannot ([`Store::fatal_error`]).
    pub fn fatal_error(&self) -> Option<String> {
        self.store.fatal_error()
    }

    /// Answers one request.
    pub fn handle(
        &self,
        request: Request<Incoming>,
        client: SocketAddr,
    ) -> impl Future<Output = Response<Body>> + Send + use<> {
        // The one routing decision (normalised path, methods in any case) lives in the
        // configuration, so the gateway's tests and serving cannot disagree.
        let service = match self.config.route(request.method(), request.uri().path()) {
            Routing::Route(index) => Ok(&self.routes[index]),
            Routing::Default => Ok(&self.default),
            Routing::Ambiguous(error) => Err(error),
        };
        let timer = self.metrics.request();
        let mut request = request.map(Body::new);
        request.extensions_mut().insert(ClientAddr(client));
        // Boxed as a plain `dyn Future + Send`: the layer's future type is too deep for the
        // compiler to prove `Send` through an async block on its own.
        let answer: Result<Pin<Box<dyn Future<Output = Result<Response<_>, _>> + Send>>, _> =
            service.map(|service| -> Pin<Box<dyn Future<Output = _> + Send>> {
                Box::pin(service.clone().oneshot(request))
            });
        // The gateway's own problems are typed as the default policy's are.
        let config = Arc::clone(&self.config);
        async move {
            let problem_type_base = &config.default_policy.problem_type_base;
            let response = match answer {
                Ok(answer) => match answer.await {
                    Ok(response) => response.map(Body::new),
                    // Only requests the layer passes through untouched come back as errors.
                    Err(source) => passthrough_failure(source, problem_type_base),
                },
                Err(source) => {
                    tracing::debug!(error = %source, "ambiguous path refused");
                    IdempotencyError::AmbiguousPath { source }
                        .to_response(problem_type_base)
                        .map(Body::from)
                }
            };
            timer.finish(response.status());
            response
        }
    }
}

/// The answer to a passed-through request (no key, or an unprotected method) whose
/// forwarding failed. Only an error that proves nothing was sent says a retry is safe;
/// any other may have been processed, and says so.
fn passthrough_failure(source: ProxyError, problem_type_base: &str) -> Response<Body> {
    if NotSent::is_in(&*source) {
        tracing::warn!(error = %source, "upstream unreachable");
        return IdempotencyError::UpstreamUnavailable { source }
            .to_response(problem_type_base)
            .map(Body::from);
    }
    tracing::warn!(error = %source, "upstream failed after the request may have reached it");
    let problem = Problem {
        problem_type: format!("{problem_type_base}outcome-unknown"),
        title: "Upstream outcome unknown",
        status: 502,
        detail: "the upstream failed after the request may have reached it, so whether it \
                 was processed is unknown; check before sending it again"
            .to_owned(),
        original_status: None,
    };
    // Serializing a struct of strings and integers cannot fail.
    let body = serde_json::to_vec(&problem).unwrap_or_default();
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = http::StatusCode::BAD_GATEWAY;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(PROBLEM_JSON),
    );
    response
}

/// Serves `gateway` on `listener` until `shutdown` resolves or the store fails; then stops
/// accepting, lets open requests finish and waits for detached keyed requests to store
/// their responses, up to `grace`. A store failure is logged; use [`serve_until`] to learn
/// of it.
pub async fn serve_on(
    listener: TcpListener,
    gateway: Gateway,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    if let Err(error) = serve_until(listener, gateway, shutdown, grace).await {
        tracing::error!(%error, "the gateway stopped");
    }
}

/// [`serve_on`], returning [`ServeError::StoreFailed`] when it stopped because the store
/// reported that it can no longer serve (checked every second).
pub async fn serve_until(
    listener: TcpListener,
    gateway: Gateway,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> Result<(), ServeError> {
    let limits = gateway.limits().clone();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A timer makes hyper enforce the header-read timeout: a client that trickles its
    // request head, or keeps an HTTP/1 connection idle, cannot hold it forever.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let refusals = Arc::new(Semaphore::new(LINGERING_REFUSALS));
    let (stop, stopping) = watch::channel(false);
    let mut store_watch = tokio::time::interval(STORE_WATCH_EVERY);
    store_watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failure = None;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, client) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
            _ = store_watch.tick() => {
                gateway.metrics.upkeep();
                if let Some(reason) = gateway.fatal_error() {
                    tracing::error!(%reason, "the store can no longer serve; stopping");
                    failure = Some(reason);
                    break;
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            refuse(stream, &refusals);
            continue;
        };
        let activity = Arc::new(Activity::default());
        let service = {
            let gateway = gateway.clone();
            let activity = Arc::clone(&activity);
            hyper::service::service_fn(move |request| {
                let busy = activity.begin();
                // `handle` borrows the gateway only to start: no clone of it per request.
                let answer = gateway.handle(request, client);
                async move {
                    let response = answer.await;
                    drop(busy);
                    Ok::<_, Infallible>(response)
                }
            })
        };
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let mut stopping = stopping.clone();
        let idle_limit = limits.header_read_timeout;
        // Runs the connection until it ends, shutting it down gracefully (requests in flight
        // finish, HTTP/2 gets a GOAWAY) when the gateway stops or when the connection has
        // had no request in flight for `header_read_timeout`. The latter closes connections
        // that never send a request (hyper's own header-read timeout does not run while the
        // server is still telling HTTP/1 from HTTP/2) and idle HTTP/2 connections, so that
        // they cannot hold the connection slots. The slot is given back at the end.
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let mut check = tokio::time::interval(
                (idle_limit / 4).clamp(Duration::from_millis(25), Duration::from_secs(1)),
            );
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut closing = false;
            loop {
                tokio::select! {
                    ended = connection.as_mut() => {
                        if let Err(error) = ended {
                            tracing::debug!(%error, "connection ended with an error");
                        }
                        break;
                    }
                    _ = stopping.wait_for(|stop| *stop), if !closing => {
                        connection.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    _ = check.tick(), if !closing => {
                        if activity.idle_for() >= idle_limit {
                            tracing::debug!("closing a connection without a request in flight");
                            connection.as_mut().graceful_shutdown();
                            closing = true;
                        }
                    }
                }
            }
            drop(slot);
        });
    }
    drop(listener);
    tracing::info!("shutting down: no new connections; finishing requests in flight");
    let _ = stop.send(true);
    let deadline = tokio::time::Instant::now() + grace;
    // Every connection holds a slot until it ends: all slots back means all closed.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout_at(deadline, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("connections still open at the end of the grace period");
    }
    // Clients that went away leave detached work behind: let it store its responses.
    while gateway.running() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if gateway.running() > 0 {
        tracing::warn!(
            running = gateway.running(),
            "grace period over with keyed requests still running; their keys stay held until their leases end"
        );
    }
    match failure {
        Some(reason) => Err(ServeError::StoreFailed { reason }),
        None => Ok(()),
    }
}

/// Requests in flight on one connection, and when the last one ended (milliseconds since
/// the connection opened): a connection with none for `header_read_timeout` is closed.
#[derive(Debug)]
struct Activity {
    opened: tokio::time::Instant,
    in_flight: AtomicUsize,
    idle_since_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            opened: tokio::time::Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
        }
    }
}

impl Activity {
    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Busy(Arc::clone(self))
    }

    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::SeqCst));
        self.opened.elapsed().saturating_sub(since)
    }
}

/// A request in flight on its connection; ending it (dropping) marks the connection idle
/// from now if it was the last.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let now = u64::try_from(self.0.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.idle_since_ms.store(now, Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// At most this many refused connections are kept open at once to deliver their `503`;
/// beyond it, a refused connection is closed at once.
const LINGERING_REFUSALS: usize = 64;

/// What a connection beyond `max_connections` gets: HTTP/1, whatever the client speaks.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
    content-type: text/plain\r\n\
    retry-after: 1\r\n\
    connection: close\r\n\
    content-length: 39\r\n\
    \r\n\
    too many connections; retry in a second";

/// Answers a connection over the cap `503` and closes it. The request is read and dropped
/// (briefly, and only so much) before closing, since closing a socket with unread bytes
/// resets it and the client could lose the answer.
fn refuse(mut stream: TcpStream, refusals: &Arc<Semaphore>) {
    tracing::warn!("connection refused: max_connections reached");
    let Ok(permit) = Arc::clone(refusals).try_acquire_owned() else {
        let _ = stream.try_write(REFUSAL);
        return;
    };
    tokio::spawn(async move {
        let linger = Duration::from_secs(1);
        let _ = tokio::time::timeout(linger, async {
            stream.write_all(REFUSAL).await?;
            stream.shutdown().await?;
            let mut sink = [0_u8; 4096];
            let mut read = 0;
            while read < 64 << 10 {
                match stream.read(&mut sink).await? {
                    0 => break,
                    n => read += n,
                }
            }
            Ok::<_, std::io::Error>(())
        })
        .await;
        drop(permit);
    });
}

/// Opens the store, binds, and serves `config` until `shutdown` resolves; fails if the
/// store reports that it can no longer serve.
pub async fn serve(
    config: GatewayConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let store = config.store.open().await?;
    serve_with_store(config, store, shutdown).await
}

/// [`serve`] over a store opened by the caller.
pub async fn serve_with_store(
    config: GatewayConfig,
    store: Arc<dyn Store>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let gateway = Gateway::new(&config, store);
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
    // Bound before serving, so a taken admin port stops the start rather than leave the
    // gateway unwatched; it stops with the gateway.
    let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(addr) = config.admin_listen {
        let admin_listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        let admin_addr = admin_listener.local_addr().unwrap_or(addr);
        let admin = crate::admin::Admin::new(gateway.clone(), config.default_policy.store_timeout)
            .stuck_after(config.stuck_after);
        let keys = crate::keys::routes(
            Arc::clone(gateway.store()),
            config.admin_token.clone(),
            config.default_policy.store_timeout,
        );
        let routes = crate::admin::router(admin).merge(keys);
        tracing::info!(admin = %admin_addr, "admin listener is ready: /metrics, /healthz, /readyz");
        tokio::spawn(async move {
            let stopped = async move {
                let _ = admin_stopped.await;
            };
            if let Err(error) = crate::admin::serve(admin_listener, routes, stopped).await {
                tracing::error!(%error, "the admin listener stopped");
            }
        });
    }
    if config.scope_secret.is_none() {
        tracing::warn!(
            "no scope secret (set IDEM_SCOPE_SECRET or --scope-secret-file): scope digests are \
             unkeyed, so a copy of the store lets anyone test guessed credentials against them"
        );
    }
    // The bound address, not the configured one: with port 0 the OS picks the port.
    let listen = listener.local_addr().unwrap_or(config.listen);
    tracing::info!(%listen, upstream = %config.upstream, store = %config.store, "idem serve is ready");
    let served = serve_until(listener, gateway, shutdown, config.shutdown_timeout).await;
    drop(admin_stop);
    served
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the gateway");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
