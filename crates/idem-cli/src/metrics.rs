//! The gateway's Prometheus metrics: its own recorder (never the process-global one, so
//! several gateways in one process keep apart), latency histograms recorded as requests
//! flow, and the layers' counters read when `/metrics` is scraped.
//!
//! Every name is listed in the README's Operations section.
//!
//! ```
//! use std::sync::Arc;
//! use idem_cli::metrics::GatewayMetrics;
//! use idem_core::StoreCounters;
//! use idem_http::IdempotencyStats;
//!
//! let metrics = Arc::new(GatewayMetrics::new());
//! let request = metrics.request();
//! request.finish(http::StatusCode::CREATED);
//! let store = StoreCounters { records: Some(3), ..StoreCounters::default() };
//! let text = metrics.render(&[Arc::new(IdempotencyStats::default())], Some(0), &store);
//! assert!(text.contains("idem_requests_total{outcome=\"replayed\"} 0"));
//! assert!(text.contains("idem_request_duration_seconds_count{status=\"2xx\"} 1"));
//! assert!(text.contains("idem_stuck_leases 0"));
//! assert!(text.contains("idem_store_records 3"));
//! assert!(!text.contains("idem_store_commits_total"));
//! ```

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use axum::body::Body;
use http::{Request, Response};
use hyper::body::Incoming;
use idem_core::{
    Begin, Fingerprint, InFlightRecord, Lease, Record, ScopedKey, Store, StoreCounters, StoreError,
    Stored, Token,
};
use idem_http::{IdempotencyStats, Outcome};
use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tokio::time::Instant;

use crate::proxy::{Proxy, ProxyError};

/// Latency buckets, in seconds: from a local store's sub-millisecond answers to an
/// upstream's slow ones.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Reads one counter of a layer.
type Reader = fn(&IdempotencyStats) -> u64;

/// `idem_requests_total{outcome=…}` counts every request a layer handled by how it ended
/// ([`Outcome`], a partition); these counters overlap with it (a lost lease is also an
/// execution), so they are exported one each: name, help, reader.
const LAYER_COUNTERS: [(&str, &str, Reader); 5] = [
    (
        "idem_store_errors_total",
        "Store calls that failed (claims, completions, releases, renewals).",
        IdempotencyStats::store_errors,
    ),
    (
        "idem_unknown_outcomes_total",
        "Executed requests whose upstream failed after the request may have reached it, or timed out.",
        IdempotencyStats::unknown_outcomes,
    ),
    (
        "idem_lease_lost_total",
        "Completed responses not stored because another claim took the key over.",
        IdempotencyStats::lease_lost,
    ),
    (
        "idem_responses_not_stored_total",
        "Completed responses the store would not take; their keys stay held until the lease ends.",
        IdempotencyStats::not_stored,
    ),
    (
        "idem_derived_keys_total",
        "Requests without a key that were keyed by their fingerprint.",
        IdempotencyStats::derived,
    ),
];

/// The status classes request latency is recorded by.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The store operations whose latency is recorded: the layer's calls. Sweeps run in the
/// background, on the store itself; the store counts what they remove
/// ([`StoreCounters::swept`]).
const STORE_OPERATIONS: [&str; 6] = ["begin", "complete", "release", "renew", "get", "delete"];

/// Reads one figure of a store's counters.
type StoreFigure = fn(&StoreCounters) -> Option<u64>;

/// What a store's [`StoreCounters`] are exported as: name, help, whether it is a gauge (else
/// a counter), reader.
const STORE_FIGURES: [(&str, &str, bool, StoreFigure); 4] = [
    (
        "idem_store_records",
        "Records the store keeps now (in flight, completed, or expired and not yet swept).",
        true,
        |counters| counters.records,
    ),
    (
        "idem_store_swept_records_total",
        "Expired records this process's sweeps removed.",
        false,
        |counters| counters.swept,
    ),
    (
        "idem_store_commits_total",
        "Durable commits of the store's writer (each carries a group of operations).",
        false,
        |counters| counters.commits,
    ),
    (
        "idem_store_committed_operations_total",
        "Operations the writer's durable commits carried.",
        false,
        |counters| counters.committed_operations,
    ),
];

/// One gateway's metrics. Cheap to share: clone the `Arc`.
pub struct GatewayMetrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    requests_in_flight: Gauge,
    /// By status class, indexed as [`STATUS_CLASSES`].
    request_latency: [Histogram; STATUS_CLASSES.len()],
    upstream_latency: Histogram,
    store_latency: [Histogram; STORE_OPERATIONS.len()],
}

