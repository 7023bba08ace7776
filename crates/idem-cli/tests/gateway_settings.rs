//! The gateway's own settings: defaults, bounds (every duration is bounded, each error names
//! its field), route methods and paths, the scope secret, and what `--check` shows.

use std::time::Duration;

use http::Method;
use idem_cli::config::{ConfigError, FileConfig, GatewayConfig, Overrides, Routing, ServerLimits};
use idem_http::OnConflict;

fn overrides() -> Overrides {
    Overrides {
        upstream: Some("http://127.0.0.1:3000".to_owned()),
        store: Some("memory:".to_owned()),
        ..Overrides::default()
    }
}

fn resolve(file: &str, overrides: &Overrides) -> Result<GatewayConfig, ConfigError> {
    let file: FileConfig = toml::from_str(file).expect("the test's TOML parses");
    GatewayConfig::resolve(file, overrides)
}

fn refused(file: &str) -> ConfigError {
    resolve(file, &overrides()).expect_err(&format!("accepted: {file}"))
}

#[test]
fn server_limits_have_safe_defaults() {
    let config = resolve("", &overrides()).unwrap();
    assert_eq!(
        config.limits,
        ServerLimits {
            max_connections: 1024,
            http2_max_concurrent_streams: 100,
            max_header_bytes: 64 << 10,
            header_read_timeout: Duration::from_secs(10),
            max_buffered_bodies: 64 << 20,
            buffer_wait: Duration::from_secs(1),
        }
    );
    assert_eq!(config.limits, ServerLimits::default());
    assert!(config.scope_secret.is_none());
}

#[test]
fn server_limits_are_read_from_the_file() {
    let config = resolve(
        "max_connections = 10\nhttp2_max_concurrent_streams = 7\nmax_header_bytes = 16384\n\
         header_read_timeout = \"3s\"\nmax_buffered_bodies = 1048576\nbuffer_wait = \"250ms\"\n",
        &overrides(),
    )
    .unwrap();
    assert_eq!(config.limits.max_connections, 10);
    assert_eq!(config.limits.http2_max_concurrent_streams, 7);
    assert_eq!(config.limits.max_header_bytes, 16384);
    assert_eq!(config.limits.header_read_timeout, Duration::from_secs(3));
    assert_eq!(config.limits.max_buffered_bodies, 1 << 20);
    assert_eq!(config.limits.buffer_wait, Duration::from_millis(250));
}

#[test]
fn every_gateway_setting_is_bounded_and_the_error_names_it() {
    for (file, field) in [
        ("connect_timeout = \"0s\"", "connect_timeout"),
        ("connect_timeout = \"1000d\"", "connect_timeout"),
        ("connect_timeout = \"400000000000y\"", "connect_timeout"),
        ("shutdown_timeout = \"1000d\"", "shutdown_timeout"),
        ("header_read_timeout = \"0s\"", "header_read_timeout"),
        ("header_read_timeout = \"1000d\"", "header_read_timeout"),
        ("buffer_wait = \"1000d\"", "buffer_wait"),
        ("max_connections = 0", "max_connections"),
        ("max_connections = 100000000", "max_connections"),
        (
            "http2_max_concurrent_streams = 0",
            "http2_max_concurrent_streams",
        ),
        ("max_header_bytes = 100", "max_header_bytes"),
        ("max_header_bytes = 100000000", "max_header_bytes"),
        ("max_buffered_bodies = 0", "max_buffered_bodies"),
    ] {
        let overrides = overrides();
        let error = match toml::from_str::<FileConfig>(file) {
            Ok(parsed) => GatewayConfig::resolve(parsed, &overrides)
                .expect_err(&format!("accepted: {file}"))
                .to_string(),
            // A duration too large to represent is refused while parsing, naming the key.
            Err(error) => error.to_string(),
        };
        assert!(error.contains(field), "`{file}`: {error}");
    }
}

