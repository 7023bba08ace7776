//! The admin listener: `/metrics` (Prometheus text), `/healthz` (the process is up) and
//! `/readyz` (the store answers within a timeout and its background workers are alive).
//! It listens apart from the gateway (`--admin-listen`, loopback by default), so that
//! scrapes and probes never compete with traffic for connection slots.
//!
//! ```no_run
//! # async fn run(gateway: idem_cli::gateway::Gateway) -> std::io::Result<()> {
//! use std::time::Duration;
//! use idem_cli::admin::{Admin, router, serve};
//!
//! let admin = Admin::new(gateway, Duration::from_secs(2));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:9090").await?;
//! serve(listener, router(admin), std::future::pending()).await
//! # }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use idem_core::{Key, Scope, ScopedKey, Store};
use tokio::net::TcpListener;

use crate::gateway::Gateway;

/// What the admin routes answer from: the gateway they report on.
#[derive(Debug, Clone)]
pub struct Admin {
    gateway: Gateway,
    ready_timeout: Duration,
    stuck_after: Duration,
}

/// The default of [`Admin::stuck_after`].
pub const DEFAULT_STUCK_AFTER: Duration = Duration::from_secs(5 * 60);

/// `idem_stuck_leases` counts at most this many, so a scrape's store work stays bounded.
pub const STUCK_COUNT_LIMIT: usize = 1000;

impl Admin {
    /// Reports on `gateway`; `/readyz` gives the store `ready_timeout` to answer.
    pub fn new(gateway: Gateway, ready_timeout: Duration) -> Self {
        Self {
            gateway,
            ready_timeout,
            stuck_after: DEFAULT_STUCK_AFTER,
        }
    }

    /// Counts a key as a stuck lease in `/metrics` once it has been in flight this long
    /// (default [`DEFAULT_STUCK_AFTER`]).
    pub fn stuck_after(mut self, after: Duration) -> Self {
        self.stuck_after = after;
        self
    }

    /// Keys in flight for longer than `stuck_after`, up to [`STUCK_COUNT_LIMIT`]; `None`
    /// when the store cannot list them or did not answer within the readiness timeout.
    pub async fn stuck_leases(&self) -> Option<u64> {
        let listed = self.store().in_flight(self.stuck_after, STUCK_COUNT_LIMIT);
        match tokio::time::timeout(self.ready_timeout, listed).await {
            Ok(Ok(stuck)) => Some(stuck.len() as u64),
            Ok(Err(error)) => {
                tracing::debug!(%error, "cannot count stuck leases");
                None
            }
            Err(_) => None,
        }
    }

    /// The store the gateway serves from (for admin routes that read or change records).
    pub fn store(&self) -> &Arc<dyn Store> {
        self.gateway.store()
    }

    /// Whether the gateway can serve now: `Err` says why not.
    pub async fn ready(&self) -> Result<(), String> {
        if let Some(reason) = self.gateway.fatal_error() {
            return Err(format!("the store can no longer serve: {reason}"));
        }
        // A key no request can have (keys are visible ASCII; the scope is idem's own), so
        // the probe reads nothing real and is never found.
        let probe = ScopedKey::new(
            Scope::new("idem-admin-readiness"),
            Key::new("readiness-probe").expect("a valid key"),
        );
        match tokio::time::timeout(self.ready_timeout, self.store().get(&probe)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(format!("the store failed: {}", crate::error_chain(&error))),
            Err(_) => Err(format!(
                "the store did not answer within {:?}",
                self.ready_timeout
            )),
        }
    }
}

/// The admin routes: `GET /metrics`, `GET /healthz`, `GET /readyz`. Merge further routes
/// into it with [`Router::merge`].
pub fn router(admin: Admin) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(admin)
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(admin): State<Admin>) -> Response {
    match admin.ready().await {
        Ok(()) => "ready\n".into_response(),
        Err(reason) => {
            tracing::warn!(%reason, "not ready");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            )
                .into_response()
        }
    }
}

async fn metrics(State(admin): State<Admin>) -> Response {
    let stuck = admin.stuck_leases().await;
    let text =
        admin
            .gateway
            .metrics()
            .render(&admin.gateway.stats(), stuck, &admin.store().counters());
    let mut response = text.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}
