//! `idem serve` as a real process: killed and restarted on the same redb file, stopped by
//! SIGTERM mid-request, and refusing bad configurations with a message naming the field.

mod common;

use std::time::Duration;

use axum::body::Body;
use common::*;
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_keys_replay_after_sigkill_and_restart_on_the_same_redb_file() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let redb = dir.path().join("idem.redb");
    let client = client();

    let mut first = ServeProcess::start(&upstream, &redb, &[]);
    let mut originals = Vec::new();
    for key in ["kill-1", "kill-2", "kill-3"] {
        let answer = send(&client, keyed(&first.url("/payments"), key, "{}")).await;
        assert_eq!(answer.status, 201, "{answer:?}");
        assert!(!answer.is_replay());
        originals.push(answer);
    }
    // One more still running when the process dies.
    let in_flight = tokio::spawn({
        let client = client.clone();
        let request = post(&first.url("/payments"), Some("kill-running"))
            .header("x-sleep-ms", "400")
            .body(Body::from("{}"))
            .unwrap();
        async move { client.request(request).await }
    });
    upstream.wait_total(4).await;
    first.kill();
    assert!(
        in_flight.await.unwrap().is_err(),
        "a killed gateway cannot answer"
    );

    let second = ServeProcess::start(&upstream, &redb, &[]);
    let client = common::client();
    for (key, original) in ["kill-1", "kill-2", "kill-3"].iter().zip(&originals) {
        let answer = send(&client, keyed(&second.url("/payments"), key, "{}")).await;
        assert!(
            answer.is_replay(),
            "{key} ran again after a restart: {answer:?}"
        );
        assert_eq!(answer.status, original.status);
        assert_eq!(answer.body, original.body);
        assert_eq!(answer.replayable_headers(), original.replayable_headers());
        assert_eq!(upstream.count(key), 1);
    }
    // The request that was running holds its key until its lease ends: not run again now.
    let running = send(
        &client,
        post(&second.url("/payments"), Some("kill-running"))
            .header("x-sleep-ms", "400")
            .body(Body::from("{}"))
            .unwrap(),
    )
    .await;
    running.assert_problem(409, "in-flight");
    assert_eq!(upstream.count("kill-running"), 1);
    assert_eq!(upstream.total(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_request_in_flight_finish_exits_0_and_the_key_replays_after_restart() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let redb = dir.path().join("idem.redb");
    let client = client();
    let slow = |gateway: &ServeProcess| {
        post(&gateway.url("/payments"), Some("term-1"))
            .header("x-sleep-ms", "600")
            .body(Body::from("{}"))
            .unwrap()
    };

    let mut first = ServeProcess::start(&upstream, &redb, &[]);
    let in_flight = tokio::spawn({
        let client = client.clone();
        let request = slow(&first);
        async move { send(&client, request).await }
    });
    upstream.wait_total(1).await;
    first.terminate();

    let answer = in_flight.await.unwrap();
    assert_eq!(answer.status, 201, "{answer:?}");
    assert!(!answer.is_replay());
    answer.expires();
    let status = first.wait().await;
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        first.log()
    );
    assert!(!first.log().contains("panicked"), "{}", first.log());

    let second = ServeProcess::start(&upstream, &redb, &[]);
    let replay = send(&common::client(), slow(&second)).await;
    assert!(replay.is_replay(), "{replay:?}");
    assert_eq!(replay.body, answer.body);
    assert_eq!(upstream.count("term-1"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_the_work_of_a_client_that_went_away() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let redb = dir.path().join("idem.redb");

    let mut first = ServeProcess::start(&upstream, &redb, &[]);
    let request = "POST /payments HTTP/1.1\r\nhost: gw\r\nidempotency-key: term-2\r\n\
         content-type: application/json\r\nx-sleep-ms: 500\r\ncontent-length: 2\r\n\r\n{}";
    let mut stream = tokio::net::TcpStream::connect(first.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    upstream.wait_total(1).await;
    drop(stream);
    // Let the gateway notice the client is gone before it is told to stop.
    tokio::time::sleep(Duration::from_millis(50)).await;
    first.terminate();
    let status = first.wait().await;
    assert!(status.success(), "exit status {status:?}:\n{}", first.log());

    let second = ServeProcess::start(&upstream, &redb, &[]);
    let replay = send(&client(), keyed(&second.url("/payments"), "term-2", "{}")).await;
    assert!(
        replay.is_replay(),
        "the detached response was not stored before exit: {replay:?}\n{}",
        first.log()
    );
    assert_eq!(replay.json()["key"], "term-2");
    assert_eq!(upstream.count("term-2"), 1);
}

/// Asserts `idem ARGS` failed (not a panic, not success) and its stderr names `field`.
fn assert_refused(args: &[&str], field: &str) -> String {
    let (status, _, stderr) = run_idem(args);
    assert!(!status.success(), "idem {args:?} succeeded");
    assert!(
        status.code().is_some(),
        "idem {args:?} died by a signal: {status:?}"
    );
    assert!(
        stderr.contains(field),
        "idem {args:?}: stderr does not name `{field}`:\n{stderr}"
    );
    stderr
}

fn write_config(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("idem.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn a_bad_upstream_is_refused_naming_upstream() {
    for bad in [
        "not-a-url",
        "ftp://example.com",
        "http://",
        "127.0.0.1:3000",
        "http://h:1/?q=1",
    ] {
        assert_refused(
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--store",
                "memory:",
                "--upstream",
                bad,
            ],
            "upstream",
        );
    }
    // None at all.
    assert_refused(
        &["serve", "--listen", "127.0.0.1:0", "--store", "memory:"],
        "upstream",
    );
}

#[test]
fn a_bad_store_or_listen_value_is_refused_naming_it() {
    let ok_upstream = ["--upstream", "http://127.0.0.1:9"];
    for bad in ["mysql://x", "redb:", "", "memoryx"] {
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--store", bad];
        args.extend(ok_upstream);
        assert_refused(&args, "store");
    }
    // A file that cannot be opened: found when the store is opened, still named.
    let dir = tempfile::tempdir().unwrap();
    let unopenable = format!("redb:{}/no/such/dir/idem.redb", dir.path().display());
    let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--store", &unopenable];
    args.extend(ok_upstream);
    assert_refused(&args, "store");

    let mut args = vec!["serve", "--listen", "nowhere", "--store", "memory:"];
    args.extend(ok_upstream);
    assert_refused(&args, "listen");
}

#[test]
fn a_bad_config_file_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[[route]]\nprefix = \"/p\"\npolicy = { leese = \"5s\" }\n",
            vec!["route[0].policy.leese"],
        ),
        (
            "[[route]]\nprefix = \"/p\"\npolicy = { lease = \"0s\" }\n",
            vec!["route[0].policy.lease"],
        ),
        (
            "[[route]]\nprefix = \"/a\"\n\n[[route]]\nprefix = \"/b\"\npolicy = { retention = \"0s\" }\n",
            vec!["route[1].policy.retention"],
        ),
        ("[policy]\nlease = \"0s\"\n", vec!["policy.lease"]),
        ("[policy]\nmethods = [\"GET\"]\n", vec!["policy.methods"]),
        ("[policy]\nlease = \"soon\"\n", vec!["policy.lease", "soon"]),
        (
            "[policy]\non_conflict = \"sometimes\"\n",
            vec!["policy.on_conflict"],
        ),
        (
            "[[route]]\nprefix = \"/p\"\npolicy = { key_required = \"yes\" }\n",
            vec!["route[0].policy.key_required"],
        ),
        ("upstreem = \"http://127.0.0.1:1\"\n", vec!["upstreem"]),
        ("[[route]]\nprefix = \"p\"\n", vec!["route[0]"]),
        ("[[route]]\npolicy = {}\n", vec!["route[0]"]),
        (
            "[[route]]\nprefix = \"/p\"\nmethods = [\"P OST\"]\n",
            vec!["route[0].methods"],
        ),
        ("this is not toml", vec!["idem.toml"]),
    ];
    for (text, fields) in cases {
        let path = write_config(&dir, text);
        let stderr = assert_refused(
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--store",
                "memory:",
                "--upstream",
                "http://127.0.0.1:9",
                "--config",
                &path,
            ],
            fields[0],
        );
        for field in &fields[1..] {
            assert!(
                stderr.contains(field),
                "{text:?}: no `{field}` in\n{stderr}"
            );
        }
    }
    assert_refused(
        &[
            "serve",
            "--config",
            "/no/such/idem.toml",
            "--upstream",
            "http://127.0.0.1:9",
        ],
        "--config",
    );
}

