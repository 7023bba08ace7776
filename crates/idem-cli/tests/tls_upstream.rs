//! `https://` upstreams: the gateway verifies the upstream against the authorities it is
//! told to trust (a throwaway CA made here), presents a client certificate when configured,
//! and refuses an upstream it cannot verify without running anything.

mod common;
mod tls_support;

use std::net::SocketAddr;
use std::time::Duration;

use common::{TestGateway, Upstream, client, keyed, run_idem, send};
use http::StatusCode;
use idem_cli::config::{GatewayConfig, Overrides};
use idem_cli::proxy::{Proxy, Upstream as UpstreamUrl};
use idem_cli::tls::TlsFiles;
use tls_support::{Pki, chain, https_front};
use tower::ServiceExt;

/// The gateway's configuration file for an https upstream at `addr` with `tls` as its
/// `[upstream_tls]` table (TOML lines).
fn config_for(addr: SocketAddr, tls: &str) -> String {
    format!(
        "upstream = \"https://{addr}\"\nstore = \"memory:\"\n[upstream_tls]\n{tls}\n",
        addr = addr
    )
}

fn load(text: &str) -> Result<GatewayConfig, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.toml");
    std::fs::write(&path, text).unwrap();
    GatewayConfig::load(Some(&path), &Overrides::default()).map_err(|e| e.to_string())
}

