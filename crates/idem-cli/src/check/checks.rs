//! The checks: what each sends, and how its answers are judged.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use http::StatusCode;
use tokio::sync::Barrier;

use super::CheckError;
use super::args::{ConflictExpectation, Settings};
use super::probe::{Answer, KeyHeader, ProbeError, Prober, parse_http_date};
use super::report::{Finding, Verdict};

/// A check's verdict and what it saw, before its expectation is attached.
struct Judged {
    check: Check,
    verdict: Verdict,
    saw: String,
}

impl Judged {
    fn new(check: Check, verdict: Verdict, saw: String) -> Self {
        Self {
            check,
            verdict,
            saw,
        }
    }

    fn finding(self, settings: &Settings) -> Finding {
        Finding {
            check: self.check.id().to_owned(),
            title: self.check.title().to_owned(),
            verdict: self.verdict,
            expected: expected(self.check, settings),
            saw: self.saw,
        }
    }
}

/// Runs every check in turn; the first request doubles as the reachability probe.
pub(super) async fn run_all(
    prober: &Prober,
    settings: &Settings,
) -> Result<Vec<Finding>, CheckError> {
    let key = prober.fresh_key("replay");
    let first = match prober.send(KeyHeader::Key(&key), &settings.body).await {
        Ok(first) => first,
        Err(ProbeError::BodyTooLarge(limit)) => {
            return Err(CheckError::InvalidArgs {
                flag: "--max-body-bytes",
                message: format!("the endpoint's answer is over {limit} bytes"),
            });
        }
        Err(error) => {
            return Err(CheckError::Unreachable {
                url: settings.url.to_string(),
                reason: error.to_string(),
            });
        }
    };
    if !first.status.is_success() {
        return Ok(findings(not_carried_out(&first), settings));
    }
    let retry = prober.send(KeyHeader::Key(&key), &settings.body).await;
    let mut judged = vec![replay(&first, &retry)];
    let burst = concurrent(prober, settings).await;
    judged.push(burst.finding);
    judged.push(in_flight_retry_after(&burst.in_flight, settings));
    judged.push(mismatch(prober, settings).await);
    judged.push(missing_key(prober, settings).await);
    judged.push(malformed_key(prober, settings).await);
    judged.push(long_key(prober, settings).await);
    judged.push(expiry(&first, retry.as_ref().ok()));
    Ok(findings(judged, settings))
}

fn findings(judged: Vec<Judged>, settings: &Settings) -> Vec<Finding> {
    judged.into_iter().map(|j| j.finding(settings)).collect()
}

/// The endpoint refused the plain request: nothing else can be judged.
fn not_carried_out(first: &Answer) -> Vec<Judged> {
    let mut findings = vec![Judged::new(
        Check::Replay,
        Verdict::Fail,
        format!(
            "{}: the endpoint did not carry out the request (set --method, --header and \
             --body to a request it accepts, e.g. its credentials){}",
            first.status,
            body_hint(first)
        ),
    )];
    findings.extend(Check::ALL[1..].iter().map(|&check| {
        Judged::new(
            check,
            Verdict::Skip,
            "skipped: no request was carried out".into(),
        )
    }));
    findings
}

/// Why the endpoint answered as it did, in its own words: an RFC 9457 problem's `detail`
/// (or `title`), a Stripe-style `error.message`, else the start of the body.
fn body_hint(answer: &Answer) -> String {
    const SHOWN: usize = 100;
    let json = serde_json::from_slice::<serde_json::Value>(&answer.body).ok();
    let said = json.as_ref().and_then(|json| {
        [&json["detail"], &json["title"], &json["error"]["message"]]
            .into_iter()
            .find_map(|v| v.as_str().map(str::to_owned))
    });
    let text = said.unwrap_or_else(|| String::from_utf8_lossy(&answer.body).trim().to_owned());
    if text.is_empty() {
        return String::new();
    }
    let shown: String = text.chars().take(SHOWN).collect();
    let more = if shown.len() < text.len() { "…" } else { "" };
    format!("; it said: {shown}{more}")
}

