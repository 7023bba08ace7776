//! A randomized model test: sequences of calls from several actors, with time moving,
//! checked step by step against a small reference model of the store contract.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use super::{fingerprint, scoped};
use crate::{Begin, Clock, ManualClock, RecordState, Store, StoreError, Stored, Token, transition};

const KEYS: usize = 3;
const ACTORS: usize = 3;

/// One step of a scenario.
#[derive(Debug, Clone)]
pub enum Op {
    /// `actor` calls `begin` on `key` with fingerprint number `fp`.
    Begin {
        /// Who calls.
        actor: usize,
        /// Which key.
        key: usize,
        /// Which of two fingerprints.
        fp: usize,
        /// Lease, in seconds (some past [`transition::MAX_SPAN`]).
        lease_secs: u64,
    },
    /// `actor` completes `key` with the last token it got for it.
    Complete {
        /// Who calls.
        actor: usize,
        /// Which key.
        key: usize,
        /// Status to store.
        status: u16,
        /// Retention, in seconds (some past [`transition::MAX_SPAN`]).
        retain_secs: u64,
    },
    /// `actor` releases `key`.
    Release {
        /// Who calls.
        actor: usize,
        /// Which key.
        key: usize,
    },
    /// `actor` renews its lease on `key`.
    Renew {
        /// Who calls.
        actor: usize,
        /// Which key.
        key: usize,
        /// New lease, in seconds (some past [`transition::MAX_SPAN`]).
        lease_secs: u64,
    },
    /// Reads `key`.
    Get {
        /// Which key.
        key: usize,
    },
    /// Deletes `key`.
    Delete {
        /// Which key.
        key: usize,
    },
    /// Sweeps expired records.
    Sweep,
    /// Lets time pass.
    Advance {
        /// Milliseconds.
        millis: u64,
    },
}

