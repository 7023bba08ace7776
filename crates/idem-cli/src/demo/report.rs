//! What the demo prints: both runs side by side, and whether idem held.

use std::time::Duration;

use comfy_table::{CellAlignment, Table, presets};

use super::DemoArgs;

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
