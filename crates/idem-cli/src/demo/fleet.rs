//! The clients: one `Idempotency-Key` per payment, retried with that same key until
//! answered.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use indicatif::ProgressBar;
use tokio::task::JoinSet;

use super::DemoError;
use super::rng::{Rng, splitmix64, unit};

/// How long one attempt waits for its answer before the client counts it as lost.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) struct Fleet {
    pub(super) uri: String,
    pub(super) payments: u64,
    pub(super) max_attempts: u32,
    pub(super) seed: u64,
    /// Keeps the two runs' keys apart (each run has its own store anyway).
    pub(super) namespace: &'static str,
}

#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Tally {
    pub(super) answered: u64,
    pub(super) refused: u64,
    pub(super) abandoned: u64,
    pub(super) attempts: u64,
    pub(super) replays: u64,
    pub(super) conflicts: u64,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.answered += other.answered;
        self.refused += other.refused;
        self.abandoned += other.abandoned;
        self.attempts += other.attempts;
        self.replays += other.replays;
        self.conflicts += other.conflicts;
    }
}

/// How one attempt went.
enum Attempt {
    /// A success answer; `true` when it was a replay.
    Charged(bool),
    /// Worth another try: lost, in flight elsewhere (409), or a server error.
    Retry { conflict: bool },
    /// A final refusal.
    Refused,
}

impl Fleet {
    pub(super) async fn run(
        self,
        clients: u32,
        progress: &ProgressBar,
    ) -> Result<Tally, DemoError> {
        let fleet = Arc::new(self);
        let client = pooled_client();
        let next = Arc::new(AtomicU64::new(0));
        let attempts = Arc::new(AtomicU64::new(0));
        let mut tasks = JoinSet::new();
        for index in 0..clients {
            let fleet = Arc::clone(&fleet);
            let client = client.clone();
            let next = Arc::clone(&next);
            let attempts = Arc::clone(&attempts);
            let progress = progress.clone();
            tasks.spawn(async move {
                let mut rng = Rng::new(fleet.seed ^ (u64::from(index) << 32) ^ 0x00C1_1E27);
                let mut tally = Tally::default();
                loop {
                    let payment = next.fetch_add(1, Ordering::Relaxed);
                    if payment >= fleet.payments {
                        break;
                    }
                    fleet
                        .pay(&client, payment, &mut rng, &mut tally, &attempts)
                        .await;
                    progress.inc(1);
                    progress.set_message(format!("{} attempts", attempts.load(Ordering::Relaxed)));
                }
                tally
            });
        }
        let mut total = Tally::default();
        while let Some(joined) = tasks.join_next().await {
            total.add(joined.map_err(DemoError::Client)?);
        }
        Ok(total)
    }

    /// Makes one payment: the same key and body on every attempt, until an answer.
    async fn pay(
        &self,
        client: &Client<HttpConnector, Full<Bytes>>,
        payment: u64,
        rng: &mut Rng,
        tally: &mut Tally,
        attempts: &AtomicU64,
    ) {
        let payment_id = format!("pay_{payment:07}");
        let key = format!(
            "demo-{}-{:016x}",
            self.namespace,
            splitmix64(self.seed ^ payment)
        );
        let body = Bytes::from(
            serde_json::json!({
                "payment_id": payment_id,
                "amount": 1000 + payment % 9000,
                "currency": "EUR",
            })
            .to_string(),
        );
        for attempt in 1..=self.max_attempts {
            tally.attempts += 1;
            attempts.fetch_add(1, Ordering::Relaxed);
            match self.attempt(client, &key, body.clone()).await {
                Attempt::Charged(replayed) => {
                    tally.answered += 1;
                    tally.replays += u64::from(replayed);
                    return;
                }
                Attempt::Refused => {
                    tally.refused += 1;
                    return;
                }
                Attempt::Retry { conflict } => {
                    tally.conflicts += u64::from(conflict);
                    if attempt < self.max_attempts {
                        tokio::time::sleep(backoff(attempt, rng)).await;
                    }
                }
            }
        }
        tally.abandoned += 1;
    }

    async fn attempt(
        &self,
        client: &Client<HttpConnector, Full<Bytes>>,
        key: &str,
        body: Bytes,
    ) -> Attempt {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = match self.uri.parse() {
            Ok(uri) => uri,
            Err(_) => return Attempt::Refused,
        };
        let headers = request.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match HeaderValue::from_str(key) {
            Ok(value) => headers.insert("idempotency-key", value),
            Err(_) => return Attempt::Refused,
        };
        let exchange = async {
            let answer = client.request(request).await.ok()?;
            let status = answer.status();
            let replayed = answer
                .headers()
                .get("idempotent-replayed")
                .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"true"));
            // An answer cut off mid-body is as lost as one never sent.
            answer.into_body().collect().await.ok()?;
            Some((status, replayed))
        };
        match tokio::time::timeout(ATTEMPT_TIMEOUT, exchange).await {
            Ok(Some((status, replayed))) if status.is_success() => Attempt::Charged(replayed),
            Ok(Some((status, _))) if status == StatusCode::CONFLICT => {
                Attempt::Retry { conflict: true }
            }
            Ok(Some((status, _)))
                if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() =>
            {
                Attempt::Retry { conflict: false }
            }
            Ok(Some(_)) => Attempt::Refused,
            // No answer: lost on the way back, or timed out.
            Ok(None) | Err(_) => Attempt::Retry { conflict: false },
        }
    }
}

/// Exponential from 2 ms, capped at 20 ms, with jitter (half to all of it). Short: the
/// hop loses answers at once, it does not make clients wait for a timeout.
fn backoff(attempt: u32, rng: &mut Rng) -> Duration {
    let ceiling_ms = (2u64 << attempt.saturating_sub(1).min(5)).min(20);
    let ceiling = Duration::from_millis(ceiling_ms);
    ceiling.mul_f64(0.5 + 0.5 * unit(rng.next_u64()))
}

pub(super) fn pooled_client() -> Client<HttpConnector, Full<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}
