//! One axum app, four ways, for `bench/layer.sh`:
//!
//! ```sh
//! idem-layer-bench VARIANT [ADDR] [DELAY_MS]
//! ```
//!
//! - `bare`: the app alone;
//! - `idem`: behind `idem_http::IdempotencyLayer` with `idem_core::MemoryStore` (default policy,
//!   a 2 GiB cap);
//! - `idempotent`: behind the `idempotent` crate's `middleware::IdempotencyLayer` with its
//!   in-memory store (default settings);
//! - `axum-idempotent`: behind `axum_idempotent::IdempotentLayer` keyed by the
//!   `Idempotency-Key` header, over a ruts `MokaStore` session store (it caches per session,
//!   so its `SessionLayer` and `CookieManagerLayer` sit outside it, as its docs require).
//!
//! The app is the same in every variant: `POST /payments` reads the body, counts the call,
//! optionally sleeps `DELAY_MS` (for the concurrency probe), and answers `201` with the
//! bench upstream's JSON; `GET /__stats` (outside every layer) answers `{"posts":N}`, so the
//! handler's own count of runs is what the probe reads.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};

const CREATED: &[u8] = br#"{"id":"pay_1","status":"created"}"#;

#[derive(Clone)]
struct App {
    posts: Arc<AtomicU64>,
    delay: Duration,
}

async fn pay(State(app): State<App>, body: Bytes) -> impl IntoResponse {
    // The body is taken (read whole) as a real handler would.
    let _ = body;
    app.posts.fetch_add(1, Ordering::Relaxed);
    if !app.delay.is_zero() {
        tokio::time::sleep(app.delay).await;
    }
    (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "application/json")],
        Bytes::from_static(CREATED),
    )
}

async fn stats(State(app): State<App>) -> impl IntoResponse {
    format!(r#"{{"posts":{}}}"#, app.posts.load(Ordering::Relaxed))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let variant = args.next().unwrap_or_else(|| "bare".to_owned());
    let addr: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:38090".to_owned())
        .parse()?;
    let delay = Duration::from_millis(args.next().map_or(Ok(0), |ms| ms.parse())?);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(&variant, addr, delay))
}

async fn serve(
    variant: &str,
    addr: SocketAddr,
    delay: Duration,
) -> Result<(), Box<dyn std::error::Error>> {
    let app = App {
        posts: Arc::new(AtomicU64::new(0)),
        delay,
    };
    let payments = Router::new().route("/payments", post(pay));
    let payments = match variant {
        "bare" => payments,
        // A cap the run cannot fill: past the default 16 MiB (~85 k records, a few seconds
        // here) every new key would be a cheap 503, which measures nothing. The peers'
        // memory stores have no cap.
        "idem" => payments.layer(idem_http::IdempotencyLayer::new(
            idem_core::MemoryStore::with_limits(
                idem_core::MemoryLimits::default().max_bytes(2 << 30),
            ),
        )),
        "idempotent" => payments.layer(idempotent::middleware::IdempotencyLayer::new(
            idempotent::memory::MemoryStore::builder().try_build()?,
        )),
        "axum-idempotent" => {
            use ruts::store::moka::MokaStore;
            let options = axum_idempotent::IdempotentOptions::default()
                .use_idempotency_key_header(Some("idempotency-key"), false);
            payments
                .layer(axum_idempotent::IdempotentLayer::<MokaStore>::new(options))
                .layer(
                    ruts::SessionLayer::new(Arc::new(MokaStore::builder().build()))
                        .with_cookie_options(ruts::CookieOptions::build().name("session")),
                )
                .layer(tower_cookies::CookieManagerLayer::new())
        }
        other => return Err(format!("unknown variant {other:?}").into()),
    };
    let router = payments
        .merge(Router::new().route("/__stats", get(stats)))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("idem-layer-bench {variant} listening on {addr}");
    axum::serve(listener, router).await?;
    Ok(())
}
