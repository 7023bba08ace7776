//! The gateway configuration (`idem_cli::config`): TOML text → `FileConfig` →
//! `GatewayConfig::resolve` with an upstream given on the command line. Any text must give
//! a config or an error naming a field, never a panic; a resolved config must describe
//! itself and route any request, ambiguous paths included.
#![no_main]

use http::Method;
use idem_cli::config::{FileConfig, GatewayConfig, Overrides};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = match toml::from_str::<FileConfig>(text) {
        Ok(file) => file,
        Err(err) => {
            let _ = err.to_string();
            return;
        }
    };
    let overrides = Overrides {
        upstream: Some("http://127.0.0.1:3000".to_owned()),
        ..Overrides::default()
    };
    let config = match GatewayConfig::resolve(file, &overrides) {
        Ok(config) => config,
        Err(err) => {
            assert!(!err.field.is_empty(), "an error without a field: {err}");
            return;
        }
    };
    let _ = config.describe();
    let lower_post = Method::from_bytes(b"post").expect("a method");
    for method in [Method::POST, lower_post, Method::PATCH, Method::GET] {
        for path in [
            "/",
            "/payments",
            "/%70ayments/1/",
            "/orders/1/items",
            "/a/../payments",
            "//x",
            "*",
            "",
        ] {
            if let idem_cli::config::Routing::Route(index) = config.route(&method, path) {
                let _ = &config.routes[index].policy;
            }
        }
    }
});