/// Each check, in the report's order, with what the draft and Stripe expect of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Check {
    Replay,
    Concurrent,
    InFlightRetryAfter,
    Mismatch,
    MissingKey,
    MalformedKey,
    LongKey,
    Expiry,
}

impl Check {
    const ALL: [Self; 8] = [
        Self::Replay,
        Self::Concurrent,
        Self::InFlightRetryAfter,
        Self::Mismatch,
        Self::MissingKey,
        Self::MalformedKey,
        Self::LongKey,
        Self::Expiry,
    ];

    /// The stable name, for `--json`.
    pub(super) fn id(self) -> &'static str {
        match self {
            Self::Replay => "replay",
            Self::Concurrent => "concurrent",
            Self::InFlightRetryAfter => "in-flight-retry-after",
            Self::Mismatch => "mismatch",
            Self::MissingKey => "missing-key",
            Self::MalformedKey => "malformed-key",
            Self::LongKey => "long-key",
            Self::Expiry => "expiry",
        }
    }

    /// What a person reads in the table.
    pub(super) fn title(self) -> &'static str {
        match self {
            Self::Replay => "same key twice",
            Self::Concurrent => "same key at once",
            Self::InFlightRetryAfter => "in flight: Retry-After",
            Self::Mismatch => "same key, another body",
            Self::MissingKey => "no key",
            Self::MalformedKey => "malformed key",
            Self::LongKey => "256-character key",
            Self::Expiry => "expiry advertised",
        }
    }
}

/// What the draft and Stripe expect of `check`, under these settings.
fn expected(check: Check, settings: &Settings) -> String {
    match check {
        Check::Replay => "the first answer again, not a second execution (IETF draft); \
                          Stripe also marks it Idempotent-Replayed: true"
            .into(),
        Check::Concurrent => match settings.on_conflict {
            ConflictExpectation::Wait => "one execution; every duplicate waits and gets its \
                                          replay (--on-conflict wait)"
                .into(),
            _ => "one execution; a duplicate of the running request gets 409 (IETF draft, \
                  Stripe), or its replay once it is done"
                .into(),
        },
        Check::InFlightRetryAfter => "the 409 says when to retry with Retry-After (RFC 9110); \
                                      the draft and Stripe ask only for the 409"
            .into(),
        Check::Mismatch => "422 (IETF draft); Stripe refuses it with an idempotency_error; \
                            never the first answer, never a second execution"
            .into(),
        Check::MissingKey if settings.require_key => {
            "400 where a key is required (IETF draft; --require-key)".into()
        }
        Check::MissingKey => "400 if the endpoint requires a key (IETF draft); Stripe runs \
                              requests without one"
            .into(),
        Check::MalformedKey => "400: the draft's key is an sf-string, this one lacks its \
                                closing quote"
            .into(),
        Check::LongKey => "400: Stripe's keys are at most 255 characters (the draft sets no \
                           limit)"
            .into(),
        Check::Expiry => "when the key will be forgotten: the draft asks for a published \
                          expiry policy, Stripe keeps keys 24 h; idem sends \
                          Idempotency-Key-Expires"
            .into(),
    }
}

