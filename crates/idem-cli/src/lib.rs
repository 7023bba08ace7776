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
