//! What `idem check` found: a table for a person, JSON for CI.

use comfy_table::{Cell, ContentArrangement, Table, presets};
use serde::Serialize;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// As the draft (or Stripe) expects.
    Pass,
    /// Not what the draft recommends, or not telling; no duplicate seen. A failure under
    /// `--strict`.
    Warn,
    /// Wrong: a duplicate execution, a refusal missing where it was expected, no answer.
    Fail,
    /// Could not be judged, or not expected here (e.g. keys are optional).
    Skip,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Warn => "WARN",
            Self::Fail => "FAIL",
            Self::Skip => "skip",
        }
    }
}

/// One check's result: what was expected and what the endpoint did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The stable name, e.g. `concurrent`.
    pub check: String,
    /// The name a person reads, e.g. `same key at once`.
    pub title: String,
    /// How it came out.
    pub verdict: Verdict,
    /// What the IETF draft and Stripe expect.
    pub expected: String,
    /// What the endpoint answered.
    pub saw: String,
}

/// Every finding for one endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The endpoint probed.
    pub url: String,
    /// The method of every probe.
    pub method: String,
    /// Whether warnings count as failures.
    pub strict: bool,
    /// One per check, in order.
    pub findings: Vec<Finding>,
}

impl Report {
    /// The findings that make the check fail: `Fail`, and `Warn` when strict.
    ///
    /// ```
    /// use idem_cli::check::{Finding, Report, Verdict};
    ///
    /// let finding = |verdict| Finding {
    ///     check: "replay".into(),
    ///     title: "same key twice".into(),
    ///     verdict,
    ///     expected: "the first answer again".into(),
    ///     saw: "201, then 201 with another body: it ran twice".into(),
    /// };
    /// let mut report = Report {
    ///     url: "http://127.0.0.1:3000/pay".into(),
    ///     method: "POST".into(),
    ///     strict: false,
    ///     findings: vec![finding(Verdict::Pass), finding(Verdict::Warn)],
    /// };
    /// assert!(report.passed());
    /// report.strict = true;
    /// assert_eq!(report.failures().len(), 1);
    /// ```
    pub fn failures(&self) -> Vec<&Finding> {
        self.findings
            .iter()
            .filter(|f| f.verdict == Verdict::Fail || (self.strict && f.verdict == Verdict::Warn))
            .collect()
    }

    /// Whether nothing failed.
    pub fn passed(&self) -> bool {
        self.failures().is_empty()
    }

    /// The table a person reads: one line per check.
    pub fn table(&self) -> Table {
        let mut table = Table::new();
        table
            .load_style(presets::UTF8_FULL_CONDENSED)
            // Without a terminal to measure, wrap to a width most terminals have.
            .set_content_arrangement(ContentArrangement::Dynamic)
            .set_width(120)
            .set_header(vec![
                "check",
                "result",
                "expected (IETF draft / Stripe)",
                "saw",
            ]);
        for finding in &self.findings {
            table.add_row(vec![
                Cell::new(&finding.title),
                Cell::new(finding.verdict.label()),
                Cell::new(&finding.expected),
                Cell::new(&finding.saw),
            ]);
        }
        table
    }

    /// The line under the table.
    pub fn summary(&self) -> String {
        let count = |verdict| {
            self.findings
                .iter()
                .filter(|f| f.verdict == verdict)
                .count()
        };
        let failures = self.failures();
        let verdict = if failures.is_empty() {
            "passed".to_owned()
        } else {
            let names: Vec<&str> = failures.iter().map(|f| f.title.as_str()).collect();
            format!("FAILED: {}", names.join(", "))
        };
        format!(
            "{} {}: {} passed, {} warnings, {} failed, {} skipped: {verdict}",
            self.method,
            self.url,
            count(Verdict::Pass),
            count(Verdict::Warn),
            count(Verdict::Fail),
            count(Verdict::Skip),
        )
    }

    /// The report as JSON (what `--json` prints), with `passed` beside the findings.
    ///
    /// ```
    /// use idem_cli::check::Report;
    ///
    /// let report = Report {
    ///     url: "http://127.0.0.1:3000/pay".into(),
    ///     method: "POST".into(),
    ///     strict: false,
    ///     findings: Vec::new(),
    /// };
    /// let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    /// assert_eq!(json["passed"], true);
    /// ```
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Json<'a> {
            #[serde(flatten)]
            report: &'a Report,
            passed: bool,
        }
        let json = Json {
            report: self,
            passed: self.passed(),
        };
        // Only strings, booleans and a list of plain structs: serialising cannot fail.
        serde_json::to_string_pretty(&json).unwrap_or_default()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}\n{}", self.table(), self.summary())
    }
}
