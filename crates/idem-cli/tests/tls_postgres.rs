//! A Postgres store over TLS: a throwaway Postgres started here accepts only TLS
//! connections with a client certificate from a throwaway CA; the gateway keeps its records
//! there with `sslmode=verify-full`, and a server it cannot verify, or a missing client
//! certificate, is refused with an error that says so.

mod common;
mod tls_support;

use common::{TestGateway, Upstream, client, keyed, load_config, send, upstream_only};
use http::StatusCode;
use idem_cli::config::Overrides;
use idem_cli::store_url::StoreUrl;
use tls_support::{Pki, TlsPostgres, chain};

async fn open(url: &str) -> Result<(), String> {
    let store: StoreUrl = url.parse().map_err(|e| format!("{e}"))?;
    store.open().await.map(drop).map_err(|e| chain(&e))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_keeps_its_records_in_postgres_over_verified_tls() {
    let pki = Pki::new("idem postgres CA");
    let postgres = TlsPostgres::start(&pki);
    let upstream = Upstream::start().await;
    let url = postgres.url("verify-full", &pki.ca_file, true);
    let config = |url: &str| {
        load_config(
            "",
            Overrides {
                store: Some(url.to_owned()),
                ..upstream_only(&upstream)
            },
        )
    };
    let first = TestGateway::start(&config(&url)).await;
    let second = TestGateway::start(&config(&url)).await;
    let client = client();

    let answer = send(&client, keyed(&first.url("/payments"), "pg-tls-1", "{}")).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{answer:?}");
    let replay = send(&client, keyed(&second.url("/payments"), "pg-tls-1", "{}")).await;
    assert!(
        replay.is_replay(),
        "the other gateway replays from the TLS store"
    );
    assert_eq!(replay.body, answer.body);
    assert_eq!(upstream.count("pg-tls-1"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_that_cannot_be_verified_or_that_wants_a_certificate_is_refused_clearly() {
    let pki = Pki::new("idem postgres CA");
    let other = Pki::new("another CA");
    let postgres = TlsPostgres::start(&pki);

    let error = open(&postgres.url("verify-full", &other.ca_file, true))
        .await
        .unwrap_err();
    assert!(
        error.contains("cannot connect to the Postgres store") && error.contains("certificate"),
        "an untrusted server certificate is named: {error}"
    );
    let error = open(&postgres.url("verify-full", &pki.ca_file, false))
        .await
        .unwrap_err();
    assert!(
        error.contains("certificate"),
        "the server's demand for a client certificate is named: {error}"
    );
    // Without TLS the server (hostssl only) turns the gateway away: what works above is TLS.
    let plain = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
        postgres.port
    );
    let error = open(&plain).await.unwrap_err();
    assert!(error.contains("pg_hba.conf"), "{error}");
    let error = open(&postgres.url("sometimes", &pki.ca_file, true))
        .await
        .unwrap_err();
    assert!(
        error.contains("sslmode") || error.contains("sometimes"),
        "{error}"
    );
}
