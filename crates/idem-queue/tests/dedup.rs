//! The broker-independent deduplicator, on the memory store.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use idem::{
    Begin, Fingerprint, Lease, MemoryStore, Record, RecordState, Scope, ScopedKey, Store,
    StoreError, Stored, Token,
};
use idem_queue::{
    Attempt, ConfigError, DeadLetter, DeadLetterReason, DedupError, DedupOptions, Deduplicator,
    HandlerError, Outcome, ResultExt, status,
};

fn dedup_with(options: DedupOptions) -> Deduplicator<Arc<MemoryStore>> {
    Deduplicator::with_options(Arc::new(MemoryStore::new()), Scope::new("test"), options).unwrap()
}

fn short_lease() -> DedupOptions {
    DedupOptions {
        lease: Duration::from_millis(150),
        ..DedupOptions::default()
    }
}

#[tokio::test]
async fn runs_once_and_replays_the_stored_output() {
    let dedup = dedup_with(DedupOptions::default());
    let runs = AtomicUsize::new(0);
    let handler = || async {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, HandlerError>("done")
    };
    let first = dedup.process("m-1", handler).await.unwrap();
    assert!(matches!(first, Outcome::Processed { ref output } if output == "done"));
    for _ in 0..3 {
        match dedup.process("m-1", handler).await.unwrap() {
            Outcome::Duplicate(replay) => {
                assert!(replay.succeeded());
                assert_eq!(replay.status(), status::OK);
                assert_eq!(replay.output().unwrap(), "done");
                assert!(replay.expires_at() > SystemTime::now() + Duration::from_secs(6 * 86_400));
            }
            other => panic!("expected a duplicate, got {other:?}"),
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // Another id is another message.
    assert!(matches!(
        dedup.process("m-2", handler).await.unwrap(),
        Outcome::Processed { .. }
    ));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_deliveries_of_one_message_run_it_once() {
    let dedup = dedup_with(DedupOptions::default());
    let runs = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (dedup, runs) = (dedup.clone(), Arc::clone(&runs));
            tokio::spawn(async move {
                dedup
                    .process("hot", || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok::<_, HandlerError>(Bytes::new())
                    })
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut processed = 0;
    for task in tasks {
        match task.await.unwrap() {
            Outcome::Processed { .. } => processed += 1,
            Outcome::InFlight { retry_after } => assert!(retry_after > Duration::ZERO),
            Outcome::Duplicate(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(processed, 1);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn transient_errors_release_and_permanent_ones_are_kept() {
    let dedup = dedup_with(DedupOptions::default());

    let outcome = dedup
        .process("t", || async {
            Err::<Bytes, _>(HandlerError::transient("busy"))
        })
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Released { ref error } if !error.is_permanent()));
    assert!(dedup.record("t").await.unwrap().is_none(), "released");
    assert!(matches!(
        dedup
            .process("t", || async { Ok("second try") })
            .await
            .unwrap(),
        Outcome::Processed { .. }
    ));

    let outcome = dedup
        .process("p", || async {
            "not a number"
                .parse::<u32>()
                .permanent()
                .map(|n| n.to_string())
        })
        .await
        .unwrap();
    let Outcome::Failed { error, reason } = outcome else {
        panic!("expected a failure")
    };
    assert!(error.is_permanent());
    assert_eq!(reason, DeadLetterReason::Permanent);
    let ran = AtomicBool::new(false);
    match dedup
        .process("p", || async {
            ran.store(true, Ordering::SeqCst);
            Ok("")
        })
        .await
        .unwrap()
    {
        Outcome::Duplicate(replay) => {
            assert!(!replay.succeeded());
            assert_eq!(replay.failure(), Some(DeadLetterReason::Permanent));
            assert!(replay.error().unwrap().contains("invalid digit"));
        }
        other => panic!("expected a duplicate, got {other:?}"),
    }
    assert!(
        !ran.load(Ordering::SeqCst),
        "a permanent failure is never retried"
    );
}

#[tokio::test]
async fn the_last_delivery_gives_up_instead_of_releasing() {
    let dedup = dedup_with(DedupOptions::default());
    let fail = || async { Err::<Bytes, _>(std::io::Error::other("down").into()) };
    for delivered in 1..3 {
        let outcome = dedup
            .process_with("x", None, Attempt::new(delivered, Some(3)), fail)
            .await
            .unwrap();
        assert!(matches!(outcome, Outcome::Released { .. }), "{outcome:?}");
    }
    let outcome = dedup
        .process_with("x", None, Attempt::new(3, Some(3)), fail)
        .await
        .unwrap();
    assert!(matches!(
        outcome,
        Outcome::Failed {
            reason: DeadLetterReason::MaxDeliveries,
            ..
        }
    ));
    let record = dedup.record("x").await.unwrap().unwrap();
    let RecordState::Completed { stored, .. } = record.state else {
        panic!("completed")
    };
    assert_eq!(stored.status, status::GAVE_UP);
}

#[tokio::test]
async fn a_long_handler_keeps_its_lease() {
    let dedup = dedup_with(short_lease());
    let other = dedup.clone();
    let running = dedup.process("long", || async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        Ok("finished")
    });
    let meanwhile = async {
        // Four leases into the handler, the message is still held.
        tokio::time::sleep(Duration::from_millis(450)).await;
        other
            .process("long", || async { Ok("stolen") })
            .await
            .unwrap()
    };
    let (outcome, stolen) = tokio::join!(running, meanwhile);
    assert!(matches!(stolen, Outcome::InFlight { .. }), "{stolen:?}");
    assert!(matches!(outcome.unwrap(), Outcome::Processed { output } if output == "finished"));
}

#[tokio::test]
async fn a_lost_lease_is_reported_and_nothing_is_stored() {
    let dedup = dedup_with(short_lease());
    let thief = dedup.clone();
    let running = dedup.process("lost", || async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        Ok("late")
    });
    let takeover = async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Another consumer's takeover, as after an expired lease.
        assert!(thief.forget("lost").await.unwrap());
        thief
            .process("lost", || async {
                tokio::time::sleep(Duration::from_millis(500)).await;
                Ok("winner")
            })
            .await
            .unwrap()
    };
    let (outcome, winner) = tokio::join!(running, takeover);
    match outcome.unwrap() {
        Outcome::LeaseLost { result } => assert_eq!(result.unwrap(), "late"),
        other => panic!("expected a lost lease, got {other:?}"),
    }
    assert!(matches!(winner, Outcome::Processed { output } if output == "winner"));
}

#[tokio::test]
async fn fingerprints_tell_a_reused_id_from_a_duplicate() {
    let dedup = dedup_with(DedupOptions::default());
    let a = Fingerprint::builder().part("payload", b"a").finish();
    let b = Fingerprint::builder().part("payload", b"b").finish();
    let ok = || async { Ok("") };
    assert!(matches!(
        dedup
            .process_with("id", Some(&a), Attempt::first(), ok)
            .await
            .unwrap(),
        Outcome::Processed { .. }
    ));
    assert!(matches!(
        dedup
            .process_with("id", Some(&a), Attempt::first(), ok)
            .await
            .unwrap(),
        Outcome::Duplicate(_)
    ));
    assert!(matches!(
        dedup
            .process_with("id", Some(&b), Attempt::first(), ok)
            .await
            .unwrap(),
        Outcome::Mismatch
    ));
}

#[tokio::test]
async fn dead_letters_are_written_once_and_read_back() {
    let dedup = dedup_with(DedupOptions::default());
    let letter = DeadLetter {
        id: "poison".into(),
        reason: DeadLetterReason::MaxDeliveries,
        deliveries: 5,
        error: Some("boom".into()),
        origin: "test".into(),
        payload: Bytes::from_static(b"\xff\x00payload"),
    };
    assert!(dedup.dead_letter(&letter).await.unwrap());
    let second = DeadLetter {
        deliveries: 6,
        ..letter.clone()
    };
    assert!(!dedup.dead_letter(&second).await.unwrap());
    assert_eq!(
        dedup.dead_letter_record("poison").await.unwrap(),
        Some(letter)
    );
    assert_eq!(dedup.dead_letter_record("other").await.unwrap(), None);
    // Dead letters live in their own scope: the message id itself is untouched.
    assert!(dedup.record("poison").await.unwrap().is_none());
}

#[tokio::test]
async fn ids_that_are_not_keys_are_hashed_and_empty_ids_refused() {
    let dedup = dedup_with(DedupOptions::default());
    let long = "x".repeat(1_000);
    for id in [long.as_str(), "ünïcødé", "tab\tseparated"] {
        assert!(matches!(
            dedup.process(id, || async { Ok("") }).await.unwrap(),
            Outcome::Processed { .. }
        ));
        assert!(matches!(
            dedup.process(id, || async { Ok("") }).await.unwrap(),
            Outcome::Duplicate(_)
        ));
    }
    assert!(matches!(
        dedup.process("", || async { Ok("") }).await,
        Err(DedupError::InvalidId(_))
    ));
}

#[test]
fn options_name_the_bad_field() {
    let check = |options: DedupOptions| options.validate().map_err(|e: ConfigError| e.field);
    assert_eq!(check(DedupOptions::default()), Ok(()));
    assert_eq!(
        check(DedupOptions {
            lease: Duration::ZERO,
            ..DedupOptions::default()
        }),
        Err("lease")
    );
    assert_eq!(
        check(DedupOptions {
            renew_every: Some(Duration::from_secs(30)),
            ..DedupOptions::default()
        }),
        Err("renew_every")
    );
    assert_eq!(
        check(DedupOptions {
            retention: Duration::from_secs(1),
            ..DedupOptions::default()
        }),
        Err("retention")
    );
    assert_eq!(
        check(DedupOptions {
            complete_attempts: 0,
            ..DedupOptions::default()
        }),
        Err("complete_attempts")
    );
}

/// A memory store whose `complete` fails the first `failures` times.
#[derive(Debug, Default)]
struct FlakyComplete {
    inner: MemoryStore,
    failures: AtomicUsize,
}

#[async_trait]
impl Store for FlakyComplete {
    async fn begin(
        &self,
        key: &ScopedKey,
        fp: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        self.inner.begin(key, fp, lease).await
    }
    async fn complete(
        &self,
        key: &ScopedKey,
        token: Token,
        stored: &Stored,
        retain: Duration,
    ) -> Result<SystemTime, StoreError> {
        if self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(StoreError::backend("complete", "injected failure"));
        }
        self.inner.complete(key, token, stored, retain).await
    }
    async fn release(&self, key: &ScopedKey, token: Token) -> Result<(), StoreError> {
        self.inner.release(key, token).await
    }
    async fn renew(
        &self,
        key: &ScopedKey,
        token: Token,
        lease: Duration,
    ) -> Result<Lease, StoreError> {
        self.inner.renew(key, token, lease).await
    }
    async fn get(&self, key: &ScopedKey) -> Result<Option<Record>, StoreError> {
        self.inner.get(key).await
    }
    async fn delete(&self, key: &ScopedKey) -> Result<bool, StoreError> {
        self.inner.delete(key).await
    }
    async fn sweep(&self, limit: usize) -> Result<usize, StoreError> {
        self.inner.sweep(limit).await
    }
}

#[tokio::test]
async fn storing_the_outcome_is_retried_then_reported_unrecorded() {
    let store = Arc::new(FlakyComplete::default());
    let dedup = Deduplicator::new(Arc::clone(&store), Scope::new("flaky"));
    store.failures.store(2, Ordering::SeqCst);
    assert!(matches!(
        dedup.process("a", || async { Ok("") }).await.unwrap(),
        Outcome::Processed { .. }
    ));
    store.failures.store(3, Ordering::SeqCst);
    assert!(matches!(
        dedup.process("b", || async { Ok("") }).await,
        Err(DedupError::Unrecorded(StoreError::Backend { .. }))
    ));
}