#[test]
fn check_on_a_valid_file_prints_the_routes_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        r#"
listen = "127.0.0.1:0"
upstream = "http://127.0.0.1:3000/api"
store = "memory:"

[policy]
retention = "1h"

[[route]]
prefix = "/payments"
policy = { key_required = true, on_conflict = "wait" }

[[route]]
pattern = "/orders/*/items"
methods = ["POST"]
policy = { max_request_body = 2048 }
"#,
    );
    let (status, stdout, stderr) = run_idem(&["serve", "--config", &path, "--check"]);
    assert!(status.success(), "{stderr}");
    for expected in [
        "configuration is valid",
        "upstream   http://127.0.0.1:3000/api",
        "store      memory:",
        "route[0]: prefix /payments, any method",
        "route[1]: pattern /orders/*/items, POST",
        "request at most 2048 bytes",
        "required",
        "Wait",
    ] {
        assert!(stdout.contains(expected), "no {expected:?} in:\n{stdout}");
    }
    // --check does not serve: it has returned, and nothing was bound.
    let (status, _, stderr) = run_idem(&[
        "serve",
        "--config",
        &path,
        "--check",
        "--upstream",
        "not-a-url",
    ]);
    assert!(!status.success());
    assert!(stderr.contains("upstream"), "{stderr}");
}

#[test]
fn the_on_conflict_flag_reaches_the_policy_and_a_bad_mode_is_refused() {
    let base = [
        "serve",
        "--upstream",
        "http://127.0.0.1:3000",
        "--store",
        "memory:",
    ];
    let (status, stdout, stderr) = run_idem(&[&base[..], &["--check"]].concat());
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("conflict   Reject"), "{stdout}");
    let (status, stdout, stderr) =
        run_idem(&[&base[..], &["--on-conflict", "wait", "--check"]].concat());
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("conflict   Wait"), "{stdout}");
    let (status, _, stderr) =
        run_idem(&[&base[..], &["--on-conflict", "sometimes", "--check"]].concat());
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--on-conflict"), "{stderr}");
}

#[test]
fn logs_written_to_a_pipe_carry_no_colour_codes() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = Command::new(idem_bin())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(["--upstream", "http://127.0.0.1:9", "--store", "memory:"])
        .env_remove("NO_COLOR")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (line_tx, line_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("idem serve is ready") {
                let _ = line_tx.send(line);
                return;
            }
        }
    });
    let ready = line_rx.recv_timeout(Duration::from_secs(30));
    let _ = child.kill();
    let _ = child.wait();
    let ready = ready.expect("idem serve did not log its ready line");
    assert!(!ready.contains('\u{1b}'), "escape codes in {ready:?}");
}
