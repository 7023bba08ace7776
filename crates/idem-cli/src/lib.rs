//! The `idem` command's parts, as a library so tests and the demo can run them in-process:
//! the gateway ([`gateway`]), its reverse proxy ([`proxy`]), configuration ([`config`]),
//! store URLs ([`store_url`]), the admin listener ([`admin`]) and its [`metrics`],
//! `idem check` ([`check`]), and `idem keys` with the admin `/keys` routes ([`keys`]).

pub mod admin;
pub mod check;
pub mod config;
pub mod demo;
pub mod gateway;
pub mod keys;
pub mod metrics;
pub mod proxy;
pub mod store_url;
pub mod tls;

/// An error and each of its sources, joined by `: `, for a message a person reads
/// (`cannot open the store: connection refused`).
///
/// ```
/// let error = std::io::Error::other("connection refused");
/// assert_eq!(idem_cli::error_chain(&error), "connection refused");
/// ```
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
