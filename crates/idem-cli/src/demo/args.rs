//! `idem demo`'s flags, and how many attempts a client makes.

use super::DemoError;

/// The highest `--drop-rate` accepted: beyond it almost nothing gets through.
pub const MAX_DROP_RATE: f64 = 0.9;

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
}
