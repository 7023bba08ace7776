//! `problem_type_base`: every problem the layer answers is typed under the policy's base, so
//! an API can point them at its own error documentation; by default a `tag:` URI.

mod common;

use std::sync::Arc;

use common::{Harness, Upstream, post, with_body};
use idem_core::MemoryStore;
use idem_http::{DEFAULT_PROBLEM_TYPE_BASE, IdempotencyPolicy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn problems_are_typed_under_the_policy_s_base() {
    let policy = IdempotencyPolicy {
        problem_type_base: "https://docs.example.com/errors/".to_owned(),
        ..IdempotencyPolicy::default()
    };
    let h = Harness::around(
        Upstream::start().await,
        Arc::new(MemoryStore::new()),
        policy,
    );
    let first = h.send(with_body(post("/pay", "k-1", "a"), "a")).await;
    assert_eq!(first.status, 201, "{first:?}");

    let mismatch = h.send(with_body(post("/pay", "k-1", "b"), "b")).await;
    assert_eq!(mismatch.status, 422, "{mismatch:?}");
    assert_eq!(
        mismatch.json()["type"],
        "https://docs.example.com/errors/mismatch"
    );
    let malformed = h.send(with_body(post("/pay", "", "a"), "a")).await;
    assert_eq!(malformed.status, 400, "{malformed:?}");
    assert_eq!(
        malformed.json()["type"],
        "https://docs.example.com/errors/malformed-key"
    );
    assert_eq!(h.upstream.total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_base_is_a_tag_uri() {
    let h = Harness::around(
        Upstream::start().await,
        Arc::new(MemoryStore::new()),
        IdempotencyPolicy::default(),
    );
    h.send(with_body(post("/pay", "k-2", "a"), "a")).await;
    let mismatch = h.send(with_body(post("/pay", "k-2", "b"), "b")).await;
    assert_eq!(
        mismatch.json()["type"],
        format!("{DEFAULT_PROBLEM_TYPE_BASE}mismatch")
    );
    assert!(DEFAULT_PROBLEM_TYPE_BASE.starts_with("tag:"));
}

#[test]
fn a_base_that_is_empty_too_long_or_has_spaces_is_refused() {
    for base in [
        "",
        "https://docs example.com/",
        &"x".repeat(513),
        "tag:\u{e9}",
    ] {
        let error = IdempotencyPolicy {
            problem_type_base: base.to_owned(),
            ..IdempotencyPolicy::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(error.field(), "problem_type_base", "{base:?}");
    }
}
