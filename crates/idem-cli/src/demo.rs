//! `idem demo`: the retry storm, with and without idem. Nothing to set up.
//!
//! Everything runs in this process, on `127.0.0.1` with ports the OS picks:
//!
//! ```text
//!   without idem:  clients ──▶ lossy hop ──▶ payments upstream
//!   with idem:     clients ──▶ lossy hop ──▶ idem gateway (redb in a temp dir) ──▶ payments upstream
//! ```
//!
//! - The **payments upstream** is a naive API: every `POST /payments` it receives is a new
//!   charge. It counts the charges made for each payment.
//! - The **lossy hop** is an HTTP relay standing for the network between clients and the
//!   service. It forwards each request and waits for the whole answer, so the work is done;
//!   then, for a share of the requests (`--drop-rate`), it closes the client's connection
//!   instead of passing the answer on. The client sees what it would see after a timeout or
//!   a reset: no answer, and no way to know whether the payment went through.
//! - A fleet of **clients** makes the payments, one `Idempotency-Key` per payment, and
//!   retries each with that same key and a short backoff until it gets an answer.
//!
//! The scenario runs twice, and [`DemoReport`] compares the charges the upstream made.

use std::convert::Infallible;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use comfy_table::{CellAlignment, Table, presets};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use crate::config::{ConfigError, FileConfig, GatewayConfig, Overrides};
use crate::gateway::{Gateway, ServeError};
use crate::store_url::StoreUrlError;

/// The highest `--drop-rate` accepted: beyond it almost nothing gets through.
pub const MAX_DROP_RATE: f64 = 0.9;

/// How long one attempt waits for its answer before the client counts it as lost.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// The fewest attempts a client makes before giving a payment up.
const MIN_ATTEMPTS: u32 = 20;
/// The most attempts the automatic `--max-attempts` picks.
const AUTO_ATTEMPTS_CAP: u32 = 1000;

/// `idem demo`'s settings.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct DemoArgs {
    /// Clients making payments at the same time
    #[arg(long, value_name = "N", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub clients: u32,
    /// Payments to make in all (each one charge, in intent)
    #[arg(long, value_name = "N", default_value_t = 2000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub payments: u32,
    /// Share of answers the network loses after the service has done the work (0.0 to 0.9)
    #[arg(long, value_name = "RATE", default_value_t = 0.2, value_parser = parse_drop_rate)]
    pub drop_rate: f64,
    /// Seed for which answers are lost and for the clients' backoff jitter
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,
    /// Attempts a client makes before it gives a payment up [default: enough that none is
    /// given up in practice; 20 at the default drop rate]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_attempts: Option<u32>,
    /// Do not show progress
    #[arg(long, short)]
    pub quiet: bool,
}

impl Default for DemoArgs {
    fn default() -> Self {
        Self {
            clients: 32,
            payments: 2000,
            drop_rate: 0.2,
            seed: 1,
            max_attempts: None,
            quiet: false,
        }
    }
}

impl DemoArgs {
    /// Checks every setting; the error names the flag at fault.
    pub fn validate(&self) -> Result<(), DemoError> {
        let invalid = |flag, message: String| Err(DemoError::InvalidArgs { flag, message });
        if let Err(message) = check_drop_rate(self.drop_rate) {
            return invalid("--drop-rate", message);
        }
        if self.clients == 0 {
            return invalid("--clients", "must be at least 1".into());
        }
        if self.payments == 0 {
            return invalid("--payments", "must be at least 1".into());
        }
        if self.max_attempts == Some(0) {
            return invalid("--max-attempts", "must be at least 1".into());
        }
        Ok(())
    }

