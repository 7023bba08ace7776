//! `idem check URL`: probes an endpoint and reports how idempotent it is.
//!
//! It sends real requests, each with keys of its own, and judges the answers against the
//! IETF draft *The Idempotency-Key HTTP Header Field*
//! (draft-ietf-httpapi-idempotency-key-header) and Stripe's behaviour:
//!
//! | check | sends | expects |
//! |---|---|---|
//! | `replay` | one request, then the same again with the same key | the first answer again, marked `Idempotent-Replayed: true` |
//! | `concurrent` | `--concurrency` copies at once with one key, then one more | one execution: the answers agree, the rest are `409` or replays |
//! | `in-flight-retry-after` | (the `409`s of `concurrent`) | each carries `Retry-After` |
//! | `mismatch` | a request, then another body with its key | `422` |
//! | `missing-key` | a request without a key | `400` where keys are required |
//! | `malformed-key` | a key that is not an sf-string | `400` |
//! | `long-key` | a 256-character key | `400` (Stripe's limit is 255) |
//! | `expiry` | (the answers of `replay`) | `Idempotency-Key-Expires`, an HTTP date to come |
//!
//! An endpoint that executes a request twice but answers both times byte for byte the
//! same cannot be told apart from one that replays: the report judges answers, not the
//! service's records. Every request is real: point it at a test environment.
//!
//! ```no_run
//! use idem_cli::check::{CheckArgs, run};
//!
//! # #[tokio::main] async fn main() -> Result<(), idem_cli::check::CheckError> {
//! let args = CheckArgs::for_url("http://127.0.0.1:8080/payments");
//! let report = run(&args).await?;
//! println!("{}", report.table());
//! assert!(report.passed(), "{:?}", report.failures());
//! # Ok(()) }
//! ```

use std::time::Duration;

mod args;
mod checks;
mod probe;
mod report;

pub use args::{CheckArgs, ConflictExpectation, KeyForm};
pub use report::{Finding, Report, Verdict};

/// Why the check could not run (bad usage, or the target never answered). A check that ran
/// and found problems is a [`Report`] with failures, not an error.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// A setting is malformed or out of range.
    #[error("{flag}: {message}")]
    InvalidArgs {
        /// The flag, e.g. `--timeout`.
        flag: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The first request got no answer: nothing could be judged.
    #[error("cannot reach {url}: {reason}")]
    Unreachable {
        /// The target.
        url: String,
        /// What went wrong (connect error, timeout).
        reason: String,
    },
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// The longest `--timeout` accepted.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);
/// The largest `--max-body-bytes` accepted.
pub const MAX_BODY_LIMIT: usize = 64 << 20;

/// Probes `args.url` and judges every answer.
///
/// Returns an error only when the arguments are bad or the first request gets no answer
/// (exit status 2 in the command); everything else is a finding in the [`Report`].
pub async fn run(args: &CheckArgs) -> Result<Report, CheckError> {
    let settings = args.settings()?;
    let prober = probe::Prober::new(&settings)?;
    let findings = checks::run_all(&prober, &settings).await?;
    Ok(Report {
        url: settings.url.to_string(),
        method: settings.method.to_string(),
        strict: settings.strict,
        findings,
    })
}

/// `idem check` as the command runs it: the report on stdout (a table, or JSON with
/// `--json`), and the exit status: 0 when nothing failed, 1 when a check failed, 2 for
/// bad usage or a target that never answered (with the reason on stderr).
pub fn main(args: &CheckArgs) -> std::process::ExitCode {
    use std::io::Write;
    use std::process::ExitCode;

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::from(2);
        }
    };
    let report = match runtime.block_on(run(args)) {
        Ok(report) => report,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    let text = if args.json {
        report.to_json()
    } else {
        report.to_string()
    };
    // A closed stdout (`| head`) loses the text, not the verdict: the status still tells.
    let _ = writeln!(std::io::stdout().lock(), "{text}");
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