impl std::fmt::Debug for GatewayMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayMetrics").finish_non_exhaustive()
    }
}

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl GatewayMetrics {
    /// A fresh set of metrics with its own recorder.
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&LATENCY_BUCKETS)
            .expect("the latency buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        let describe = |name: &'static str, unit: Option<Unit>, help: &'static str| {
            recorder.describe_counter(name.into(), unit, help.into());
        };
        describe(
            "idem_requests_total",
            None,
            "Requests the idempotency layer handled (keyed or refused), by how they ended.",
        );
        for (name, help, _) in LAYER_COUNTERS {
            describe(name, None, help);
        }
        for (name, help, gauge, _) in STORE_FIGURES {
            if gauge {
                recorder.describe_gauge(name.into(), None, help.into());
            } else {
                describe(name, None, help);
            }
        }
        recorder.describe_gauge(
            "idem_requests_in_flight".into(),
            None,
            "Requests the gateway is answering now.".into(),
        );
        recorder.describe_gauge(
            "idem_keyed_requests_running".into(),
            None,
            "Keyed requests whose work (claim, upstream call, storing) is under way, \
             whether or not their client still waits."
                .into(),
        );
        recorder.describe_gauge(
            "idem_stuck_leases".into(),
            None,
            "Keys in flight for longer than stuck_after (counted up to 1000); NaN when the \
             store could not list them for this scrape."
                .into(),
        );
        recorder.describe_histogram(
            "idem_request_duration_seconds".into(),
            Some(Unit::Seconds),
            "Time from a request's arrival to its response head, by status class.".into(),
        );
        recorder.describe_histogram(
            "idem_upstream_duration_seconds".into(),
            Some(Unit::Seconds),
            "Time the upstream took to answer with a response head (or fail).".into(),
        );
        recorder.describe_histogram(
            "idem_store_duration_seconds".into(),
            Some(Unit::Seconds),
            "Time one store call took, by operation (calls cut off by store_timeout too).".into(),
        );
        let requests_in_flight =
            recorder.register_gauge(&Key::from_static_name("idem_requests_in_flight"), &METADATA);
        let upstream_latency = recorder.register_histogram(
            &Key::from_static_name("idem_upstream_duration_seconds"),
            &METADATA,
        );
        // Registered once rather than per request: each lookup would allocate a key.
        let request_latency = STATUS_CLASSES.map(|class| {
            recorder.register_histogram(
                &Key::from_parts(
                    "idem_request_duration_seconds",
                    vec![Label::from_static_parts("status", class)],
                ),
                &METADATA,
            )
        });
        let store_latency = STORE_OPERATIONS.map(|operation| {
            recorder.register_histogram(
                &Key::from_parts(
                    "idem_store_duration_seconds",
                    vec![Label::from_static_parts("operation", operation)],
                ),
                &METADATA,
            )
        });
        Self {
            recorder,
            handle,
            requests_in_flight,
            request_latency,
            upstream_latency,
            store_latency,
        }
    }

    fn counter(&self, name: &'static str, labels: Vec<Label>) -> Counter {
        self.recorder
            .register_counter(&Key::from_parts(name, labels), &METADATA)
    }

    /// The Prometheus text exposition of everything, with the layers' counters (summed
    /// over routes) as they are now, the count of stuck leases if the store could list
    /// them (else `NaN`, so that an old count is never shown as current), and what the
    /// store tells of itself (each figure absent where it cannot tell).
    pub fn render(
        &self,
        layers: &[Arc<IdempotencyStats>],
        stuck_leases: Option<u64>,
        store: &StoreCounters,
    ) -> String {
        self.recorder
            .register_gauge(&Key::from_static_name("idem_stuck_leases"), &METADATA)
            .set(stuck_leases.map_or(f64::NAN, |stuck| stuck as f64));
        for (name, _, gauge, read) in STORE_FIGURES {
            let Some(value) = read(store) else { continue };
            let key = Key::from_static_name(name);
            if gauge {
                self.recorder
                    .register_gauge(&key, &METADATA)
                    .set(value as f64);
            } else {
                self.recorder
                    .register_counter(&key, &METADATA)
                    .absolute(value);
            }
        }
        let sum = |read: Reader| layers.iter().map(|stats| read(stats)).sum::<u64>();
        for outcome in Outcome::ALL {
            let count = layers.iter().map(|stats| stats.outcome(outcome)).sum();
            self.counter(
                "idem_requests_total",
                vec![Label::from_static_parts("outcome", outcome.as_str())],
            )
            .absolute(count);
        }
        for (name, _, read) in LAYER_COUNTERS {
            self.counter(name, Vec::new()).absolute(sum(read));
        }
        self.recorder
            .register_gauge(
                &Key::from_static_name("idem_keyed_requests_running"),
                &METADATA,
            )
            .set(sum(IdempotencyStats::running) as f64);
        self.handle.render()
    }

    /// Drains recorded histogram samples into their buckets, so that memory stays bounded
    /// when nobody scrapes. Call it every few seconds.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// Counts a request in flight until the guard is dropped, and records its duration
    /// with its status class when [`RequestTimer::finish`] is called.
    pub fn request(self: &Arc<Self>) -> RequestTimer {
        self.requests_in_flight.increment(1.0);
        RequestTimer {
            metrics: Arc::clone(self),
            started: Instant::now(),
        }
    }

    fn store_call(&self, operation: usize) -> StoreTimer<'_> {
        StoreTimer {
            metrics: self,
            operation,
            started: Instant::now(),
        }
    }
}