    /// The attempts a client makes per payment: `--max-attempts`, or else the fewest (at
    /// least 20) that make giving any payment up a one-in-a-thousand event.
    pub fn attempts_per_payment(&self) -> u32 {
        if let Some(max) = self.max_attempts {
            return max;
        }
        let drop = self.drop_rate.clamp(0.0, MAX_DROP_RATE);
        let mut attempts = MIN_ATTEMPTS;
        // P(some payment gets no answer) <= payments * drop^attempts.
        while f64::from(self.payments) * drop.powf(f64::from(attempts)) > 1e-3
            && attempts < AUTO_ATTEMPTS_CAP
        {
            attempts += 1;
        }
        attempts
    }
}

fn check_drop_rate(rate: f64) -> Result<(), String> {
    if rate.is_finite() && (0.0..=MAX_DROP_RATE).contains(&rate) {
        Ok(())
    } else {
        Err(format!(
            "must be between 0.0 and {MAX_DROP_RATE} (the share of answers lost, e.g. 0.2)"
        ))
    }
}

fn parse_drop_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number; give a share such as 0.2"))?;
    check_drop_rate(rate)?;
    Ok(rate)
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A setting is out of range.
    #[error("{flag}: {message}")]
    InvalidArgs {
        /// The flag, e.g. `--drop-rate`.
        flag: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A local resource (a socket, the temporary directory) could not be had.
    #[error("cannot {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The gateway's configuration was refused.
    #[error("invalid gateway configuration")]
    Config(#[from] ConfigError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreUrlError),
    /// The gateway could not be built.
    #[error("cannot start the gateway")]
    Gateway(#[from] ServeError),
    /// A client task panicked.
    #[error("a client task failed")]
    Client(#[source] tokio::task::JoinError),
}

fn io_error(what: &'static str) -> impl FnOnce(std::io::Error) -> DemoError {
    move |source| DemoError::Io { what, source }
}

/// What one run of the scenario did.
#[derive(Debug, Clone, PartialEq)]
pub struct ScenarioReport {
    /// Whether the idem gateway was in the path.
    pub with_idem: bool,
    /// Payments the clients set out to make.
    pub payments: u64,
    /// Payments whose client got a success answer.
    pub answered: u64,
    /// Payments refused with a client error (none, unless something is wrong).
    pub refused: u64,
    /// Payments given up after the most attempts without an answer.
    pub abandoned: u64,
    /// Requests the clients sent, retries included.
    pub attempts: u64,
    /// Answers the lossy hop threw away.
    pub lost_answers: u64,
    /// Success answers that were replays of a stored response (`Idempotent-Replayed`).
    pub replays: u64,
    /// `409` answers: the first request with the key was still running.
    pub conflicts: u64,
    /// Charges the upstream made.
    pub charges: u64,
    /// Distinct payments the upstream charged.
    pub charged_payments: u64,
    /// Charges beyond the first for a payment: money taken twice.
    pub duplicate_charges: u64,
    /// Payments charged more than once.
    pub double_charged_payments: u64,
    /// From the first request to the last answer.
    pub wall_time: Duration,
}

impl ScenarioReport {
    /// Payments whose client never got a success answer.
    pub fn unanswered(&self) -> u64 {
        self.payments - self.answered
    }

    /// The table's row label.
    pub fn label(&self) -> &'static str {
        if self.with_idem {
            "with idem"
        } else {
            "without idem"
        }
    }
}

/// Both runs, and the settings they ran with.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoReport {
    /// The settings, `max_attempts` resolved.
    pub args: DemoArgs,
    /// Attempts a client made per payment at most.
    pub max_attempts: u32,
    /// Clients talking to the upstream directly.
    pub without_idem: ScenarioReport,
    /// Clients talking to the upstream through the idem gateway.
    pub with_idem: ScenarioReport,
}

impl DemoReport {
    /// What went wrong with idem in the path; empty when every payment was answered and
    /// charged exactly once. (Duplicates without idem are the point of the demo, not a
    /// problem.)
    pub fn problems(&self) -> Vec<String> {
        let with = &self.with_idem;
        let mut problems = Vec::new();
        if with.duplicate_charges > 0 {
            problems.push(format!(
                "idem let {} duplicate charge(s) through ({} payment(s) charged more than once)",
                with.duplicate_charges, with.double_charged_payments
            ));
        }
        if with.abandoned > 0 {
            problems.push(format!(
                "{} payment(s) got no answer through idem within {} attempts",
                with.abandoned, self.max_attempts
            ));
        }
        if with.refused > 0 {
            problems.push(format!(
                "{} payment(s) were refused through idem",
                with.refused
            ));
        }
        if with.charged_payments < with.answered {
            problems.push(format!(
                "{} payment(s) were answered through idem but never charged",
                with.answered - with.charged_payments
            ));
        }
        problems
    }

    /// Whether idem held: no duplicate charge and every payment answered.
    pub fn passed(&self) -> bool {
        self.problems().is_empty()
    }

    /// The comparison table.
    pub fn table(&self) -> Table {
        let mut table = Table::new();
        table.load_style(presets::UTF8_FULL_CONDENSED);
        table.set_header(vec![
            "",
            "payments\nintended",
            "answered",
            "attempts",
            "answers\nlost",
            "charges\nmade",
            "duplicate\ncharges",
            "wall\ntime",
        ]);
        for run in [&self.without_idem, &self.with_idem] {
            table.add_row(vec![
                run.label().to_owned(),
                run.payments.to_string(),
                run.answered.to_string(),
                run.attempts.to_string(),
                run.lost_answers.to_string(),
                run.charges.to_string(),
                run.duplicate_charges.to_string(),
                format!("{:.2} s", run.wall_time.as_secs_f64()),
            ]);
        }
        for index in 1..8 {
            if let Some(column) = table.column_mut(index) {
                column.set_cell_alignment(CellAlignment::Right);
            }
        }
        table
    }

    /// The sentences under the table.
    pub fn summary(&self) -> String {
        let without = &self.without_idem;
        let with = &self.with_idem;
        let mut lines = Vec::new();
        if without.duplicate_charges > 0 {
            lines.push(format!(
                "without idem: {} customer(s) were charged more than once; {} extra charge(s) \
                 in all: every retry of a payment whose answer was lost charged it again.",
                without.double_charged_payments, without.duplicate_charges
            ));
        } else {
            lines.push(
                "without idem: no answer was lost before a charge, so no duplicates this time \
                 (raise --drop-rate or --payments)."
                    .to_owned(),
            );
        }
        if self.passed() {
            lines.push(format!(
                "with idem:    {} payments, {} charges: each exactly once; {} retried request(s) \
                 got the stored answer back instead of running again.",
                with.payments, with.charges, with.replays
            ));
        } else {
            for problem in self.problems() {
                lines.push(format!("FAILED: {problem}"));
            }
        }
        lines.join("\n")
    }
}

impl std::fmt::Display for DemoReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} payments by {} clients; the network loses {:.0}% of answers after the charge \
             is made; clients retry with the same Idempotency-Key (up to {} attempts).\n",
            self.args.payments,
            self.args.clients,
            self.args.drop_rate * 100.0,
            self.max_attempts
        )?;
        writeln!(f, "{}\n", self.table())?;
        write!(f, "{}", self.summary())
    }
}

