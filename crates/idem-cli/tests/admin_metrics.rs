//! The admin listener, over real sockets: `/metrics` moves as requests flow, `/readyz`
//! follows the store, and each keyed request leaves one log line without its raw key.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use common::*;
use http::Request;
use idem_cli::admin::{Admin, router, serve};
use idem_cli::config::Overrides;
use idem_testkit::eventually_within;
use tokio::net::TcpListener;

/// The admin routes of `gateway` on 127.0.0.1:0, until the test ends.
async fn admin_for(gateway: &TestGateway, ready_timeout: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let routes = router(Admin::new(gateway.gateway.clone(), ready_timeout));
    tokio::spawn(serve(listener, routes, std::future::pending()));
    addr
}

async fn get(addr: SocketAddr, path: &str) -> Answer {
    let request = Request::get(format!("http://{addr}{path}"))
        .body(Body::empty())
        .unwrap();
    send(&client(), request).await
}

/// The value of the sample `series` (name and labels exactly as rendered) in a scrape.
fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .unwrap_or_else(|| panic!("no `{series}` in:\n{scrape}"))
        .trim()
        .parse()
        .unwrap()
}

async fn scrape(addr: SocketAddr) -> String {
    let answer = get(addr, "/metrics").await;
    assert_eq!(answer.status, 200);
    assert!(
        answer
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain")),
        "{:?}",
        answer.headers
    );
    String::from_utf8(answer.body.to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_as_requests_flow() {
    let upstream = Upstream::start().await;
    let config = load_config(
        "[[route]]\nprefix = \"/strict\"\npolicy = { key_required = true }\n",
        upstream_only(&upstream),
    );
    let gateway = TestGateway::start(&config).await;
    let admin = admin_for(&gateway, Duration::from_secs(2)).await;
    let before = scrape(admin).await;
    for outcome in ["executed", "replayed", "mismatch", "missing_key"] {
        let series = format!("idem_requests_total{{outcome=\"{outcome}\"}}");
        assert_eq!(sample(&before, &series), 0.0, "{series}");
    }

    let http = client();
    let key = format!("metrics-{}", unique());
    let url = format!("http://{}/pay", gateway.addr);
    let first = send(&http, keyed(&url, &key, r#"{"amount":1}"#)).await;
    let retry = send(&http, keyed(&url, &key, r#"{"amount":1}"#)).await;
    assert!(!first.is_replay() && retry.is_replay());
    let other = send(&http, keyed(&url, &key, r#"{"amount":2}"#)).await;
    assert_eq!(other.status, 422);
    let keyless = Request::post(format!("http://{}/strict", gateway.addr))
        .body(Body::from("{}"))
        .unwrap();
    assert_eq!(send(&http, keyless).await.status, 400);
    assert_eq!(upstream.count(&key), 1);

    let after = scrape(admin).await;
    for (outcome, moved) in [
        ("executed", 1.0),
        ("replayed", 1.0),
        ("mismatch", 1.0),
        ("missing_key", 1.0),
        ("in_flight", 0.0),
        ("unknown_outcome", 0.0),
    ] {
        let series = format!("idem_requests_total{{outcome=\"{outcome}\"}}");
        assert_eq!(
            sample(&after, &series) - sample(&before, &series),
            moved,
            "{series} in:\n{after}"
        );
    }
    // Every request was timed; the store's claims and the one upstream call too.
    let requests: f64 = ["2xx", "4xx"]
        .iter()
        .map(|class| {
            sample(
                &after,
                &format!("idem_request_duration_seconds_count{{status=\"{class}\"}}"),
            )
        })
        .sum();
    assert_eq!(requests, 4.0, "{after}");
    assert_eq!(
        sample(&after, "idem_upstream_duration_seconds_count"),
        1.0,
        "{after}"
    );
    assert!(
        sample(
            &after,
            "idem_store_duration_seconds_count{operation=\"begin\"}"
        ) >= 3.0,
        "{after}"
    );
    assert_eq!(sample(&after, "idem_requests_in_flight"), 0.0);
    assert_eq!(sample(&after, "idem_keyed_requests_running"), 0.0);
    assert_eq!(sample(&after, "idem_store_errors_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_while_the_process_is_up() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::start(&load_config("", upstream_only(&upstream))).await;
    let admin = admin_for(&gateway, Duration::from_secs(2)).await;
    let health = get(admin, "/healthz").await;
    assert_eq!(health.status, 200);
    let ready = get(admin, "/readyz").await;
    assert_eq!(ready.status, 200, "{:?}", ready.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_turns_false_while_the_store_is_unreachable_and_back_when_it_returns() {
    let prefix = RedisPrefix::new("readyz");
    let relay = FaultProxy::start(host_port(&redis_url())).await;
    let upstream = Upstream::start().await;
    let config = load_config(
        "",
        Overrides {
            store: Some(prefix.store_url(Some(relay.addr()))),
            ..upstream_only(&upstream)
        },
    );
    let gateway = TestGateway::start(&config).await;
    let admin = admin_for(&gateway, Duration::from_millis(500)).await;
    assert_eq!(get(admin, "/readyz").await.status, 200);

    relay.set(Fault::BlackHole).await;
    relay.cut();
    let down = eventually("/readyz to fail with the store cut off", || async {
        let answer = get(admin, "/readyz").await;
        (answer.status == 503).then_some(answer)
    })
    .await;
    let reason = String::from_utf8_lossy(&down.body).into_owned();
    assert!(reason.contains("store"), "{reason}");
    // The process is still up.
    assert_eq!(get(admin, "/healthz").await.status, 200);

    relay.set(Fault::Pass).await;
    eventually_within(
        "/readyz to recover once the store is back",
        Duration::from_secs(60),
        || async { (get(admin, "/readyz").await.status == 200).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idem_serve_logs_one_line_per_keyed_request_without_the_raw_key() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gateway = ServeProcess::start(&upstream, &dir.path().join("idem.redb"), &[]);
    let key = format!("raw-key-that-must-not-be-logged-{}", unique());
    let credential = format!("Bearer credential-that-must-not-be-logged-{}", unique());
    let body = format!(r#"{{"card":"body-that-must-not-be-logged-{}"}}"#, unique());
    let http = client();
    let request = || {
        let mut request = keyed(&gateway.url("/pay"), &key, &body);
        request
            .headers_mut()
            .insert("authorization", credential.parse().unwrap());
        request
    };
    let answer = send(&http, request()).await;
    assert_eq!(answer.status, 201);
    let replay = send(&http, request()).await;
    assert!(replay.is_replay());

    let lines = || {
        gateway
            .log()
            .lines()
            .filter(|line| line.contains("handled a keyed request"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    wait_until("two request lines", || lines().len() >= 2).await;
    let lines = lines();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    // Plain `name=value` pairs: no quotes around the fixed words and digests, no styling.
    assert!(
        lines[0].contains("handled a keyed request outcome=executed status=201 method=POST scope="),
        "{}",
        lines[0]
    );
    assert!(!lines[0].contains('\u{1b}'), "{}", lines[0]);
    assert!(lines[1].contains("replayed"), "{}", lines[1]);
    // The same key shows as the same digest on both lines, so a retry can be followed.
    let digest = |line: &str| {
        line.split_whitespace()
            .find_map(|field| field.strip_prefix("key="))
            .unwrap()
            .to_owned()
    };
    assert_eq!(digest(&lines[0]), digest(&lines[1]));
    // Milliseconds to the microsecond.
    let total_ms = lines[0]
        .split_whitespace()
        .find_map(|field| field.strip_prefix("total_ms="))
        .unwrap();
    let decimals = total_ms
        .split_once('.')
        .map_or(0, |(_, fraction)| fraction.len());
    assert!(decimals <= 3, "{}", lines[0]);
    for secret in [&key, &credential, &body] {
        assert!(
            !gateway.log().contains(secret.as_str()),
            "`{secret}` is in the log:\n{}",
            gateway.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_warns_once_a_second_not_once_a_request() {
    // A full store refuses every new key at once: each refusal gets its request line, but
    // the store's warning may not flood the log (or the disk under it) one per request.
    let upstream = Upstream::start().await;
    let gateway = ServeProcess::start_on(&upstream, "memory:?max_records=1", &[]);
    let http = client();
    let first = send(
        &http,
        keyed(&gateway.url("/pay"), &format!("k-{}", unique()), "{}"),
    )
    .await;
    assert_eq!(first.status, 201);
    let refusals = 40;
    for _ in 0..refusals {
        let answer = send(
            &http,
            keyed(&gateway.url("/pay"), &format!("k-{}", unique()), "{}"),
        )
        .await;
        assert_eq!(answer.status, 503);
    }
    let count = |what: &str| {
        gateway
            .log()
            .lines()
            .filter(|line| line.contains(what))
            .count()
    };
    wait_until("a request line per refusal", || {
        count("outcome=store_unavailable") >= refusals
    })
    .await;
    let warnings = count("idempotency store failed");
    // Within a second or two: one warning, maybe a second as the clock turns.
    assert!(
        (1..=3).contains(&warnings),
        "{warnings} warnings for {refusals} refusals:\n{}",
        gateway.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_format_json_writes_one_object_per_line() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(idem_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "off"])
        .args(["--log-format", "json", "--upstream"])
        .arg(upstream.url())
        .arg("--store")
        .arg(format!("redb:{}", dir.path().join("idem.redb").display()))
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let ready = loop {
        let line = received
            .recv_timeout(PATIENCE)
            .expect("idem serve wrote no ready line");
        let object: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        if object["message"] == "idem serve is ready" {
            break object;
        }
    };
    let addr = ready["listen"].as_str().unwrap().to_owned();
    let key = format!("json-{}", unique());
    send(&client(), keyed(&format!("http://{addr}/pay"), &key, "{}")).await;
    let line = loop {
        let line = received.recv_timeout(PATIENCE).expect("no request line");
        let object: serde_json::Value = serde_json::from_str(&line).unwrap();
        if object["message"] == "handled a keyed request" {
            break object;
        }
    };
    assert_eq!(line["outcome"], "executed", "{line}");
    assert_eq!(line["status"], 201, "{line}");
    assert!(
        line["key"].as_str().is_some_and(|k| !k.contains(&key)),
        "{line}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_held_past_stuck_after_shows_as_a_stuck_lease() {
    let upstream = Upstream::start().await;
    let gateway = TestGateway::start(&load_config("", upstream_only(&upstream))).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = listener.local_addr().unwrap();
    let routes = router(
        Admin::new(gateway.gateway.clone(), Duration::from_secs(2))
            .stuck_after(Duration::from_secs(1)),
    );
    tokio::spawn(serve(listener, routes, std::future::pending()));
    assert_eq!(sample(&scrape(admin).await, "idem_stuck_leases"), 0.0);

    // A claim whose holder went away: held for its whole lease, as after a crash.
    let key = idem_core::ScopedKey::new(
        idem_core::Scope::anonymous(),
        idem_core::Key::new(&format!("stuck-{}", unique())).unwrap(),
    );
    let fingerprint = idem_core::Fingerprint::builder()
        .part("body", b"{}")
        .finish();
    gateway
        .store
        .begin(&key, &fingerprint, Duration::from_secs(600))
        .await
        .unwrap();
    eventually("the held key to count as stuck", || async {
        (sample(&scrape(admin).await, "idem_stuck_leases") == 1.0).then_some(())
    })
    .await;
}

#[test]
fn admin_settings_are_validated() {
    let resolve = |file: &str, admin: Option<&str>| {
        let file: idem_cli::config::FileConfig = toml::from_str(file).unwrap();
        idem_cli::config::GatewayConfig::resolve(
            file,
            &Overrides {
                upstream: Some("http://127.0.0.1:3000".into()),
                admin_listen: admin.map(str::to_owned),
                ..Overrides::default()
            },
        )
    };
    let default = resolve("", None).unwrap();
    assert_eq!(
        default.admin_listen,
        Some("127.0.0.1:9090".parse().unwrap())
    );
    assert_eq!(default.stuck_after, Duration::from_secs(300));
    assert_eq!(resolve("", Some("off")).unwrap().admin_listen, None);
    assert_eq!(
        resolve("admin_listen = \"none\"", None)
            .unwrap()
            .admin_listen,
        None
    );
    // The flag wins over the file.
    assert_eq!(
        resolve("admin_listen = \"off\"", Some("127.0.0.1:9191"))
            .unwrap()
            .admin_listen,
        Some("127.0.0.1:9191".parse().unwrap())
    );
    let bad = resolve("", Some("localhost")).unwrap_err();
    assert_eq!(bad.field, "admin_listen", "{bad}");
    let bad = resolve("stuck_after = \"0s\"", None).unwrap_err();
    assert_eq!(bad.field, "stuck_after", "{bad}");
}

/// The store's own figures, for the two embedded stores: records kept rise with a new key,
/// sweeps remove the expired one and say so, and redb's writer counts its commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_reports_records_kept_sweeps_and_commits() {
    let dir = tempfile::tempdir().unwrap();
    let redb = format!("redb:{}", dir.path().join("figures.redb").display());
    for store in ["memory:", redb.as_str()] {
        let upstream = Upstream::start().await;
        let mut overrides = upstream_only(&upstream);
        overrides.store = Some(store.to_owned());
        let gateway =
            TestGateway::start(&load_config("[policy]\nretention = \"1s\"\n", overrides)).await;
        let admin = admin_for(&gateway, Duration::from_secs(2)).await;
        let before = scrape(admin).await;
        assert_eq!(sample(&before, "idem_store_records"), 0.0, "{store}");
        assert_eq!(
            sample(&before, "idem_store_swept_records_total"),
            0.0,
            "{store}"
        );

        let url = format!("http://{}/pay", gateway.addr);
        let key = format!("figures-{}", unique());
        assert_eq!(send(&client(), keyed(&url, &key, "{}")).await.status, 201);
        let after = scrape(admin).await;
        assert_eq!(
            sample(&after, "idem_store_records"),
            1.0,
            "{store}: {after}"
        );
        if store.starts_with("redb") {
            // A claim and a completion: two operations, in one or two commits.
            let commits = sample(&after, "idem_store_commits_total");
            let operations = sample(&after, "idem_store_committed_operations_total");
            assert!(commits >= 1.0 && operations >= 2.0, "{after}");
        } else {
            assert!(!after.contains("idem_store_commits_total"), "{after}");
        }

        // Retention over, the sweeper (every second) removes the record and counts it.
        eventually("the expired record to be swept", || async {
            let now = scrape(admin).await;
            (sample(&now, "idem_store_swept_records_total") == 1.0
                && sample(&now, "idem_store_records") == 0.0)
                .then_some(())
        })
        .await;
    }
}
