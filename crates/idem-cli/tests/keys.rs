//! `idem keys` (the real binary) against redb, Redis and Postgres, and the admin `/keys`
//! routes' bearer token.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use common::*;
use idem_cli::config::Overrides;
use idem_cli::keys::{AdminToken, routes};
use idem_core::{Begin, Fingerprint, Key, MemoryStore, Scope, ScopedKey, Store, Stored};

fn overrides(upstream: &Upstream, store: &str) -> Overrides {
    Overrides {
        store: Some(store.to_owned()),
        ..upstream_only(upstream)
    }
}

/// One keyed POST through a fresh in-process gateway on `store`; the gateway is stopped
/// (and its store closed) before this returns, so a redb file is free for `idem keys`.
async fn pay_once(upstream: &Upstream, store: &str, key: &str) -> Answer {
    let gateway = TestGateway::start(&load_config("", overrides(upstream, store))).await;
    let answer = send(&client(), keyed(&gateway.url("/payments"), key, "{}")).await;
    gateway.stop().await;
    answer
}

/// `idem keys get` shows the record, `idem keys delete` forgets it, and the next request
/// with the key runs again at the upstream.
async fn delete_makes_the_next_request_run_again(store: &str) {
    let upstream = Upstream::start().await;
    let key = format!("keys-delete-{}", unique());
    let first = pay_once(&upstream, store, &key).await;
    assert_eq!(first.status, 201, "{first:?}");
    let replay = pay_once(&upstream, store, &key).await;
    assert!(replay.is_replay(), "{replay:?}");
    assert_eq!(upstream.count(&key), 1);

    let (status, out, err) = run_idem(&["keys", "get", &key, "--store", store, "--body"]);
    assert!(status.success(), "{out}{err}");
    let view: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(view["state"], "completed", "{view}");
    assert_eq!(view["scope"], "anonymous");
    assert_eq!(view["status"], 201);
    assert!(view["body"].is_string(), "--body shows the body: {view}");
    let (_, without_body, _) = run_idem(&["keys", "get", &key, "--store", store]);
    assert!(!without_body.contains("\"body\""), "{without_body}");

    let (status, out, err) = run_idem(&["keys", "delete", &key, "--store", store]);
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("\"deleted\": true"), "{out}");
    let (status, _, _) = run_idem(&["keys", "get", &key, "--store", store]);
    assert_eq!(status.code(), Some(1), "a deleted key is not found");

    let again = pay_once(&upstream, store, &key).await;
    assert!(!again.is_replay(), "{again:?}");
    assert_eq!(upstream.count(&key), 2, "the deleted key ran again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_delete_on_a_redb_file_makes_the_next_request_execute_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("redb:{}", dir.path().join("idem.redb").display());
    delete_makes_the_next_request_run_again(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_delete_on_redis_makes_the_next_request_execute_again() {
    let prefix = RedisPrefix::new("keys-delete");
    delete_makes_the_next_request_run_again(&prefix.store_url(None)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_delete_on_postgres_makes_the_next_request_execute_again() {
    let schema = PostgresSchema::new("keys_delete");
    delete_makes_the_next_request_run_again(&schema.store_url(None)).await;
}

fn scoped(key: &str) -> ScopedKey {
    ScopedKey::new(Scope::anonymous(), Key::new(key).unwrap())
}

async fn hold_and_finish(store: &dyn Store) {
    let fp = Fingerprint::builder().part("body", b"{}").finish();
    let lease = Duration::from_secs(600);
    assert!(matches!(
        store.begin(&scoped("held"), &fp, lease).await.unwrap(),
        Begin::Acquired(_)
    ));
    let Begin::Acquired(done) = store.begin(&scoped("done"), &fp, lease).await.unwrap() else {
        panic!("done is acquired")
    };
    store
        .complete(&scoped("done"), done.token, &Stored::new(201), lease)
        .await
        .unwrap();
}

/// `idem keys stuck` on `url` lists the held key and not the completed one.
async fn stuck_lists_a_held_key_and_not_a_completed_one(url: &str) {
    {
        let store = url.parse::<idem_cli::store_url::StoreUrl>().unwrap();
        hold_and_finish(&*store.open().await.unwrap()).await;
    }
    let (status, out, err) = run_idem(&["keys", "stuck", "--older-than", "0s", "--store", url]);
    assert!(status.success(), "{out}{err}");
    let view: serde_json::Value = serde_json::from_str(&out).unwrap();
    let keys: Vec<&str> = view["stuck"]
        .as_array()
        .unwrap()
        .iter()
        .map(|record| record["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["held"], "{out}");
    let (_, out, _) = run_idem(&["keys", "stuck", "--older-than", "1h", "--store", url]);
    assert!(
        out.contains("\"stuck\": []"),
        "too young to be stuck: {out}"
    );
}

#[tokio::test]
async fn keys_stuck_on_a_redb_file_lists_a_held_key_and_not_a_completed_one() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("redb:{}", dir.path().join("idem.redb").display());
    stuck_lists_a_held_key_and_not_a_completed_one(&url).await;
}

#[tokio::test]
async fn keys_stuck_on_postgres_lists_a_held_key_and_not_a_completed_one() {
    let schema = PostgresSchema::new("keys_stuck");
    stuck_lists_a_held_key_and_not_a_completed_one(&schema.store_url(None)).await;
}

#[tokio::test]
async fn keys_refuses_bad_usage_with_exit_2() {
    let (status, _, err) = run_idem(&["keys", "get", "k"]);
    assert_eq!(status.code(), Some(2));
    assert!(err.contains("--store"), "{err}");
    let (status, _, err) = run_idem(&["keys", "get", "k", "--store", "memory:"]);
    assert_eq!(status.code(), Some(2), "{err}");
    let (status, _, err) = run_idem(&["keys", "stuck", "--limit", "0", "--store", "memory:"]);
    assert_eq!(status.code(), Some(2), "{err}");
}

const TOKEN: &str = "test-admin-token-0123456789";

async fn admin_on(store: Arc<dyn Store>, token: Option<AdminToken>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = routes(store, token, Duration::from_secs(2));
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

fn admin_request(method: &str, url: &str, bearer: Option<&str>) -> http::Request<Body> {
    let mut request = http::Request::builder().method(method).uri(url);
    if let Some(bearer) = bearer {
        request = request.header("authorization", format!("Bearer {bearer}"));
    }
    request.body(Body::empty()).unwrap()
}

#[tokio::test]
async fn the_admin_keys_routes_reject_missing_and_wrong_tokens() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    hold_and_finish(&*store).await;
    let base = admin_on(Arc::clone(&store), Some(AdminToken::new(TOKEN).unwrap())).await;
    let client = client();
    let done = format!("{base}/keys/anonymous/done");
    for (method, url) in [
        ("GET", done.as_str()),
        ("DELETE", done.as_str()),
        ("GET", &format!("{base}/keys/stuck")),
    ] {
        for bearer in [None, Some("wrong-token-but-long-enough"), Some("")] {
            let answer = send(&client, admin_request(method, url, bearer)).await;
            assert_eq!(answer.status, 401, "{method} {url} with {bearer:?}");
        }
    }
    assert!(
        store.get(&scoped("done")).await.unwrap().is_some(),
        "a refused delete changed nothing"
    );

    let record = send(&client, admin_request("GET", &done, Some(TOKEN))).await;
    assert_eq!(record.status, 200);
    let view: serde_json::Value = serde_json::from_slice(&record.body).unwrap();
    assert_eq!(view["state"], "completed");
    assert_eq!(view["status"], 201);
    let stuck = send(
        &client,
        admin_request(
            "GET",
            &format!("{base}/keys/stuck?older_than=0s&limit=10"),
            Some(TOKEN),
        ),
    )
    .await;
    assert_eq!(stuck.status, 200);
    let view: serde_json::Value = serde_json::from_slice(&stuck.body).unwrap();
    assert_eq!(view["stuck"][0]["key"], "held", "{view}");
    let bad = send(
        &client,
        admin_request("GET", &format!("{base}/keys/stuck?limit=0"), Some(TOKEN)),
    )
    .await;
    assert_eq!(bad.status, 400);
    let deleted = send(&client, admin_request("DELETE", &done, Some(TOKEN))).await;
    assert_eq!(deleted.status, 200);
    assert!(store.get(&scoped("done")).await.unwrap().is_none());
    let gone = send(&client, admin_request("GET", &done, Some(TOKEN))).await;
    assert_eq!(gone.status, 404);
}

#[tokio::test]
async fn without_a_token_the_admin_keys_routes_are_closed() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let base = admin_on(store, None).await;
    let answer = send(
        &client(),
        admin_request("GET", &format!("{base}/keys/stuck"), Some(TOKEN)),
    )
    .await;
    assert_eq!(answer.status, 401);
}

#[tokio::test]
async fn the_gateway_refuses_a_non_loopback_admin_address_without_a_token() {
    let output = std::process::Command::new(idem_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "0.0.0.0:0",
        ])
        .args(["--upstream", "http://127.0.0.1:9", "--store", "memory:"])
        .env_remove(idem_cli::keys::ADMIN_TOKEN_ENV)
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "it started: {stderr}");
    assert!(stderr.contains("no admin token is set"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// The gateway's own admin listener serves `/keys` behind the token from the environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_admin_listener_serves_keys_behind_the_token() {
    use std::io::BufRead;
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let mut child = std::process::Command::new(idem_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(["--upstream", &upstream.url(), "--store", "memory:"])
        .env_remove(idem_cli::keys::ADMIN_TOKEN_ENV)
        .arg("--admin-token-file")
        .arg(&token_file)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (found, addr) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let line = strip_ansi(&line);
            if line.contains("admin listener is ready")
                && let Some(rest) = line.split("admin=").nth(1)
            {
                let addr = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                let _ = found.send(addr);
            }
        }
    });
    let admin = addr.recv_timeout(PATIENCE).expect("no admin listener line");
    let stuck = format!("http://{admin}/keys/stuck");
    let client = client();
    let refused = send(&client, admin_request("GET", &stuck, None)).await;
    let wrong = send(
        &client,
        admin_request("GET", &stuck, Some("not-the-admin-token")),
    )
    .await;
    let allowed = send(&client, admin_request("GET", &stuck, Some(TOKEN))).await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(refused.status, 401);
    assert_eq!(wrong.status, 401);
    assert_eq!(allowed.status, 200, "{allowed:?}");
}

/// `--credential` finds the record the gateway keyed by that caller's credential, with the
/// gateway's scope secret; without the secret the digest differs and nothing is found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_get_by_credential_finds_what_the_gateway_stored() {
    const SECRET: &str = "a scope secret of many bytes";
    let upstream = Upstream::start().await;
    let prefix = RedisPrefix::new("keys-credential");
    let store = prefix.store_url(None);
    let config = load_config(
        "",
        Overrides {
            scope_secret: Some(SECRET.as_bytes().to_vec()),
            ..overrides(&upstream, &store)
        },
    );
    let gateway = TestGateway::start(&config).await;
    let mut request = keyed(&gateway.url("/payments"), "by-credential", "{}");
    request
        .headers_mut()
        .insert("authorization", "Bearer sk_test_1".parse().unwrap());
    assert_eq!(send(&client(), request).await.status, 201);
    gateway.stop().await;

    let get = |secret: Option<&str>| {
        let mut command = std::process::Command::new(idem_bin());
        command
            .args(["keys", "get", "by-credential", "--store", &store])
            .args(["--credential", "Bearer sk_test_1"])
            .env_remove(idem_cli::config::SCOPE_SECRET_ENV);
        if let Some(secret) = secret {
            command.env(idem_cli::config::SCOPE_SECRET_ENV, secret);
        }
        command.output().unwrap()
    };
    let found = get(Some(SECRET));
    let out = String::from_utf8_lossy(&found.stdout);
    assert!(found.status.success(), "{out}");
    assert!(out.contains("\"scope\": \"cred"), "{out}");
    assert!(out.contains("\"state\": \"completed\""), "{out}");
    assert_eq!(
        get(None).status.code(),
        Some(1),
        "another digest, no record"
    );
}

#[tokio::test]
async fn keys_stuck_on_redis_lists_a_held_key_and_not_a_completed_one() {
    let prefix = RedisPrefix::new("keys-stuck");
    stuck_lists_a_held_key_and_not_a_completed_one(&prefix.store_url(None)).await;
}

/// `idem keys --credential` reads the scope secret exactly as `idem serve` does, so it
/// never computes a scope the gateway would not use: a secret given two ways, or one too
/// short for the gateway, is refused rather than silently used.
#[test]
fn keys_credential_refuses_a_scope_secret_the_gateway_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secret");
    std::fs::write(&file, "a scope secret of many bytes\n").unwrap();
    let store = format!("redb:{}", dir.path().join("idem.redb").display());
    let run = |env: Option<&str>, file: Option<&std::path::Path>| {
        let mut command = std::process::Command::new(idem_bin());
        command
            .args(["keys", "get", "k", "--store", &store])
            .args(["--credential", "Bearer sk_test_1"])
            .env_remove(idem_cli::config::SCOPE_SECRET_ENV);
        if let Some(env) = env {
            command.env(idem_cli::config::SCOPE_SECRET_ENV, env);
        }
        if let Some(file) = file {
            command.arg("--scope-secret-file").arg(file);
        }
        let output = command.output().unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, err) = run(Some("another secret, also long"), Some(&file));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("one way only"), "{err}");
    let (code, err) = run(Some("short"), None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("at least 16"), "{err}");
}

/// A key pasted as the client sent it in structured-field form finds the record stored
/// under the bare key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_get_reads_a_pasted_sf_string_key_as_the_gateway_does() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("redb:{}", dir.path().join("idem.redb").display());
    {
        let store = url.parse::<idem_cli::store_url::StoreUrl>().unwrap();
        hold_and_finish(&*store.open().await.unwrap()).await;
    }
    let (status, out, err) = run_idem(&["keys", "get", "\"done\"", "--store", &url]);
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("\"state\": \"completed\""), "{out}");
}