fn replay(first: &Answer, retry: &Result<Answer, ProbeError>) -> Judged {
    let retry = match retry {
        Ok(retry) => retry,
        Err(error) => {
            return Judged::new(
                Check::Replay,
                Verdict::Fail,
                format!("{}, then the retry: {error}", first.describe()),
            );
        }
    };
    let (verdict, saw) = if retry.same_as(first) && retry.is_replay() {
        (
            Verdict::Pass,
            format!(
                "{}, then the same answer, marked replayed",
                first.describe()
            ),
        )
    } else if retry.same_as(first) {
        (
            Verdict::Warn,
            format!(
                "{}, then the same answer, not marked replayed: a replay cannot be told \
                 from a second execution",
                first.describe()
            ),
        )
    } else if retry.status == StatusCode::CONFLICT {
        (
            Verdict::Fail,
            format!(
                "{}, then 409 although the first was done: its answer was not kept",
                first.describe()
            ),
        )
    } else {
        (
            Verdict::Fail,
            format!(
                "{}, then {} with {}: it ran twice",
                first.describe(),
                retry.describe(),
                difference(first, retry)
            ),
        )
    };
    Judged::new(Check::Replay, verdict, saw)
}

/// How `b` differs from `a`, in words.
fn difference(a: &Answer, b: &Answer) -> &'static str {
    if a.status != b.status {
        "another status"
    } else {
        "another body"
    }
}

/// What the burst of concurrent requests found, and its `409`s for the Retry-After check.
struct Burst {
    finding: Judged,
    in_flight: Vec<Answer>,
}

/// Answers that say "not now" rather than report an execution.
fn deferred(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::CONFLICT | StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
    )
}

