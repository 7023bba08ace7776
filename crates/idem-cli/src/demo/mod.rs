//! `idem demo`: the retry storm, with and without idem. Nothing to set up.
//!
//! Everything runs in this process, on `127.0.0.1` with ports the OS picks:
//!
//! ```text
//!   without idem:  clients ──▶ lossy hop ──▶ payments upstream
//!   with idem:     clients ──▶ lossy hop ──▶ idem gateway (fjall in a temp dir) ──▶ payments upstream
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
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::config::ConfigError;
use crate::gateway::ServeError;
use crate::store_url::StoreUrlError;

mod args;
mod fleet;
mod lossy_hop;
mod payments;
mod report;
mod rng;
mod servers;

pub use args::{DemoArgs, MAX_DROP_RATE};
pub use report::{DemoReport, ScenarioReport};

use fleet::Fleet;
use lossy_hop::LossyHop;
use payments::Ledger;
use servers::{GatewayRun, Server};

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

    // With idem, the gateway sits between the hop and the upstream, on a fresh fjall store.
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
