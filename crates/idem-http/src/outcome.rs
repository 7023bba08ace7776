//! The outcome table, in one place: from what the request, the store and the upstream said
//! to what the layer does next. Pure functions, tested row by row; `service.rs` only
//! carries the steps out.

use std::time::Duration;

use http::StatusCode;
use idem_core::{Key, Scope};

use crate::IdempotencyError;
use crate::path::PathError;
use crate::policy::{Config, OnConflict, UnknownOutcome};

/// What a request looks like before any store is asked.
pub(crate) struct Arrival<'a> {
    /// Whether the policy protects the method (compared without regard to case).
    pub(crate) covered: bool,
    /// The normalised path, or why it is ambiguous.
    pub(crate) path: Result<(), PathError>,
    /// The key, if the request has one, or why it is unusable.
    pub(crate) key: Result<Option<Key>, IdempotencyError>,
    /// The caller's scope, worked out only for a request with a key or one to derive.
    pub(crate) scope: Option<&'a Scope>,
}

/// The first decision.
#[derive(Debug)]
pub(crate) enum Entry {
    /// Not idem's business: the inner service gets the request untouched.
    PassThrough,
    /// Answered by the layer, nothing ran.
    Refuse(IdempotencyError),
    /// A keyed request: read its body, claim its key.
    Keyed(Key),
    /// A request without a key where the policy derives one: read its body, claim the key
    /// its fingerprint makes.
    Derive,
}

pub(crate) fn on_arrival(config: &Config, arrival: Arrival<'_>) -> Entry {
    if !arrival.covered {
        return Entry::PassThrough;
    }
    if let Err(source) = arrival.path {
        return Entry::Refuse(IdempotencyError::AmbiguousPath { source });
    }
    let key = match arrival.key {
        Ok(Some(key)) => Some(key),
        Ok(None) if config.derives_keys() => None,
        Ok(None) if !config.policy.key_required => return Entry::PassThrough,
        Ok(None) => {
            return Entry::Refuse(IdempotencyError::MissingKey {
                header: config.header.clone(),
            });
        }
        Err(error) => return Entry::Refuse(error),
    };
    let anonymous = arrival.scope.is_none_or(Scope::is_anonymous);
    if config.policy.scope_required && anonymous {
        return Entry::Refuse(IdempotencyError::MissingIdentity);
    }
    match key {
        Some(key) => Entry::Keyed(key),
        // Callers without an identity all share one scope: a derived key would hand one
        // caller another's answer to the same body (and skip the second's operation). Such
        // a request is treated as a keyless one on a header-keyed route.
        None if anonymous && config.policy.key_required => {
            Entry::Refuse(IdempotencyError::MissingKey {
                header: config.header.clone(),
            })
        }
        None if anonymous => Entry::PassThrough,
        None => Entry::Derive,
    }
}

/// What the store answered a claim that was not acquired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    Completed,
    Mismatch,
    InFlight { lease_left: Duration },
    StoreFailed,
}

/// Where a claim that was refused leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterRefusal {
    /// Answer with the stored response.
    Replay,
    /// `422`.
    Mismatch,
    /// Sleep this long, then claim again (`on_conflict = "wait"`).
    WaitThenRetry(Duration),
    /// `409` with this `Retry-After`.
    Conflict { retry_after: Duration },
    /// The store failed on the first claim and the policy fails open.
    ForwardUnprotected,
    /// `503`.
    StoreUnavailable,
}

/// The waiting state of one keyed request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Waiting {
    /// Whether this is the request's first claim.
    pub(crate) first_claim: bool,
    /// Time left until `wait_timeout`.
    pub(crate) wait_left: Duration,
    /// The next pause between claims.
    pub(crate) backoff: Duration,
    /// The route's observed upstream latency, if any was observed.
    pub(crate) observed_latency: Option<Duration>,
}

pub(crate) fn after_refusal(config: &Config, refused: Refused, waiting: Waiting) -> AfterRefusal {
    let policy = &config.policy;
    match refused {
        Refused::Completed => AfterRefusal::Replay,
        Refused::Mismatch => AfterRefusal::Mismatch,
        Refused::InFlight { lease_left } => {
            if policy.on_conflict == OnConflict::Wait && !waiting.wait_left.is_zero() {
                AfterRefusal::WaitThenRetry(waiting.backoff.min(waiting.wait_left))
            } else {
                AfterRefusal::Conflict {
                    retry_after: retry_hint(
                        lease_left,
                        waiting.observed_latency,
                        policy.in_flight_retry_after,
                    ),
                }
            }
        }
        // Only the first claim may fail open: a later one follows a claim that the store
        // answered, so the key may be held by a request that is running.
        Refused::StoreFailed if waiting.first_claim && policy.fail_open => {
            AfterRefusal::ForwardUnprotected
        }
        Refused::StoreFailed => AfterRefusal::StoreUnavailable,
    }
}