/// Runs the scenario without idem, then with idem, and reports both.
///
/// Progress goes to stderr unless `args.quiet` (and only when stderr is a terminal).
pub async fn run(args: &DemoArgs) -> Result<DemoReport, DemoError> {
    args.validate()?;
    let max_attempts = args.attempts_per_payment();
    let without_idem = scenario(args, max_attempts, false).await?;
    let with_idem = scenario(args, max_attempts, true).await?;
    Ok(DemoReport {
        args: args.clone(),
        max_attempts,
        without_idem,
        with_idem,
    })
}

async fn scenario(
    args: &DemoArgs,
    max_attempts: u32,
    with_idem: bool,
) -> Result<ScenarioReport, DemoError> {
    let ledger = Arc::new(Ledger::default());
    let upstream = Server::start({
        let ledger = Arc::clone(&ledger);
        move |request| {
            let ledger = Arc::clone(&ledger);
            async move { Ok::<_, Infallible>(ledger.charge(request).await) }
        }
    })
    .await?;

    // With idem, the gateway sits between the hop and the upstream, on a fresh redb file.
    let mut gateway = None;
    let target = if with_idem {
        let running = GatewayRun::start(upstream.addr).await?;
        let addr = running.addr;
        gateway = Some(running);
        addr
    } else {
        upstream.addr
    };
    let hop = LossyHop::new(target, args.drop_rate, args.seed ^ u64::from(with_idem));
    let lost_answers = Arc::clone(&hop.lost);
    let hop_server = Server::start(move |request| {
        let hop = hop.clone();
        async move { hop.relay(request).await }
    })
    .await?;

    let label = if with_idem {
        "with idem"
    } else {
        "without idem"
    };
    let progress = progress_bar(args, label);
    let fleet = Fleet {
        uri: format!("http://{}/payments", hop_server.addr),
        payments: u64::from(args.payments),
        max_attempts,
        seed: args.seed,
        namespace: if with_idem { "with" } else { "without" },
    };
    let started = Instant::now();
    let tally = fleet.run(args.clients, &progress).await?;
    let wall_time = started.elapsed();
    progress.finish_and_clear();

    // Close the hop first (its pooled connections to the gateway), then let the gateway
    // finish anything detached, so the ledger below is final.
    drop(hop_server);
    if let Some(gateway) = gateway {
        gateway.stop().await;
    }
    drop(upstream);

    let charges = ledger.counts();
    Ok(ScenarioReport {
        with_idem,
        payments: u64::from(args.payments),
        answered: tally.answered,
        refused: tally.refused,
        abandoned: tally.abandoned,
        attempts: tally.attempts,
        lost_answers: lost_answers.load(Ordering::Relaxed),
        replays: tally.replays,
        conflicts: tally.conflicts,
        charges: charges.iter().sum(),
        charged_payments: charges.len() as u64,
        duplicate_charges: charges.iter().map(|&n| n.saturating_sub(1)).sum(),
        double_charged_payments: charges.iter().filter(|&&n| n > 1).count() as u64,
        wall_time,
    })
}