async fn concurrent(prober: &Prober, settings: &Settings) -> Burst {
    let key = prober.fresh_key("concurrent");
    let n = settings.concurrency;
    // Every request is ready before any is sent, so they reach the server together.
    let start = Arc::new(Barrier::new(n));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (prober, key, start, body) = (
            prober.clone(),
            key.clone(),
            Arc::clone(&start),
            settings.body.clone(),
        );
        tasks.spawn(async move {
            start.wait().await;
            prober.send(KeyHeader::Key(&key), &body).await
        });
    }
    let mut answers = Vec::with_capacity(n);
    let mut errors = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(answer)) => answers.push(answer),
            Ok(Err(error)) => errors.push(error.to_string()),
            Err(error) => errors.push(format!("the probe task failed: {error}")),
        }
    }
    let after = prober.send(KeyHeader::Key(&key), &settings.body).await;

    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for answer in &answers {
        *tally.entry(answer.describe()).or_default() += 1;
    }
    let mut saw = format!(
        "{n} at once: {}",
        tally
            .iter()
            .map(|(what, count)| format!("{count}× {what}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !errors.is_empty() {
        saw.push_str(&format!("; {} got no answer ({})", errors.len(), errors[0]));
    }
    let (in_flight, carried_out): (Vec<Answer>, Vec<Answer>) = answers
        .into_iter()
        .partition(|answer| deferred(answer.status));
    let mut distinct: Vec<&Answer> = Vec::new();
    for answer in &carried_out {
        if !distinct.iter().any(|seen| seen.same_as(answer)) {
            distinct.push(answer);
        }
    }
    let unmarked = carried_out.iter().filter(|a| !a.is_replay()).count();
    let conflicts = in_flight
        .iter()
        .filter(|a| a.status == StatusCode::CONFLICT)
        .count();

    let mut verdict = Verdict::Pass;
    let mut problems = Vec::new();
    match distinct.len() {
        0 => {
            verdict = Verdict::Fail;
            problems.push("none was carried out".to_owned());
        }
        1 if unmarked > 1 => {
            verdict = Verdict::Warn;
            problems.push(format!(
                "the answers agree, but {unmarked} are not marked replayed: replays cannot be \
                 told from executions"
            ));
        }
        1 => problems.push("one answer".to_owned()),
        executions => {
            verdict = Verdict::Fail;
            problems.push(format!(
                "{executions} different answers to one key: it ran {executions} times"
            ));
        }
    }
    if !errors.is_empty() {
        verdict = Verdict::Fail;
    }
    if settings.on_conflict == ConflictExpectation::Wait && conflicts > 0 {
        verdict = Verdict::Fail;
        problems.push(format!("{conflicts} got 409 instead of waiting"));
    }
    match (&after, distinct.first()) {
        (Ok(after), Some(answer)) if after.same_as(answer) => {
            problems.push("a retry afterwards got the same answer".to_owned());
        }
        (Ok(after), Some(_)) => {
            verdict = Verdict::Fail;
            problems.push(format!(
                "a retry afterwards got {} with {}: it ran again",
                after.describe(),
                difference(distinct[0], after)
            ));
        }
        (Ok(_), None) => {}
        (Err(error), _) => {
            verdict = Verdict::Fail;
            problems.push(format!("a retry afterwards: {error}"));
        }
    }
    saw.push_str("; ");
    saw.push_str(&problems.join("; "));
    Burst {
        finding: Judged::new(Check::Concurrent, verdict, saw),
        in_flight: in_flight
            .into_iter()
            .filter(|a| a.status == StatusCode::CONFLICT)
            .collect(),
    }
}

fn in_flight_retry_after(conflicts: &[Answer], settings: &Settings) -> Judged {
    let check = Check::InFlightRetryAfter;
    if conflicts.is_empty() {
        const NONE: &str = "no 409 seen: each duplicate came after the first was done or \
                            waited for it (a slower request, or more --concurrency, shows one)";
        let (verdict, why) = match settings.on_conflict {
            ConflictExpectation::Wait => (Verdict::Skip, "no 409, as --on-conflict wait expects"),
            // Told to expect 409s, a check that saw none has confirmed nothing.
            ConflictExpectation::Reject => (Verdict::Warn, NONE),
            ConflictExpectation::Either => (Verdict::Skip, NONE),
        };
        return Judged::new(check, verdict, why.into());
    }
    let with: Vec<&str> = conflicts.iter().filter_map(Answer::retry_after).collect();
    if with.len() == conflicts.len() {
        Judged::new(
            check,
            Verdict::Pass,
            format!(
                "{} of {} 409s carried Retry-After (e.g. {})",
                with.len(),
                conflicts.len(),
                with[0]
            ),
        )
    } else {
        Judged::new(
            check,
            Verdict::Warn,
            format!(
                "{} of {} 409s had no valid Retry-After: a client cannot tell when to retry",
                conflicts.len() - with.len(),
                conflicts.len()
            ),
        )
    }
}

async fn mismatch(prober: &Prober, settings: &Settings) -> Judged {
    let check = Check::Mismatch;
    let key = prober.fresh_key("mismatch");
    let first = match prober.send(KeyHeader::Key(&key), &settings.body).await {
        Ok(first) if first.status.is_success() => first,
        Ok(first) => {
            return Judged::new(
                check,
                Verdict::Fail,
                format!(
                    "the first request got {}, not carried out",
                    first.describe()
                ),
            );
        }
        Err(error) => {
            return Judged::new(check, Verdict::Fail, format!("the first request: {error}"));
        }
    };
    let other = match prober
        .send(KeyHeader::Key(&key), &settings.other_body)
        .await
    {
        Ok(other) => other,
        Err(error) => {
            return Judged::new(
                check,
                Verdict::Fail,
                format!("{}, then another body: {error}", first.describe()),
            );
        }
    };
    let then = format!(
        "{}, then {} for another body",
        first.describe(),
        other.describe()
    );
    let (verdict, saw) = if other.status == StatusCode::UNPROCESSABLE_ENTITY {
        (Verdict::Pass, then)
    } else if other.same_as(&first) || other.is_replay() {
        (
            Verdict::Fail,
            format!(
                "{then}, the first request's answer: a key reused by mistake is told its \
                 new request succeeded"
            ),
        )
    } else if other.status.is_client_error() {
        (
            Verdict::Warn,
            format!("{then}: refused, but not with the draft's 422"),
        )
    } else if other.status.is_success() {
        (
            Verdict::Fail,
            format!("{then}: it ran another request under the same key"),
        )
    } else {
        (Verdict::Fail, format!("{then}, not a refusal"))
    };
    Judged::new(check, verdict, saw)
}

async fn missing_key(prober: &Prober, settings: &Settings) -> Judged {
    let check = Check::MissingKey;
    let answer = match prober.send(KeyHeader::Absent, &settings.body).await {
        Ok(answer) => answer,
        Err(error) => return Judged::new(check, Verdict::Fail, error.to_string()),
    };
    let status = answer.describe();
    let (verdict, saw) = match (answer.status, settings.require_key) {
        (StatusCode::BAD_REQUEST, _) => (Verdict::Pass, format!("{status}: a key is required")),
        (s, true) if s.is_success() => (
            Verdict::Fail,
            format!("{status}: it ran without a key although one is required"),
        ),
        (s, true) if s.is_client_error() => (
            Verdict::Warn,
            format!("{status}: refused, but not with the draft's 400"),
        ),
        (_, true) => (Verdict::Fail, format!("{status}, not 400")),
        (_, false) => (
            Verdict::Skip,
            format!("{status}: keys are optional here (--require-key expects 400)"),
        ),
    };
    Judged::new(check, verdict, saw)
}

async fn malformed_key(prober: &Prober, settings: &Settings) -> Judged {
    let raw = format!("\"{}", prober.fresh_key("malformed"));
    bad_key(prober, settings, Check::MalformedKey, &raw, Verdict::Fail).await
}

async fn long_key(prober: &Prober, settings: &Settings) -> Judged {
    let mut key = prober.fresh_key("long");
    while key.len() < 256 {
        key.push('k');
    }
    key.truncate(256);
    // Bare, whatever --key-form says: the limit is Stripe's, and Stripe's keys are bare.
    bad_key(prober, settings, Check::LongKey, &key, Verdict::Warn).await
}

/// A key the endpoint should refuse with 400; `accepted` is the verdict when it runs it.
async fn bad_key(
    prober: &Prober,
    settings: &Settings,
    check: Check,
    raw: &str,
    accepted: Verdict,
) -> Judged {
    let answer = match prober.send(KeyHeader::Raw(raw), &settings.body).await {
        Ok(answer) => answer,
        Err(error) => return Judged::new(check, Verdict::Fail, error.to_string()),
    };
    let status = answer.describe();
    let (verdict, saw) = if answer.status == StatusCode::BAD_REQUEST {
        (Verdict::Pass, status)
    } else if answer.status.is_success() {
        (accepted, format!("{status}: accepted, and it ran"))
    } else if answer.status.is_client_error() {
        (
            Verdict::Warn,
            format!("{status}: refused, but not with 400"),
        )
    } else {
        (Verdict::Fail, format!("{status}, not 400"))
    };
    Judged::new(check, verdict, saw)
}

fn expiry(first: &Answer, retry: Option<&Answer>) -> Judged {
    let check = Check::Expiry;
    let header = idem_http::IDEMPOTENCY_KEY_EXPIRES;
    let Some(value) = std::iter::once(first)
        .chain(retry)
        .find_map(|answer| answer.headers.get(&header))
    else {
        return Judged::new(
            check,
            Verdict::Warn,
            "no Idempotency-Key-Expires: a client cannot tell how long a retry is safe".into(),
        );
    };
    let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
    match parse_http_date(&text) {
        None => Judged::new(
            check,
            Verdict::Warn,
            format!("Idempotency-Key-Expires: {text:?} is not an HTTP date"),
        ),
        Some(at) => match at.duration_since(SystemTime::now()) {
            Ok(left) => Judged::new(
                check,
                Verdict::Pass,
                format!(
                    "Idempotency-Key-Expires: {text} (in {})",
                    humantime_serde::re::humantime::format_duration(
                        std::time::Duration::from_secs(left.as_secs())
                    )
                ),
            ),
            Err(_) => Judged::new(
                check,
                Verdict::Fail,
                format!("Idempotency-Key-Expires: {text}, already past for a key just used"),
            ),
        },
    }
}
