//! `idem check URL`: passes every check against `idem serve`, fails and names what is wrong
//! against a service with no idempotency, and exits 2 when it cannot judge at all.

mod common;
mod tls_support;

use std::process::ExitStatus;

use common::{PATIENCE, TestGateway, Upstream, run_idem};
use idem_cli::check::{CheckArgs, ConflictExpectation, Verdict, run};
use tls_support::{Pki, https_front};

/// Holds each first request long enough for its duplicates to find it in flight.
const SLOW: &str = "x-sleep-ms: 300";

/// `idem check ARGS` run as a process, off the runtime that serves the target.
async fn idem_check(args: Vec<String>) -> (ExitStatus, String, String) {
    tokio::task::spawn_blocking(move || {
        let mut all = vec!["check".to_owned()];
        all.extend(args);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        run_idem(&all)
    })
    .await
    .unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|&a| a.to_owned()).collect()
}

fn finding<'a>(report: &'a serde_json::Value, check: &str) -> &'a serde_json::Value {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == check)
        .unwrap_or_else(|| panic!("no finding {check} in {report:#}"))
}

fn verdict_of(report: &serde_json::Value, check: &str) -> String {
    finding(report, check)["verdict"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn saw_of(report: &serde_json::Value, check: &str) -> String {
    finding(report, check)["saw"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_check_passes_against_idem_serve_and_the_service_runs_each_key_once() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, "[policy]\nkey_required = true\n").await;
    let mut args = CheckArgs::for_url(&gateway.url("/payments"));
    args.headers = vec![SLOW.to_owned()];
    args.require_key = true;
    args.on_conflict = ConflictExpectation::Reject;
    args.strict = true;

    let report = tokio::time::timeout(PATIENCE * 2, run(&args))
        .await
        .expect("idem check did not finish")
        .unwrap();

    for finding in &report.findings {
        assert_eq!(finding.verdict, Verdict::Pass, "{finding:#?}\n{report}");
    }
    assert!(report.passed(), "{report}");
    // What the report inferred from answers, the upstream's own count confirms: one
    // execution for each of the three keys that were carried out (replay, concurrent,
    // mismatch's first), nothing for the refused ones.
    assert_eq!(upstream.total(), 3, "{:#?}", upstream.seen());
    let concurrent = report
        .findings
        .iter()
        .find(|f| f.check == "concurrent")
        .unwrap();
    assert!(concurrent.saw.contains("× 409"), "{concurrent:#?}");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_exits_zero_against_idem_serve_and_prints_json_for_ci() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, "[policy]\nkey_required = true\n").await;
    let url = gateway.url("/payments");

    let (status, stdout, stderr) = idem_check(args(&[
        &url,
        "--require-key",
        "--strict",
        "-H",
        SLOW,
        "--json",
    ]))
    .await;

    assert_eq!(status.code(), Some(0), "{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["passed"], true, "{report:#}");
    assert_eq!(report["url"], url);
    assert_eq!(
        report["findings"].as_array().unwrap().len(),
        8,
        "{report:#}"
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_a_service_without_idempotency_it_reports_the_duplicates_and_fails() {
    let upstream = Upstream::start().await;
    let url = upstream.url_for("/payments");

    let (status, stdout, stderr) = idem_check(args(&[&url, "-H", SLOW])).await;

    assert_eq!(status.code(), Some(1), "{stdout}\n{stderr}");
    // The table shows each check's result; the line under it names what failed.
    assert!(
        stdout.contains("│ same key twice         ┆ FAIL"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "0 passed, 2 warnings, 4 failed, 2 skipped: FAILED: same key twice, same key at \
             once, same key, another body, malformed key"
        ),
        "{stdout}"
    );
    // The service's own count shows the duplicates the report inferred: the replay's key ran
    // twice, the burst's once per request.
    assert!(upstream.total() >= 2 + 8 + 1 + 2, "{}", upstream.total());

    let (status, stdout, _) = idem_check(args(&[&url, "-H", SLOW, "--json"])).await;
    assert_eq!(status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["passed"], false);
    // Each failure says what is wrong, in words a person acts on.
    for (check, saw) in [
        ("replay", "201, then 201 with another body: it ran twice"),
        (
            "concurrent",
            "8 different answers to one key: it ran 8 times",
        ),
        (
            "mismatch",
            "201, then 201 for another body: it ran another request under the same key",
        ),
        ("malformed-key", "201: accepted, and it ran"),
    ] {
        assert_eq!(verdict_of(&report, check), "fail", "{check}: {report:#}");
        assert!(saw_of(&report, check).contains(saw), "{check}: {report:#}");
    }
    for check in ["long-key", "expiry"] {
        assert_eq!(verdict_of(&report, check), "warn", "{check}: {report:#}");
    }
    // Keys are optional there, and no 409 was ever sent: neither can be judged.
    for check in ["missing-key", "in-flight-retry-after"] {
        assert_eq!(verdict_of(&report, check), "skip", "{check}: {report:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_key_fails_a_service_that_runs_requests_without_one() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, "").await;
    let mut args = CheckArgs::for_url(&gateway.url("/payments"));
    args.require_key = true;

    let report = run(&args).await.unwrap();

    let missing = report
        .findings
        .iter()
        .find(|f| f.check == "missing-key")
        .unwrap();
    assert_eq!(missing.verdict, Verdict::Fail, "{report}");
    assert!(missing.saw.contains("it ran without a key"), "{missing:#?}");
    assert_eq!(report.failures().len(), 1, "{report}");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_mode_passes_when_expected_and_fails_when_409_is_not() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::around(&upstream, "[policy]\non_conflict = \"wait\"\n").await;
    let mut args = CheckArgs::for_url(&gateway.url("/payments"));
    args.headers = vec![SLOW.to_owned()];
    args.on_conflict = ConflictExpectation::Wait;

    let report = run(&args).await.unwrap();
    assert!(report.passed(), "{report}");
    let concurrent = &report.findings[1];
    assert_eq!(concurrent.verdict, Verdict::Pass, "{report}");
    assert!(concurrent.saw.contains("(replayed)"), "{concurrent:#?}");
    gateway.stop().await;

    // A rejecting gateway answers 409, which a client expecting waits does not handle.
    let gateway = TestGateway::around(&upstream, "").await;
    args.url = gateway.url("/payments");
    let report = run(&args).await.unwrap();
    let concurrent = &report.findings[1];
    assert_eq!(concurrent.verdict, Verdict::Fail, "{report}");
    assert!(
        concurrent.saw.contains("got 409 instead of waiting"),
        "{concurrent:#?}"
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_is_one_clear_failure_not_a_list_of_false_alarms() {
    let upstream = Upstream::start().await;
    let (status, stdout, stderr) = idem_check(args(&[
        &upstream.url_for("/payments"),
        "-H",
        "x-status: 401",
        "--json",
    ]))
    .await;

    assert_eq!(status.code(), Some(1), "{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(verdict_of(&report, "replay"), "fail");
    assert!(
        saw_of(&report, "replay")
            .starts_with("401 Unauthorized: the endpoint did not carry out the request"),
        "{report:#}"
    );
    for check in ["concurrent", "mismatch", "missing-key", "expiry"] {
        assert_eq!(verdict_of(&report, check), "skip", "{check}: {report:#}");
    }
    assert_eq!(upstream.total(), 1, "nothing is sent after the refusal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_or_silent_target_and_bad_flags_exit_2_with_a_reason() {
    // Nothing listens on a port just freed.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let (status, stdout, stderr) = idem_check(args(&[&format!("http://{closed}/pay")])).await;
    assert_eq!(status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!("error: cannot reach http://{closed}/pay")),
        "{stderr}"
    );
    assert!(stdout.is_empty(), "{stdout}");

    // A server that takes the connection and never answers: the probe's deadline ends it.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let (status, _, stderr) = idem_check(args(&[
        &format!("http://{silent_addr}/pay"),
        "--timeout",
        "300ms",
    ]))
    .await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no answer within 300ms"), "{stderr}");
    held.abort();

    for (flags, expected) in [
        (
            vec!["http://127.0.0.1:1/", "--timeout", "0s"],
            "error: --timeout: must be more than zero",
        ),
        (
            vec!["http://127.0.0.1:1/", "-X", "GET"],
            "error: --method: GET is safe",
        ),
        (vec!["ftp://127.0.0.1:1/"], "error: URL: scheme \"ftp\""),
        (
            vec!["http://127.0.0.1:1/", "-H", "broken"],
            "error: --header: \"broken\" is not",
        ),
        (
            vec!["http://127.0.0.1:1/", "--concurrency", "1"],
            "--concurrency",
        ),
        (
            vec!["http://127.0.0.1:1/", "--no-such-flag"],
            "--no-such-flag",
        ),
    ] {
        let (status, _, stderr) = idem_check(args(&flags)).await;
        assert_eq!(status.code(), Some(2), "{flags:?}: {stderr}");
        assert!(stderr.contains(expected), "{flags:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_endpoint_is_probed_when_its_authority_is_trusted_and_refused_when_not() {
    let pki = Pki::new("idem check test CA");
    let upstream = Upstream::unbound();
    let addr = https_front(&upstream, pki.server_config(&pki.server("api"), false)).await;
    let url = format!("https://{addr}/payments");
    let ca_file = pki.ca_file.display().to_string();

    let (status, stdout, stderr) = idem_check(args(&[&url, "--ca-file", &ca_file, "--json"])).await;
    // Reached over TLS and judged: the plain upstream ran the retry again.
    assert_eq!(status.code(), Some(1), "{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(verdict_of(&report, "replay"), "fail", "{report:#}");
    assert!(upstream.total() >= 2);

    // Another authority's certificate is not trusted: nothing can be judged, and nothing ran.
    let before = upstream.total();
    let other = Pki::new("another CA");
    let other_ca = other.ca_file.display().to_string();
    let (status, _, stderr) = idem_check(args(&[&url, "--ca-file", &other_ca])).await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("error: cannot reach {url}")),
        "{stderr}"
    );
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
    assert_eq!(upstream.total(), before);

    let missing = pki.dir().join("missing.pem").display().to_string();
    let (status, _, stderr) = idem_check(args(&[&url, "--ca-file", &missing])).await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("error: --ca-file: cannot read"), "{stderr}");
}