#[test]
fn route_methods_are_upper_cased_and_non_methods_refused() {
    let config = resolve(
        "[[route]]\nprefix = \"/pay\"\nmethods = [\"post\", \"Patch\"]\n",
        &overrides(),
    )
    .unwrap();
    assert_eq!(config.routes[0].methods, vec![Method::POST, Method::PATCH]);
    assert!(config.describe().contains("POST, PATCH"));

    for bad in ["", "PO ST", "GET\\r\\n", "p(st"] {
        let error = refused(&format!(
            "[[route]]\nprefix = \"/pay\"\nmethods = [\"{bad}\"]\n"
        ));
        assert_eq!(error.field, "route[0].methods", "`{bad}`: {error}");
    }
}

#[test]
fn routing_is_case_insensitive_on_methods_and_sees_the_decoded_path() {
    let config = resolve(
        "[[route]]\nprefix = \"/pay\"\nmethods = [\"POST\"]\npolicy = { key_required = true }\n",
        &overrides(),
    )
    .unwrap();
    let lower_post = Method::from_bytes(b"post").unwrap();
    assert_eq!(config.route(&lower_post, "/pay"), Routing::Route(0));
    assert_eq!(config.route(&Method::POST, "/%70ay"), Routing::Route(0));
    assert_eq!(config.route(&Method::POST, "/%70ay/7"), Routing::Route(0));
    assert_eq!(config.route(&Method::GET, "/pay"), Routing::Default);
    assert!(config.routes[0].policy.key_required);
    assert!(!config.default_policy.key_required);
}

#[test]
fn an_ambiguous_path_is_refused_if_any_policy_could_protect_the_method() {
    // The default policy protects POST and PATCH; the route adds PUT, for /things only.
    let config = resolve(
        "[[route]]\nprefix = \"/things\"\nmethods = [\"PUT\"]\npolicy = { methods = [\"PUT\"] }\n",
        &overrides(),
    )
    .unwrap();
    for method in [Method::POST, Method::PATCH, Method::PUT] {
        assert!(
            matches!(config.route(&method, "/a/../b"), Routing::Ambiguous(_)),
            "{method}"
        );
        assert!(
            matches!(config.route(&method, "/a%2Fb"), Routing::Ambiguous(_)),
            "{method}"
        );
    }
    let lower_put = Method::from_bytes(b"put").unwrap();
    assert!(matches!(
        config.route(&lower_put, "/a/../b"),
        Routing::Ambiguous(_)
    ));
    for method in [Method::GET, Method::DELETE, Method::OPTIONS] {
        assert_eq!(
            config.route(&method, "/a/../b"),
            Routing::Default,
            "{method}"
        );
    }
}

#[test]
fn route_paths_are_normalised_like_request_paths() {
    let config = resolve("[[route]]\nprefix = \"/%70ay\"\n", &overrides()).unwrap();
    assert_eq!(config.route(&Method::POST, "/pay"), Routing::Route(0));
    let error = refused("[[route]]\nprefix = \"/a/../pay\"\n");
    assert_eq!(error.field, "route[0].prefix", "{error}");
}

#[test]
fn the_scope_secret_comes_from_the_environment_value_or_a_file() {
    let from_env = resolve(
        "",
        &Overrides {
            scope_secret: Some(b"0123456789abcdef".to_vec()),
            ..overrides()
        },
    )
    .unwrap();
    let secret = from_env.scope_secret.as_ref().unwrap();
    assert_eq!(secret.bytes(), b"0123456789abcdef");
    assert!(
        !format!("{from_env:?}").contains("0123456789abcdef"),
        "Debug shows the secret"
    );
    assert!(!from_env.describe().contains("0123456789abcdef"));
    assert!(from_env.describe().contains("IDEM_SCOPE_SECRET"));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secret");
    std::fs::write(&path, "a-long-enough-secret\n").unwrap();
    let from_file = resolve(
        "",
        &Overrides {
            scope_secret_file: Some(path.clone()),
            ..overrides()
        },
    )
    .unwrap();
    assert_eq!(
        from_file.scope_secret.unwrap().bytes(),
        b"a-long-enough-secret",
        "the final newline is not part of the secret"
    );

    let both = resolve(
        "",
        &Overrides {
            scope_secret: Some(b"0123456789abcdef".to_vec()),
            scope_secret_file: Some(path),
            ..overrides()
        },
    )
    .unwrap_err();
    assert_eq!(both.field, "--scope-secret-file", "{both}");
}

