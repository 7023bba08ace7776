//! The `idem` command.

use clap::Parser;

/// idem makes retried operations take effect exactly once.
///
/// A retried request with the same Idempotency-Key gets the first answer back instead of
/// running again. Subcommands (serve, demo, check, keys) arrive with the HTTP layer.
#[derive(Debug, Parser)]
#[command(name = "idem", version, about, long_about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
