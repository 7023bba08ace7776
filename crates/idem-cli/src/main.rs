//! The `idem` command.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use idem_cli::config::{GatewayConfig, Overrides};
use idem_http::OnConflict;

// mimalloc: the gateway allocates and frees a few small buffers per request from several
// threads; glibc malloc spent about a tenth of its CPU there. Built without transparent
// huge pages (the `no_thp` feature): with them, each thread's partly used 2 MiB regions
// counted whole, and the fjall store's RSS was ~95 MiB after 10 s of new keys instead of
// ~57 (48 MiB of it AnonHugePages).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// idem makes retried operations take effect exactly once.
///
/// A retried request with the same Idempotency-Key gets the first answer back instead of
/// running again.
#[derive(Debug, Parser)]
#[command(name = "idem", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway: a reverse proxy that makes an upstream's POST/PATCH idempotent.
    Serve(ServeArgs),
    /// Watch retries charge customers twice, then watch idem stop it (nothing to set up).
    ///
    /// Runs a payments service, the idem gateway (redb in a temporary directory) and a fleet
    /// of clients in this process, over a network hop that loses a share of the answers
    /// after the charge is made. Clients retry with the same Idempotency-Key. Exits non-zero
    /// if, with idem, any payment was charged twice or got no answer.
    Demo(idem_cli::demo::DemoArgs),
    /// Probe an endpoint and report how idempotent it is (exit 1 on failures, 2 on bad usage).
    Check(idem_cli::check::CheckArgs),
    /// Look up or delete a key's record, or list stuck keys, directly in a store.
    Keys(idem_cli::keys::KeysArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:8080]
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Address of the admin listener (/metrics, /healthz, /readyz), or `off`
    /// [default: 127.0.0.1:9090]
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<String>,
    /// Log lines as human-readable text or as one JSON object each
    #[arg(long, value_enum, value_name = "FORMAT", default_value = "text")]
    log_format: LogFormat,
    /// The service to protect, e.g. http://127.0.0.1:3000 (required here or in --config)
    #[arg(long, value_name = "URL")]
    upstream: Option<String>,
    /// Where records live: fjall:DIR (durable, the default: fjall:idem.fjall), redb:PATH, memory:, redis://…, postgres://…
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// Answer 400 to POST/PATCH requests without an Idempotency-Key
    #[arg(long)]
    require_key: bool,
    /// What a duplicate of a running request gets: reject (409) or wait (then the replay)
    #[arg(long, value_enum, value_name = "MODE")]
    on_conflict: Option<OnConflictArg>,
    /// TOML file with defaults and per-route policies (see the README)
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate the configuration, print what the gateway would do, and exit
    #[arg(long)]
    check: bool,
    /// File holding the secret that keys scope digests (at least 16 bytes; a final newline
    /// is dropped). Instead of the IDEM_SCOPE_SECRET environment variable.
    #[arg(long, value_name = "PATH")]
    scope_secret_file: Option<PathBuf>,
    /// File holding the bearer token of the admin /keys routes (at least 16 bytes).
    /// Instead of the IDEM_ADMIN_TOKEN environment variable.
    #[arg(long, value_name = "PATH")]
    admin_token_file: Option<PathBuf>,
}

/// `--log-format`'s values.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// `--on-conflict`'s values: [`OnConflict`]'s, which cannot derive clap's trait from here.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum OnConflictArg {
    Reject,
    Wait,
}

impl From<OnConflictArg> for OnConflict {
    fn from(mode: OnConflictArg) -> Self {
        match mode {
            OnConflictArg::Reject => Self::Reject,
            OnConflictArg::Wait => Self::Wait,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Demo(args) => demo(&args),
        Command::Check(args) => idem_cli::check::main(&args),
        Command::Keys(args) => idem_cli::keys::main(&args),
    }
}

fn demo(args: &idem_cli::demo::DemoArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(idem_cli::demo::run(args)) {
        Ok(report) => {
            println!("{report}");
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                for problem in report.problems() {
                    eprintln!("error: {problem}");
                }
                ExitCode::FAILURE
            }
        }
        Err(error @ idem_cli::demo::DemoError::InvalidArgs { .. }) => {
            eprintln!("error: {error}");
            ExitCode::from(2)
        }
        Err(error) => {
            eprintln!("error: {}", idem_cli::error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let overrides = Overrides {
        listen: args.listen,
        admin_listen: args.admin_listen,
        upstream: args.upstream,
        store: args.store,
        require_key: args.require_key,
        on_conflict: args.on_conflict.map(OnConflict::from),
        scope_secret: std::env::var_os(idem_cli::config::SCOPE_SECRET_ENV).map(os_bytes),
        scope_secret_file: args.scope_secret_file,
        admin_token: std::env::var_os(idem_cli::keys::ADMIN_TOKEN_ENV).map(os_bytes),
        admin_token_file: args.admin_token_file,
    };
    let config = match GatewayConfig::load(args.config.as_deref(), &overrides) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: invalid configuration: {error}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!("configuration is valid\n\n{}", config.describe());
        return ExitCode::SUCCESS;
    }
    init_tracing(args.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(idem_cli::gateway::serve(
        config,
        idem_cli::gateway::shutdown_signal(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        // Includes a store that stopped serving while the gateway ran: exit non-zero so that
        // a supervisor restarts it, rather than limp on answering 503.
        Err(error) => {
            eprintln!("error: {}", idem_cli::error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

/// An environment value's bytes, as they are (a secret need not be UTF-8).
fn os_bytes(value: std::ffi::OsString) -> Vec<u8> {
    #[cfg(unix)]
    {
        std::os::unix::ffi::OsStringExt::into_vec(value)
    }
    #[cfg(not(unix))]
    {
        value.to_string_lossy().into_owned().into_bytes()
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal (and never with NO_COLOR set, https://no-color.org): in a
    // file or a log pipeline the escape codes are noise, and writing them cost as much as
    // the rest of a request's log line.
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text if colour => logs.init(),
        LogFormat::Text => logs.fmt_fields(plain_fields()).init(),
        // Flattened, so a log pipeline finds `outcome`, `key`, … at the top of each object.
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
}

/// Fields as `name=value` without styling: the default formatter wraps every field name in
/// an (empty, when colours are off) ANSI style, which cost a third of each request line.
fn plain_fields() -> impl for<'writer> tracing_subscriber::fmt::FormatFields<'writer> {
    // The message comes first (tracing records it first); every other field brings its
    // own separator, so a field left out leaves no gap.
    tracing_subscriber::fmt::format::debug_fn(|writer, field, value| match field.name() {
        "message" => write!(writer, "{value:?}"),
        // What tracing-log attaches to a `log` record (fjall logs through `log`): the
        // default formatter leaves these out too.
        name if name.starts_with("log.") => Ok(()),
        name => write!(writer, " {name}={value:?}"),
    })
}