/// When a `409` should tell its client to come back: when the running request is likely
/// done (its route's observed latency, or `fallback` before any was observed), never past
/// the end of its lease.
pub(crate) fn retry_hint(
    lease_left: Duration,
    observed_latency: Option<Duration>,
    fallback: Duration,
) -> Duration {
    observed_latency.unwrap_or(fallback).min(lease_left)
}

/// What the inner call came to, as far as deciding needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Upstream {
    /// It failed before anything was sent (the error carried [`NotSent`](crate::NotSent)).
    NotSent,
    /// It failed after the request may have been written.
    Failed,
    /// It did not answer within `upstream_timeout`.
    TimedOut,
    /// It answered with this status.
    Answered(StatusCode),
}

/// What becomes of the key once the inner call is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterRun {
    /// Store the answer (the response, or the unknown-outcome problem) and return it.
    Store,
    /// Nothing was processed: release the key and return the answer unstored.
    Release,
    /// The outcome is unknown and must not be replayed: keep the key claimed, without
    /// renewal, until its lease ends.
    Hold,
}

pub(crate) fn after_run(config: &Config, upstream: Upstream) -> AfterRun {
    match upstream {
        Upstream::NotSent => AfterRun::Release,
        Upstream::Failed | Upstream::TimedOut => match config.policy.unknown_outcome {
            UnknownOutcome::Store => AfterRun::Store,
            UnknownOutcome::Hold => AfterRun::Hold,
        },
        Upstream::Answered(status) if config.releases(status) => AfterRun::Release,
        Upstream::Answered(_) => AfterRun::Store,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IdempotencyPolicy;

    fn config(policy: IdempotencyPolicy) -> Config {
        policy.compile().unwrap()
    }

    fn key() -> Key {
        Key::new("k").unwrap()
    }

    fn arrival<'a>(scope: &'a Scope) -> Arrival<'a> {
        Arrival {
            covered: true,
            path: Ok(()),
            key: Ok(Some(key())),
            scope: Some(scope),
        }
    }

    fn ambiguous() -> PathError {
        crate::path::normalize_path("/a/../b").unwrap_err()
    }

    #[test]
    fn arrival_rows() {
        let anonymous = Scope::anonymous();
        let caller = Scope::new("caller");
        let default = config(IdempotencyPolicy::default());
        let required = config(IdempotencyPolicy {
            key_required: true,
            scope_required: true,
            ..IdempotencyPolicy::default()
        });
        let slug = |entry: Entry| match entry {
            Entry::Refuse(error) => error.slug(),
            Entry::PassThrough => "pass",
            Entry::Keyed(_) => "keyed",
            Entry::Derive => "derive",
        };
        // An unprotected method passes, whatever else is wrong with it.
        let unprotected = Arrival {
            covered: false,
            path: Err(ambiguous()),
            ..arrival(&anonymous)
        };
        assert_eq!(slug(on_arrival(&required, unprotected)), "pass");
        // A protected method on an ambiguous path is refused, key or not.
        let bad_path = Arrival {
            path: Err(ambiguous()),
            key: Ok(None),
            ..arrival(&caller)
        };
        assert_eq!(slug(on_arrival(&default, bad_path)), "ambiguous-path");
        // No key: passes where optional, refused where required.
        let keyless = || Arrival {
            key: Ok(None),
            ..arrival(&caller)
        };
        assert_eq!(slug(on_arrival(&default, keyless())), "pass");
        assert_eq!(slug(on_arrival(&required, keyless())), "missing-key");
        // A malformed key is refused.
        let malformed = Arrival {
            key: Err(IdempotencyError::Mismatch),
            ..arrival(&caller)
        };
        assert_eq!(slug(on_arrival(&default, malformed)), "mismatch");
        // No identity: shares the anonymous scope, unless the policy requires one.
        assert_eq!(slug(on_arrival(&default, arrival(&anonymous))), "keyed");
        assert_eq!(
            slug(on_arrival(&required, arrival(&anonymous))),
            "missing-identity"
        );
        assert_eq!(slug(on_arrival(&required, arrival(&caller))), "keyed");
        // Keys from the fingerprint: no key is derived one, even where keys are required;
        // a key of the request's own wins, a malformed one is still refused.
        let derives = config(IdempotencyPolicy {
            key_from: crate::KeyFrom::Fingerprint,
            key_required: true,
            ..IdempotencyPolicy::default()
        });
        assert_eq!(slug(on_arrival(&derives, keyless())), "derive");
        assert_eq!(slug(on_arrival(&derives, arrival(&caller))), "keyed");
        let malformed = Arrival {
            key: Err(IdempotencyError::Mismatch),
            ..arrival(&caller)
        };
        assert_eq!(slug(on_arrival(&derives, malformed)), "mismatch");
        let bad_path = Arrival {
            path: Err(ambiguous()),
            key: Ok(None),
            ..arrival(&caller)
        };
        assert_eq!(slug(on_arrival(&derives, bad_path)), "ambiguous-path");
        let derives_with_identity = config(IdempotencyPolicy {
            key_from: crate::KeyFrom::Fingerprint,
            scope_required: true,
            ..IdempotencyPolicy::default()
        });
        let anonymous_keyless = Arrival {
            key: Ok(None),
            ..arrival(&anonymous)
        };
        assert_eq!(
            slug(on_arrival(&derives_with_identity, anonymous_keyless)),
            "missing-identity"
        );
        // Without an identity nothing is derived: anonymous callers share one scope.
        let anonymous_keyless = || Arrival {
            key: Ok(None),
            ..arrival(&anonymous)
        };
        let derives_optionally = config(IdempotencyPolicy {
            key_from: crate::KeyFrom::Fingerprint,
            ..IdempotencyPolicy::default()
        });
        assert_eq!(
            slug(on_arrival(&derives_optionally, anonymous_keyless())),
            "pass"
        );
        assert_eq!(
            slug(on_arrival(&derives, anonymous_keyless())),
            "missing-key"
        );
    }

    fn waiting(first_claim: bool, wait_left: Duration) -> Waiting {
        Waiting {
            first_claim,
            wait_left,
            backoff: Duration::from_millis(40),
            observed_latency: None,
        }
    }

    #[test]
    fn refusal_rows() {
        let reject = config(IdempotencyPolicy::default());
        let wait = config(IdempotencyPolicy {
            on_conflict: OnConflict::Wait,
            fail_open: true,
            ..IdempotencyPolicy::default()
        });
        let long = Duration::from_secs(5);
        let in_flight = Refused::InFlight {
            lease_left: Duration::from_secs(59),
        };
        assert_eq!(
            after_refusal(&reject, Refused::Completed, waiting(true, long)),
            AfterRefusal::Replay
        );
        assert_eq!(
            after_refusal(&reject, Refused::Mismatch, waiting(true, long)),
            AfterRefusal::Mismatch
        );
        assert_eq!(
            after_refusal(&reject, in_flight, waiting(true, long)),
            AfterRefusal::Conflict {
                retry_after: Duration::from_secs(1)
            }
        );
        assert_eq!(
            after_refusal(&wait, in_flight, waiting(true, long)),
            AfterRefusal::WaitThenRetry(Duration::from_millis(40))
        );
        assert_eq!(
            after_refusal(&wait, in_flight, waiting(false, Duration::from_millis(10))),
            AfterRefusal::WaitThenRetry(Duration::from_millis(10))
        );
        assert_eq!(
            after_refusal(&wait, in_flight, waiting(false, Duration::ZERO)),
            AfterRefusal::Conflict {
                retry_after: Duration::from_secs(1)
            }
        );
        assert_eq!(
            after_refusal(&reject, Refused::StoreFailed, waiting(true, long)),
            AfterRefusal::StoreUnavailable
        );
        assert_eq!(
            after_refusal(&wait, Refused::StoreFailed, waiting(true, long)),
            AfterRefusal::ForwardUnprotected
        );
        assert_eq!(
            after_refusal(&wait, Refused::StoreFailed, waiting(false, long)),
            AfterRefusal::StoreUnavailable
        );
    }

    #[test]
    fn retry_hint_follows_latency_and_never_passes_the_lease() {
        let second = Duration::from_secs(1);
        let lease_left = Duration::from_secs(59);
        assert_eq!(retry_hint(lease_left, None, second), second);
        let observed = Some(Duration::from_millis(1600));
        assert_eq!(
            retry_hint(lease_left, observed, second),
            Duration::from_millis(1600)
        );
        assert_eq!(
            retry_hint(Duration::from_millis(300), observed, second),
            Duration::from_millis(300)
        );
    }

    #[test]
    fn upstream_rows() {
        let stores = config(IdempotencyPolicy {
            release_statuses: vec![503],
            ..IdempotencyPolicy::default()
        });
        let holds = config(IdempotencyPolicy {
            unknown_outcome: UnknownOutcome::Hold,
            store_server_errors: false,
            ..IdempotencyPolicy::default()
        });
        let answered = |code: u16| Upstream::Answered(StatusCode::from_u16(code).unwrap());
        assert_eq!(after_run(&stores, Upstream::NotSent), AfterRun::Release);
        assert_eq!(after_run(&stores, Upstream::Failed), AfterRun::Store);
        assert_eq!(after_run(&stores, Upstream::TimedOut), AfterRun::Store);
        assert_eq!(after_run(&holds, Upstream::Failed), AfterRun::Hold);
        assert_eq!(after_run(&holds, Upstream::TimedOut), AfterRun::Hold);
        for code in [200, 201, 400, 404, 409, 422, 500, 502] {
            assert_eq!(
                after_run(&stores, answered(code)),
                AfterRun::Store,
                "{code}"
            );
        }
        for code in [408, 425, 429, 503] {
            assert_eq!(
                after_run(&stores, answered(code)),
                AfterRun::Release,
                "{code}"
            );
        }
        assert_eq!(after_run(&holds, answered(500)), AfterRun::Release);
        assert_eq!(after_run(&holds, answered(201)), AfterRun::Store);
    }
}