fn progress_bar(args: &DemoArgs, label: &'static str) -> ProgressBar {
    let target = if args.quiet {
        ProgressDrawTarget::hidden()
    } else {
        // Draws nothing when stderr is not a terminal.
        ProgressDrawTarget::stderr()
    };
    let bar = ProgressBar::with_draw_target(Some(u64::from(args.payments)), target);
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix:>12} [{bar:32}] {pos}/{len} payments, {msg} ({elapsed})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(label);
    bar.set_message("0 attempts");
    bar
}

// ---------------------------------------------------------------------------------------
// The payments upstream.

/// The upstream's record of charges, per payment.
#[derive(Debug, Default)]
struct Ledger {
    charges: Mutex<std::collections::HashMap<String, u64>>,
    next_id: AtomicU64,
}

impl Ledger {
    /// `POST /payments` with a JSON body naming `payment_id` (or else an `Idempotency-Key`):
    /// a new charge, every time.
    async fn charge(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        if request.method() != http::Method::POST || request.uri().path() != "/payments" {
            return json(StatusCode::NOT_FOUND, r#"{"error":"not found"}"#.to_owned());
        }
        let key = request
            .headers()
            .get("idempotency-key")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let body = match request.into_body().collect().await {
            Ok(body) => body.to_bytes(),
            Err(_) => return json(StatusCode::BAD_REQUEST, r#"{"error":"bad body"}"#.into()),
        };
        let payment = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|doc| doc.get("payment_id")?.as_str().map(str::to_owned))
            .or(key);
        let Some(payment) = payment else {
            return json(
                StatusCode::BAD_REQUEST,
                r#"{"error":"payment_id is required"}"#.into(),
            );
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        {
            let mut charges = self.charges.lock().unwrap_or_else(|e| e.into_inner());
            *charges.entry(payment.clone()).or_default() += 1;
        }
        let answer = serde_json::json!({
            "id": format!("ch_{id:08}"),
            "payment_id": payment,
            "status": "succeeded",
        });
        json(StatusCode::CREATED, answer.to_string())
    }

    /// Charges per charged payment.
    fn counts(&self) -> Vec<u64> {
        let charges = self.charges.lock().unwrap_or_else(|e| e.into_inner());
        charges.values().copied().collect()
    }
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

// ---------------------------------------------------------------------------------------
// The lossy hop.

/// The relay returns this to hyper to drop an answer: hyper then closes the connection
/// without writing a response.
#[derive(Debug)]
struct Lost;

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("answer lost on purpose by the demo's lossy hop")
    }
}

impl std::error::Error for Lost {}

/// An HTTP relay that forwards every request, waits for the whole answer, and loses a share
/// of the answers by closing the client's connection instead.
#[derive(Clone)]
struct LossyHop {
    target: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
    drop_rate: f64,
    seed: u64,
    forwarded: Arc<AtomicU64>,
    lost: Arc<AtomicU64>,
}

impl LossyHop {
    fn new(target: SocketAddr, drop_rate: f64, seed: u64) -> Self {
        Self {
            target,
            client: pooled_client(),
            drop_rate,
            seed,
            forwarded: Arc::new(AtomicU64::new(0)),
            lost: Arc::new(AtomicU64::new(0)),
        }
    }

