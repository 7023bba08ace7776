//! `idem serve`: the idempotency layer around a reverse proxy, on a hyper server with
//! graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use idem::Store;
use idem_http::{Idempotency, IdempotencyError, IdempotencyLayer, IdempotencyStats};
use tokio::net::TcpListener;
use tower::{Layer, ServiceExt};

use crate::config::{GatewayConfig, PathMatch};
use crate::proxy::{ClientAddr, Proxy};

type Protected = Idempotency<Proxy, Arc<dyn Store>>;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A route's policy was refused by the layer.
    #[error("invalid policy")]
    Policy(#[from] idem_http::PolicyError),
    /// The listen address could not be bound.
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
}

/// The request handler: picks the route's protected proxy and answers.
#[derive(Clone)]
pub struct Gateway {
    routes: Arc<[(PathMatch, Vec<http::Method>, Protected)]>,
    default: Protected,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("routes", &self.routes.len())
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Builds the services for `config` around one shared store.
    pub fn new(config: &GatewayConfig, store: Arc<dyn Store>) -> Result<Self, ServeError> {
        let proxy = Proxy::new(config.upstream.clone(), config.connect_timeout);
        let protect = |policy: &idem_http::IdempotencyPolicy| -> Result<Protected, ServeError> {
            let layer = IdempotencyLayer::with_policy(Arc::clone(&store), policy.clone())?;
            Ok(layer.layer(proxy.clone()))
        };
        let routes = config
            .routes
            .iter()
            .map(|route| {
                Ok((
                    route.path.clone(),
                    route.methods.clone(),
                    protect(&route.policy)?,
                ))
            })
            .collect::<Result<Vec<_>, ServeError>>()?;
        Ok(Self {
            routes: routes.into(),
            default: protect(&config.default_policy)?,
        })
    }

    /// Every layer's counters, default route first.
    pub fn stats(&self) -> Vec<Arc<IdempotencyStats>> {
        std::iter::once(&self.default)
            .chain(self.routes.iter().map(|(_, _, service)| service))
            .map(|service| Arc::clone(service.stats()))
            .collect()
    }

    /// Keyed requests whose work is still under way, on every route.
    pub fn running(&self) -> u64 {
        self.stats().iter().map(|stats| stats.running()).sum()
    }

    /// Answers one request.
    pub fn handle(
        &self,
        request: Request<Incoming>,
        client: SocketAddr,
    ) -> impl Future<Output = Response<Body>> + Send + 'static {
        let path = request.uri().path();
        let service = self
            .routes
            .iter()
            .find(|(paths, methods, _)| {
                (methods.is_empty() || methods.contains(request.method())) && paths.matches(path)
            })
            .map_or(&self.default, |(_, _, service)| service)
            .clone();
        let mut request = request.map(Body::new);
        request.extensions_mut().insert(ClientAddr(client));
        // Boxed as a plain `dyn Future + Send`: the layer's future type is too deep for the
        // compiler to prove `Send` through an async block on its own.
        let answer: Pin<Box<dyn Future<Output = Result<Response<_>, _>> + Send>> =
            Box::pin(service.oneshot(request));
        async move {
            match answer.await {
                Ok(response) => response.map(Body::new),
                // Only requests the layer passes through untouched come back as errors.
                Err(source) => {
                    tracing::warn!(error = %source, "upstream unreachable");
                    IdempotencyError::UpstreamUnavailable { source }
                        .to_response()
                        .map(Body::from)
                }
            }
        }
    }
}

/// Serves `gateway` on `listener` until `shutdown` resolves; then stops accepting, lets
/// open requests finish and waits for detached keyed requests to store their responses,
/// up to `grace`.
pub async fn serve_on(
    listener: TcpListener,
    gateway: Gateway,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A timer makes hyper enforce its header-read timeout (30 s): a client that trickles
    // its request head cannot hold a connection forever.
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
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
        };
        let _ = stream.set_nodelay(true);
        let gateway = gateway.clone();
        let service = hyper::service::service_fn(move |request| {
            let gateway = gateway.clone();
            async move { Ok::<_, Infallible>(gateway.handle(request, client).await) }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down: no new connections; finishing requests in flight");
    let deadline = tokio::time::Instant::now() + grace;
    if tokio::time::timeout_at(deadline, graceful.shutdown())
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
}

/// Opens the store, binds, and serves `config` until `shutdown` resolves.
pub async fn serve(
    config: GatewayConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let store = config.store.open().await?;
    let gateway = Gateway::new(&config, store)?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
    // The bound address, not the configured one: with port 0 the OS picks the port.
    let listen = listener.local_addr().unwrap_or(config.listen);
    tracing::info!(%listen, upstream = %config.upstream, store = %config.store, "idem serve is ready");
    serve_on(listener, gateway, shutdown, config.shutdown_timeout).await;
    Ok(())
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
