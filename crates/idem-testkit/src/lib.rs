//! Test helpers for idem's own test suites, in one place: a counting [`Upstream`], a TCP
//! [`FaultProxy`], whole-read HTTP [`Answer`]s and a client, [`eventually`] and
//! [`PATIENCE`], and per-test namespaces on the shared Redis ([`RedisPrefix`]) and
//! Postgres ([`PostgresSchema`]).
//!
//! Dev-only (`publish = false`): helpers panic on anything unexpected, as tests want.
//!
//! ```
//! use idem_testkit::{Upstream, client, keyed, send};
//!
//! # #[tokio::main] async fn main() {
//! let upstream = Upstream::start().await;
//! let answer = send(&client(), keyed(&upstream.url_for("/pay"), "k-1", "{}")).await;
//! assert_eq!(answer.status, 201);
//! assert_eq!(upstream.count("k-1"), 1);
//! # }
//! ```

mod answer;
mod client;
mod fault;
pub mod semantics;
mod services;
mod upstream;
mod wait;

pub use answer::Answer;
pub use client::{HttpClient, client, keyed, raw_exchange, send};
pub use fault::{Fault, FaultProxy};
pub use services::{PostgresSchema, RedisPrefix, database_url, host_port, psql, redis_url, unique};
pub use upstream::{Seen, Upstream, handle};
pub use wait::{PATIENCE, eventually, eventually_within, wait_until};