/// One request in flight (see [`GatewayMetrics::request`]).
#[derive(Debug)]
pub struct RequestTimer {
    metrics: Arc<GatewayMetrics>,
    started: Instant,
}

impl RequestTimer {
    /// Records the request's duration under its response status class (`2xx`, `4xx`, …).
    pub fn finish(self, status: http::StatusCode) -> Duration {
        let took = self.started.elapsed();
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.metrics.request_latency[class].record(took.as_secs_f64());
        took
    }
}

impl Drop for RequestTimer {
    fn drop(&mut self) {
        self.metrics.requests_in_flight.decrement(1.0);
    }
}

/// Records one store call's duration when dropped, so that a call cut off by the layer's
/// `store_timeout` counts too.
struct StoreTimer<'a> {
    metrics: &'a GatewayMetrics,
    operation: usize,
    started: Instant,
}

impl Drop for StoreTimer<'_> {
    fn drop(&mut self) {
        self.metrics.store_latency[self.operation].record(self.started.elapsed().as_secs_f64());
    }
}

/// A store that records how long each call takes.
#[derive(Debug)]
pub struct TimedStore {
    inner: Arc<dyn Store>,
    metrics: Arc<GatewayMetrics>,
}

impl TimedStore {
    /// Times every call to `inner` into `metrics`.
    pub fn new(inner: Arc<dyn Store>, metrics: Arc<GatewayMetrics>) -> Self {
        Self { inner, metrics }
    }
}

#[async_trait]
impl Store for TimedStore {
    async fn begin(
        &self,
        key: &ScopedKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let _timer = self.metrics.store_call(0);
        self.inner.begin(key, fingerprint, lease).await
    }
    async fn complete(
        &self,
        key: &ScopedKey,
        token: Token,
        stored: &Stored,
        retain: Duration,
    ) -> Result<SystemTime, StoreError> {
        let _timer = self.metrics.store_call(1);
        self.inner.complete(key, token, stored, retain).await
    }
    async fn release(&self, key: &ScopedKey, token: Token) -> Result<(), StoreError> {
        let _timer = self.metrics.store_call(2);
        self.inner.release(key, token).await
    }
    async fn renew(
        &self,
        key: &ScopedKey,
        token: Token,
        lease: Duration,
    ) -> Result<Lease, StoreError> {
        let _timer = self.metrics.store_call(3);
        self.inner.renew(key, token, lease).await
    }
    async fn get(&self, key: &ScopedKey) -> Result<Option<Record>, StoreError> {
        let _timer = self.metrics.store_call(4);
        self.inner.get(key).await
    }
    async fn delete(&self, key: &ScopedKey) -> Result<bool, StoreError> {
        let _timer = self.metrics.store_call(5);
        self.inner.delete(key).await
    }
    async fn sweep(&self, limit: usize) -> Result<usize, StoreError> {
        self.inner.sweep(limit).await
    }
    async fn in_flight(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> Result<Vec<InFlightRecord>, StoreError> {
        self.inner.in_flight(older_than, limit).await
    }
    fn fatal_error(&self) -> Option<String> {
        self.inner.fatal_error()
    }
    fn counters(&self) -> idem_core::StoreCounters {
        self.inner.counters()
    }
}

/// The proxy, with the time to each upstream answer (or failure) recorded.
#[derive(Debug, Clone)]
pub struct TimedProxy {
    inner: Proxy,
}

impl TimedProxy {
    /// Times every call to `inner` into `metrics`.
    pub fn new(inner: Proxy, metrics: Arc<GatewayMetrics>) -> Self {
        // Recorded by the proxy's own future: wrapping that would box it a second time and
        // clone an `Arc` per request.
        Self {
            inner: inner.recording_latency(metrics.upstream_latency.clone()),
        }
    }
}

impl tower::Service<Request<Body>> for TimedProxy {
    type Response = Response<Incoming>;
    type Error = ProxyError;
    type Future = <Proxy as tower::Service<Request<Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        self.inner.call(request)
    }
}