#[tokio::test]
async fn the_gateway_reaches_an_https_upstream_it_trusts_and_replays_from_it() {
    let pki = Pki::new("idem test CA");
    let upstream = Upstream::unbound();
    let addr = https_front(&upstream, pki.server_config(&pki.server("upstream"), false)).await;
    let config = load(&config_for(
        addr,
        &format!("ca_file = {:?}", pki.ca_file.display().to_string()),
    ))
    .unwrap();
    let gateway = TestGateway::start(&config).await;
    let client = client();

    let first = send(&client, keyed(&gateway.url("/payments"), "tls-pay-1", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    assert!(!first.is_replay());
    let again = send(&client, keyed(&gateway.url("/payments"), "tls-pay-1", "{}")).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert!(again.is_replay(), "the retry is answered from the record");
    assert_eq!(again.body, first.body);
    assert_eq!(upstream.count("tls-pay-1"), 1, "one execution over TLS");
    // The upstream is addressed by the name its certificate carries.
    assert_eq!(upstream.last().headers["host"], addr.to_string());
}

#[tokio::test]
async fn an_upstream_whose_certificate_is_not_trusted_is_refused_and_nothing_runs() {
    let trusted = Pki::new("the CA the gateway trusts");
    let other = Pki::new("another CA");
    let upstream = Upstream::unbound();
    let addr = https_front(
        &upstream,
        other.server_config(&other.server("upstream"), false),
    )
    .await;
    let config = load(&config_for(
        addr,
        &format!("ca_file = {:?}", trusted.ca_file.display().to_string()),
    ))
    .unwrap();
    let gateway = TestGateway::start(&config).await;

    let answer = send(
        &client(),
        keyed(&gateway.url("/payments"), "tls-untrusted", "{}"),
    )
    .await;
    answer.assert_problem(502, "upstream-unavailable");
    assert_eq!(upstream.total(), 0, "nothing reached the upstream");
    assert!(
        gateway.record("tls-untrusted").await.is_none(),
        "the key was released: a retry may run once the certificate is fixed"
    );

    // What the operator's log line says: the certificate, not just "connect error".
    let proxy = Proxy::new(config.upstream.clone(), Duration::from_secs(5));
    let request = http::Request::post("/payments")
        .body(axum::body::Body::empty())
        .unwrap();
    let error = proxy.oneshot(request).await.unwrap_err();
    let text = chain(&*error);
    assert!(
        text.contains("certificate") && text.contains("UnknownIssuer"),
        "the error names the untrusted certificate: {text}"
    );
    assert!(
        idem_http::NotSent::is_in(&*error),
        "a failed handshake sent nothing"
    );
}

#[tokio::test]
async fn a_client_certificate_is_presented_to_an_upstream_that_asks_for_one() {
    let pki = Pki::new("idem mTLS CA");
    let upstream = Upstream::unbound();
    let addr = https_front(&upstream, pki.server_config(&pki.server("upstream"), true)).await;
    let ca = format!("ca_file = {:?}", pki.ca_file.display().to_string());
    let gateway_cert = pki.client("gateway");
    let with_cert = format!(
        "{ca}\ncert_file = {:?}\nkey_file = {:?}",
        gateway_cert.cert.display().to_string(),
        gateway_cert.key.display().to_string()
    );

    let gateway = TestGateway::start(&load(&config_for(addr, &with_cert)).unwrap()).await;
    let answer = send(&client(), keyed(&gateway.url("/payments"), "mtls-1", "{}")).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{answer:?}");
    assert_eq!(upstream.count("mtls-1"), 1);

    let anonymous = TestGateway::start(&load(&config_for(addr, &ca)).unwrap()).await;
    let answer = send(
        &client(),
        keyed(&anonymous.url("/payments"), "mtls-2", "{}"),
    )
    .await;
    answer.assert_problem(502, "upstream-unavailable");
    assert_eq!(upstream.count("mtls-2"), 0, "refused without a certificate");
    assert!(
        anonymous.record("mtls-2").await.is_none(),
        "a refused handshake ran nothing, so the key is free to retry once the gateway has \
         its certificate"
    );
}

#[test]
fn unusable_tls_settings_stop_the_gateway_naming_the_field_and_file() {
    let pki = Pki::new("idem config CA");
    let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let missing = pki.dir().join("missing.pem");
    let not_pem = pki.dir().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let pair = pki.client("half");

    let error = load(&config_for(
        addr,
        &format!("ca_file = {:?}", missing.display().to_string()),
    ))
    .unwrap_err();
    assert!(
        error.contains("upstream_tls")
            && error.contains("ca_file")
            && error.contains("missing.pem"),
        "{error}"
    );
    let error = load(&config_for(
        addr,
        &format!("ca_file = {:?}", not_pem.display().to_string()),
    ))
    .unwrap_err();
    assert!(error.contains("holds no PEM certificate"), "{error}");
    let error = load(&config_for(
        addr,
        &format!("cert_file = {:?}", pair.cert.display().to_string()),
    ))
    .unwrap_err();
    assert!(error.contains("set both or neither"), "{error}");
    // A client certificate with another certificate's key.
    let other = pki.client("other");
    let error = load(&config_for(
        addr,
        &format!(
            "cert_file = {:?}\nkey_file = {:?}",
            pair.cert.display().to_string(),
            other.key.display().to_string()
        ),
    ))
    .unwrap_err();
    assert!(error.contains("upstream_tls"), "{error}");
    let error = load(&format!(
        "upstream = \"http://{addr}\"\n[upstream_tls]\nca_file = {:?}\n",
        pki.ca_file.display().to_string()
    ))
    .unwrap_err();
    assert!(
        error.contains("upstream_tls") && error.contains("https://"),
        "{error}"
    );
    let error =
        load("upstream = \"https://127.0.0.1\"\n[upstream_tls]\ncafile = \"x\"\n").unwrap_err();
    assert!(
        error.contains("cafile"),
        "an unknown field is named: {error}"
    );
    assert!(
        TlsFiles::default().is_empty() && UpstreamUrl::parse("ftp://127.0.0.1").is_err(),
        "only http and https"
    );

    // The same through the binary: exit status 2 and the field named.
    let file = pki.dir().join("idem.toml");
    std::fs::write(
        &file,
        config_for(
            addr,
            &format!("ca_file = {:?}", missing.display().to_string()),
        ),
    )
    .unwrap();
    let (status, _, stderr) = run_idem(&["serve", "--check", "--config", file.to_str().unwrap()]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("upstream_tls") && stderr.contains("missing.pem"),
        "{stderr}"
    );
}