#[test]
fn a_short_scope_secret_is_refused() {
    let short = resolve(
        "",
        &Overrides {
            scope_secret: Some(b"fifteen-bytes!!".to_vec()),
            ..overrides()
        },
    )
    .unwrap_err();
    assert_eq!(short.field, "IDEM_SCOPE_SECRET", "{short}");
    assert!(short.message.contains("16"), "{short}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secret");
    std::fs::write(&path, "short\n").unwrap();
    let short_file = resolve(
        "",
        &Overrides {
            scope_secret_file: Some(path),
            ..overrides()
        },
    )
    .unwrap_err();
    assert_eq!(short_file.field, "--scope-secret-file", "{short_file}");
}

#[test]
fn check_shows_every_gateway_setting() {
    let described = resolve("", &overrides()).unwrap().describe();
    for shown in [
        "connect timeout 5s",
        "waits up to 30s",
        "max_connections 1024",
        "http2_max_concurrent_streams 100",
        "max_header_bytes 65536",
        "header_read_timeout 10s",
        "max_buffered_bodies 67108864",
        "buffer_wait 1s",
        "UNKEYED",
    ] {
        assert!(
            described.contains(shown),
            "`{shown}` missing from:\n{described}"
        );
    }
}

#[test]
fn idem_serve_reads_the_scope_secret_from_its_environment() {
    let check = |secret: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_idem"))
            .args(["serve", "--check", "--store", "memory:"])
            .args(["--upstream", "http://127.0.0.1:3000"])
            .env("IDEM_SCOPE_SECRET", secret)
            .output()
            .unwrap()
    };
    let short = check("short");
    assert_eq!(short.status.code(), Some(2), "{short:?}");
    assert!(String::from_utf8_lossy(&short.stderr).contains("IDEM_SCOPE_SECRET"));
    let long = check("a-secret-of-more-than-16-bytes");
    assert!(long.status.success(), "{long:?}");
    let shown = String::from_utf8_lossy(&long.stdout);
    assert!(
        shown.contains("keyed with the secret from IDEM_SCOPE_SECRET"),
        "{shown}"
    );
    assert!(!shown.contains("a-secret-of-more"), "{shown}");
}

/// `--on-conflict` and `--require-key` change the file's `[policy]`, so they reach every
/// route that does not name the field itself; a route's own value still wins.
#[test]
fn policy_flags_override_the_file_policy_and_yield_to_a_route_s_own_field() {
    let flags = Overrides {
        on_conflict: Some(OnConflict::Wait),
        require_key: true,
        ..overrides()
    };
    let config = resolve(
        "[policy]\non_conflict = \"reject\"\nkey_required = false\n\
         [[route]]\nprefix = \"/a\"\n\
         [[route]]\nprefix = \"/b\"\npolicy = { on_conflict = \"reject\" }\n",
        &flags,
    )
    .unwrap();
    assert_eq!(config.default_policy.on_conflict, OnConflict::Wait);
    assert!(config.default_policy.key_required);
    assert_eq!(config.routes[0].policy.on_conflict, OnConflict::Wait);
    assert!(config.routes[0].policy.key_required);
    assert_eq!(config.routes[1].policy.on_conflict, OnConflict::Reject);
    assert!(config.routes[1].policy.key_required);
    let unflagged = resolve("", &overrides()).unwrap();
    assert_eq!(unflagged.default_policy.on_conflict, OnConflict::Reject);
}