/// Mostly ordinary seconds below `max`, now and then a span no store accepts.
fn seconds(max: u64) -> impl Strategy<Value = u64> + Clone {
    prop_oneof![
        30 => 1..max,
        1 => Just(transition::MAX_SPAN.as_secs() + 1),
        1 => Just(u64::MAX),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let actor = 0..ACTORS;
    let key = 0..KEYS;
    prop_oneof![
        4 => (actor.clone(), key.clone(), 0..2usize, seconds(20))
            .prop_map(|(actor, key, fp, lease_secs)| Op::Begin { actor, key, fp, lease_secs }),
        3 => (actor.clone(), key.clone(), 200..205u16, seconds(40)).prop_map(
            |(actor, key, status, retain_secs)| Op::Complete { actor, key, status, retain_secs }
        ),
        1 => (actor.clone(), key.clone()).prop_map(|(actor, key)| Op::Release { actor, key }),
        1 => (actor, key.clone(), seconds(20))
            .prop_map(|(actor, key, lease_secs)| Op::Renew { actor, key, lease_secs }),
        1 => key.clone().prop_map(|key| Op::Get { key }),
        1 => key.prop_map(|key| Op::Delete { key }),
        1 => Just(Op::Sweep),
        3 => prop_oneof![Just(0u64), 1..3_000u64, 5_000..25_000u64]
            .prop_map(|millis| Op::Advance { millis }),
    ]
}

/// The reference: what the contract says a key's record is.
#[derive(Debug, Clone)]
struct Modelled {
    fp: usize,
    token: Token,
    /// Lease end, or retention end once completed.
    until: SystemTime,
    /// Until when the store keeps the record: one lease length past the lease end while in
    /// flight (for a late complete), the retention end once completed.
    kept: SystemTime,
    completed: Option<u16>,
}

#[derive(Debug, Default)]
struct Model {
    records: HashMap<usize, Modelled>,
    highest_token: HashMap<usize, Token>,
    held: HashMap<(usize, usize), Token>,
}

impl Model {
    fn live(&self, key: usize, now: SystemTime) -> Option<&Modelled> {
        self.records.get(&key).filter(|r| now < r.until)
    }

    /// The record while the store keeps it, expired in-flight records included.
    fn kept(&self, key: usize, now: SystemTime) -> Option<&Modelled> {
        self.records.get(&key).filter(|r| now < r.kept)
    }

    fn held_by(&self, actor: usize, key: usize, now: SystemTime) -> Option<Token> {
        let token = *self.held.get(&(actor, key))?;
        let record = self.live(key, now)?;
        (record.token == token && record.completed.is_none()).then_some(token)
    }
}

fn lost<T: std::fmt::Debug>(result: &Result<T, StoreError>) -> bool {
    matches!(result, Err(StoreError::LeaseLost))
}

fn out_of_range<T: std::fmt::Debug>(result: &Result<T, StoreError>) -> bool {
    matches!(result, Err(StoreError::DurationOutOfRange { .. }))
}

fn too_long(d: Duration) -> bool {
    d > transition::MAX_SPAN
}

async fn run<S: Store>(
    store: Arc<S>,
    clock: ManualClock,
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    let mut model = Model::default();
    for (step, op) in ops.into_iter().enumerate() {
        let now = clock.now();
        let at = format!("step {step}: {op:?}");
        match op {
            Op::Begin {
                actor,
                key,
                fp,
                lease_secs,
            } => {
                let lease = Duration::from_secs(lease_secs);
                let answer = store
                    .begin(
                        &scoped(&key.to_string()),
                        &fingerprint(&fp.to_string()),
                        lease,
                    )
                    .await;
                if too_long(lease) {
                    prop_assert!(out_of_range(&answer), "{}: got {:?}", at, answer);
                    continue;
                }
                match (model.live(key, now).cloned(), answer) {
                    (Some(r), Ok(Begin::Mismatch)) if r.fp != fp => {}
                    (Some(r), Ok(Begin::InFlight { retry_after }))
                        if r.fp == fp && r.completed.is_none() =>
                    {
                        let left = r.until.duration_since(now).unwrap_or_default();
                        prop_assert_eq!(retry_after, left.max(Duration::from_millis(1)), "{}", at);
                    }
                    (Some(r), Ok(Begin::Completed { stored, expires_at }))
                        if r.fp == fp && r.completed.is_some() =>
                    {
                        prop_assert_eq!(Some(stored.status), r.completed, "{}", at);
                        prop_assert_eq!(expires_at, r.until, "{}", at);
                    }
                    (None, Ok(Begin::Acquired(lease_got))) => {
                        if let Some(highest) = model.highest_token.get(&key) {
                            prop_assert!(lease_got.token > *highest, "{}: token went back", at);
                        }
                        prop_assert_eq!(lease_got.expires_at, now + lease, "{}", at);
                        model.highest_token.insert(key, lease_got.token);
                        model.held.insert((actor, key), lease_got.token);
                        model.records.insert(
                            key,
                            Modelled {
                                fp,
                                token: lease_got.token,
                                until: now + lease,
                                kept: now + lease + lease,
                                completed: None,
                            },
                        );
                    }
                    (expected, got) => {
                        return Err(TestCaseError::fail(format!(
                            "{at}: model has {expected:?}, store answered {got:?}"
                        )));
                    }
                }
            }
            Op::Complete {
                actor,
                key,
                status,
                retain_secs,
            } => {
                let Some(token) = model.held.get(&(actor, key)).copied() else {
                    continue;
                };
                let retain = Duration::from_secs(retain_secs);
                let result = store
                    .complete(
                        &scoped(&key.to_string()),
                        token,
                        &Stored::new(status),
                        retain,
                    )
                    .await;
                if too_long(retain) {
                    prop_assert!(out_of_range(&result), "{}: got {:?}", at, result);
                    continue;
                }
                match model.kept(key, now).cloned() {
                    // The holder of the current token completes, even past its lease.
                    Some(r) if r.token == token && r.completed.is_none() => {
                        prop_assert_eq!(result.ok(), Some(now + retain), "{}", at);
                        if let Some(record) = model.records.get_mut(&key) {
                            record.until = now + retain;
                            record.kept = now + retain;
                            record.completed = Some(status);
                        }
                    }
                    // A repeat by the token that completed it: answered, nothing changes.
                    Some(r) if r.token == token && now < r.until => {
                        prop_assert_eq!(result.ok(), Some(r.until), "{}", at);
                    }
                    _ => prop_assert!(
                        lost(&result),
                        "{}: expected LeaseLost, got {:?}",
                        at,
                        result
                    ),
                }
            }
            Op::Release { actor, key } => {
                let Some(token) = model.held.get(&(actor, key)).copied() else {
                    continue;
                };
                let result = store.release(&scoped(&key.to_string()), token).await;
                if model.held_by(actor, key, now).is_some() {
                    prop_assert!(result.is_ok(), "{}: {:?}", at, result);
                    model.records.remove(&key);
                } else {
                    prop_assert!(
                        lost(&result),
                        "{}: expected LeaseLost, got {:?}",
                        at,
                        result
                    );
                }
            }
            Op::Renew {
                actor,
                key,
                lease_secs,
            } => {
                let Some(token) = model.held.get(&(actor, key)).copied() else {
                    continue;
                };
                let lease = Duration::from_secs(lease_secs);
                let result = store.renew(&scoped(&key.to_string()), token, lease).await;
                if too_long(lease) {
                    prop_assert!(out_of_range(&result), "{}: got {:?}", at, result);
                } else if model.held_by(actor, key, now).is_some() {
                    prop_assert_eq!(
                        result.ok().map(|l| l.expires_at),
                        Some(now + lease),
                        "{}",
                        at
                    );
                    if let Some(record) = model.records.get_mut(&key) {
                        record.until = now + lease;
                        record.kept = now + lease + lease;
                    }
                } else {
                    prop_assert!(
                        lost(&result),
                        "{}: expected LeaseLost, got {:?}",
                        at,
                        result
                    );
                }
            }
            Op::Get { key } => {
                let got = store
                    .get(&scoped(&key.to_string()))
                    .await
                    .map_err(|e| TestCaseError::fail(format!("{at}: {e}")))?;
                match (model.live(key, now), got) {
                    (None, None) => {}
                    (Some(expected), Some(record)) => {
                        prop_assert_eq!(record.token, expected.token, "{}", at);
                        prop_assert_eq!(
                            record.fingerprint,
                            fingerprint(&expected.fp.to_string()),
                            "{}",
                            at
                        );
                        prop_assert_eq!(record.expires_at(), expected.until, "{}", at);
                        let status = match &record.state {
                            RecordState::InFlight { .. } => None,
                            RecordState::Completed { stored, .. } => Some(stored.status),
                        };
                        prop_assert_eq!(status, expected.completed, "{}", at);
                    }
                    (expected, got) => {
                        return Err(TestCaseError::fail(format!(
                            "{at}: model has {expected:?}, store has {got:?}"
                        )));
                    }
                }
            }
            Op::Delete { key } => {
                let existed = store.delete(&scoped(&key.to_string())).await;
                prop_assert_eq!(existed.ok(), Some(model.live(key, now).is_some()), "{}", at);
                model.records.remove(&key);
            }
            Op::Sweep => {
                let removed = store.sweep(usize::MAX).await;
                prop_assert!(removed.is_ok(), "{}: {:?}", at, removed);
                model.records.retain(|_, r| now < r.kept);
            }
            Op::Advance { millis } => clock.advance(Duration::from_millis(millis)),
        }
    }
    Ok(())
}

/// Runs random scenarios against stores from `make` (one fresh store per scenario, on the
/// clock it is given) and fails with the shrunk, smallest failing scenario.
///
/// The number of scenarios is `PROPTEST_CASES` from the environment, else 128.
///
/// ```
/// use idem_core::MemoryStore;
///
/// idem_core::testing::model::check(MemoryStore::with_clock);
/// ```
pub fn check<S: Store>(make: impl Fn(ManualClock) -> S) {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => panic!("cannot start a runtime for the model test: {error}"),
    };
    let mut runner = TestRunner::new(Config {
        cases,
        ..Config::default()
    });
    let outcome = runner.run(&proptest::collection::vec(op(), 1..80), |ops| {
        let clock = ManualClock::new();
        let store = Arc::new(make(clock.clone()));
        runtime.block_on(run(store, clock, ops))
    });
    if let Err(failure) = outcome {
        panic!("store diverged from the model: {failure}");
    }
}
