//! A Redis store over TLS: `redis-server` processes started here listen for TLS only, with
//! certificates from a throwaway CA, and ask for client certificates (Redis' default). The
//! gateway keeps its records there, on one node (`rediss://`) and on a three-primary
//! cluster whose nodes also talk TLS among themselves (`rediss+cluster://`); a server it
//! cannot verify, or a missing client certificate, is refused with an error that says so.

mod common;
mod tls_support;

use common::{TestGateway, Upstream, client, keyed, load_config, send, upstream_only};
use http::StatusCode;
use idem_cli::config::Overrides;
use idem_cli::store_url::{StoreUrl, StoreUrlError};
use tls_support::{Pki, TlsRedis, chain};

fn gateway_config(upstream: &Upstream, store: &str) -> idem_cli::config::GatewayConfig {
    load_config(
        "",
        Overrides {
            store: Some(store.to_owned()),
            ..upstream_only(upstream)
        },
    )
}

async fn open(url: &str) -> Result<(), String> {
    let store: StoreUrl = url.parse().map_err(|e: StoreUrlError| chain(&e))?;
    store.open().await.map(drop).map_err(|e| chain(&e))
}

fn prefix(test: &str) -> String {
    format!("idem-tls-{test}-{:x}", idem_testkit::unique())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_share_records_in_a_redis_reached_over_tls() {
    let pki = Pki::new("idem redis CA");
    let redis = TlsRedis::single(&pki);
    let upstream = Upstream::start().await;
    let prefix = prefix("single");
    let url = redis.url(&prefix, &pki.ca_file, true);
    let first = TestGateway::start(&gateway_config(&upstream, &url)).await;
    let second = TestGateway::start(&gateway_config(&upstream, &url)).await;
    let client = client();

    let answer = send(&client, keyed(&first.url("/payments"), "redis-tls-1", "{}")).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{answer:?}");
    let replay = send(
        &client,
        keyed(&second.url("/payments"), "redis-tls-1", "{}"),
    )
    .await;
    assert!(
        replay.is_replay(),
        "the other gateway replays from the TLS Redis"
    );
    assert_eq!(replay.body, answer.body);
    assert_eq!(upstream.count("redis-tls-1"), 1);
    // The record is in that Redis, under the prefix the URL named.
    let keys = redis
        .cli(
            redis.ports[0],
            &["--scan", "--pattern", &format!("{prefix}:*")],
        )
        .unwrap();
    assert_eq!(keys.lines().count(), 1, "{keys}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_cannot_be_verified_or_that_wants_a_certificate_is_refused_clearly() {
    let pki = Pki::new("idem redis CA");
    let other = Pki::new("another CA");
    let redis = TlsRedis::single(&pki);

    let error = open(&redis.url(&prefix("other-ca"), &other.ca_file, true))
        .await
        .unwrap_err();
    assert!(
        error.contains("cannot connect to the Redis store") && error.contains("UnknownIssuer"),
        "an untrusted server certificate is named: {error}"
    );
    let error = open(&redis.url(&prefix("no-cert"), &pki.ca_file, false))
        .await
        .unwrap_err();
    assert!(
        error.contains("cannot connect to the Redis store")
            && error.contains("CertificateRequired"),
        "Redis' demand for a client certificate is named: {error}"
    );
    // Each TLS setting is checked before anything connects.
    let missing = pki.dir().join("missing.pem");
    let url = format!(
        "rediss://127.0.0.1:{}?ca_file={}",
        redis.ports[0],
        missing.display()
    );
    let error = open(&url).await.unwrap_err();
    assert!(
        error.contains("ca_file") && error.contains("missing.pem"),
        "{error}"
    );
    let url = format!("redis://127.0.0.1:6379?ca_file={}", pki.ca_file.display());
    let error = open(&url).await.unwrap_err();
    assert!(
        error.contains("rediss://"),
        "TLS files need a TLS URL: {error}"
    );
}

#[test]
fn a_redis_cluster_over_tls_is_one_store() {
    let pki = Pki::new("idem redis cluster CA");
    let cluster = TlsRedis::cluster(&pki);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let upstream = Upstream::start().await;
        let prefix = prefix("cluster");
        let url = cluster.url(&prefix, &pki.ca_file, true);
        let first = TestGateway::start(&gateway_config(&upstream, &url)).await;
        let second = TestGateway::start(&gateway_config(&upstream, &url)).await;
        let client = client();
        for i in 0..30 {
            let key = format!("cluster-tls-{i}");
            let answer = send(&client, keyed(&first.url("/payments"), &key, "{}")).await;
            assert_eq!(answer.status, StatusCode::CREATED, "{answer:?}");
            let replay = send(&client, keyed(&second.url("/payments"), &key, "{}")).await;
            assert!(replay.is_replay(), "{key} is replayed by the other gateway");
            assert_eq!(upstream.count(&key), 1, "{key} ran once");
        }
        // Records landed on every primary: the store followed the slots over TLS.
        for &port in &cluster.ports {
            let keys = cluster
                .cli(port, &["--scan", "--pattern", &format!("{prefix}:*")])
                .unwrap();
            assert!(
                keys.lines().any(|line| !line.is_empty()),
                "no record on the primary at {port}"
            );
        }
    });
}