    async fn relay(&self, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Lost> {
        let (parts, body) = request.into_parts();
        let Ok(body) = body.collect().await.map(|body| body.to_bytes()) else {
            // The client went away mid-request: nothing to answer.
            return Err(Lost);
        };
        let path = parts.uri.path_and_query().map_or("/", |path| path.as_str());
        let mut forward = Request::new(Full::new(body));
        *forward.method_mut() = parts.method;
        *forward.uri_mut() = match format!("http://{}{path}", self.target).parse() {
            Ok(uri) => uri,
            Err(_) => return Ok(json(StatusCode::BAD_REQUEST, "{}".into())),
        };
        *forward.headers_mut() = parts.headers;
        forward.headers_mut().remove(header::HOST);
        forward.headers_mut().remove(header::CONNECTION);

        let answer = match self.client.request(forward).await {
            Ok(answer) => answer,
            Err(_) => return Ok(json(StatusCode::BAD_GATEWAY, r#"{"error":"hop"}"#.into())),
        };
        let (mut parts, body) = answer.into_parts();
        let Ok(body) = body.collect().await.map(|body| body.to_bytes()) else {
            return Ok(json(StatusCode::BAD_GATEWAY, r#"{"error":"hop"}"#.into()));
        };
        // The work is done and its answer is here. Now lose it, or pass it on.
        let n = self.forwarded.fetch_add(1, Ordering::Relaxed);
        if unit(splitmix64(
            self.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        )) < self.drop_rate
        {
            self.lost.fetch_add(1, Ordering::Relaxed);
            return Err(Lost);
        }
        for name in [
            header::CONNECTION,
            header::TRANSFER_ENCODING,
            header::CONTENT_LENGTH,
        ] {
            parts.headers.remove(name);
        }
        Ok(Response::from_parts(parts, Full::new(body)))
    }
}

// ---------------------------------------------------------------------------------------
// The clients.

struct Fleet {
    uri: String,
    payments: u64,
    max_attempts: u32,
    seed: u64,
    /// Keeps the two runs' keys apart (each run has its own store anyway).
    namespace: &'static str,
}

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    answered: u64,
    refused: u64,
    abandoned: u64,
    attempts: u64,
    replays: u64,
    conflicts: u64,
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
    async fn run(self, clients: u32, progress: &ProgressBar) -> Result<Tally, DemoError> {
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

fn pooled_client() -> Client<HttpConnector, Full<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

// ---------------------------------------------------------------------------------------
// In-process servers.

/// An HTTP/1.1 server on `127.0.0.1:0`; dropping it stops it and its connections.
struct Server {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Server {
    async fn start<H, F, E>(handler: H) -> Result<Self, DemoError>
    where
        H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Result<Response<Full<Bytes>>, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(io_error("listen on 127.0.0.1"))?;
        let addr = listener
            .local_addr()
            .map_err(io_error("read a listener's address"))?;
        let task = tokio::spawn(async move {
            // Dropped with the task when the server stops: that aborts every connection.
            let mut connections = JoinSet::new();
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                while connections.try_join_next().is_some() {}
                let _ = stream.set_nodelay(true);
                let service = hyper::service::service_fn(handler.clone());
                connections.spawn(async move {
                    // Errors here are mostly the hop's lost answers: closed on purpose.
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self { addr, task })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The idem gateway on `127.0.0.1:0`, with a redb store in a temporary directory.
struct GatewayRun {
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    serving: JoinHandle<()>,
    /// Removed when the run ends, after the gateway (and its store) are gone.
    dir: tempfile::TempDir,
}

impl GatewayRun {
    async fn start(upstream: SocketAddr) -> Result<Self, DemoError> {
        let dir = tempfile::Builder::new()
            .prefix("idem-demo-")
            .tempdir()
            .map_err(io_error("create a temporary directory for the store"))?;
        let overrides = Overrides {
            listen: Some("127.0.0.1:0".to_owned()),
            upstream: Some(format!("http://{upstream}")),
            store: Some(format!("redb:{}", dir.path().join("idem.redb").display())),
            ..Overrides::default()
        };
        let config = GatewayConfig::resolve(FileConfig::default(), &overrides)?;
        let store = config.store.open().await?;
        let gateway = Gateway::new(&config, store)?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(io_error("listen on 127.0.0.1"))?;
        let addr = listener
            .local_addr()
            .map_err(io_error("read the gateway's address"))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(crate::gateway::serve_on(
            listener,
            gateway,
            async move {
                let _ = stopped.await;
            },
            Duration::from_secs(10),
        ));
        Ok(Self {
            addr,
            stop,
            serving,
            dir,
        })
    }

    /// Stops the gateway once detached work has stored its answers, then removes the store.
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.serving.await;
        // The store closed with the gateway (its writer thread joined); now the file can go.
        let dir = self.dir;
        let _ = tokio::task::spawn_blocking(move || drop(dir)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Randomness: small, seeded, good enough for a demo.

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A number in `[0, 1)` from 64 random bits.
fn unit(bits: u64) -> f64 {
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix64(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_rate_is_bounded() {
        assert!(parse_drop_rate("0").is_ok());
        assert!(parse_drop_rate("0.9").is_ok());
        assert!(parse_drop_rate("0.91").is_err());
        assert!(parse_drop_rate("-0.1").is_err());
        assert!(parse_drop_rate("NaN").is_err());
        assert!(parse_drop_rate("lots").is_err());
    }

    #[test]
    fn attempts_grow_with_the_drop_rate() {
        let at = |drop_rate| {
            DemoArgs {
                drop_rate,
                ..DemoArgs::default()
            }
            .attempts_per_payment()
        };
        assert_eq!(at(0.0), MIN_ATTEMPTS);
        assert_eq!(at(0.2), MIN_ATTEMPTS);
        assert!(at(0.9) > 100 && at(0.9) < AUTO_ATTEMPTS_CAP);
    }

    #[test]
    fn unit_is_in_range() {
        let mut rng = Rng::new(7);
        for _ in 0..10_000 {
            let x = unit(rng.next_u64());
            assert!((0.0..1.0).contains(&x));
        }
    }
}
