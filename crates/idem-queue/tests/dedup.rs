//! The broker-independent deduplicator: its contract on every store (memory, redb, Redis,
//! Postgres), then what only a memory store with injected faults or a paused clock can show.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use idem_core::testing::FaultyStore;
use idem_core::{
    Begin, Clock, Fingerprint, Key, MemoryStore, RecordState, Scope, ScopedKey, Store, StoreError,
};
use idem_postgres::{PostgresOptions, PostgresStore};
use idem_queue::{
    Claim, DeadLetter, DeadLetterEntry, DeadLetterReason, DedupError, DedupOptions, Deduplicator,
    DeliveryAttempt, HandlerError, OptionsError, Outcome, ResultExt, RetryPolicy, Settlement,
    status,
};
use idem_redb::RedbStore;
use idem_redis::{RedisOptions, RedisStore};
use idem_testkit::{PostgresSchema, RedisPrefix};

/// A store under test, with whatever must outlive it: its file's directory, its Redis
/// prefix or its Postgres schema (removed when the test ends).
struct Backend {
    store: Arc<dyn Store>,
    /// The lease of the tests that watch leases end or hold: short, but several store round
    /// trips long even on a loaded machine (renewals are every third of it).
    lease: Duration,
    _keep: Box<dyn Any + Send>,
}

/// The lease for timing tests on a store across the network or on disk.
const SERVER_LEASE: Duration = Duration::from_millis(500);

impl Backend {
    async fn memory() -> Self {
        Self {
            store: Arc::new(MemoryStore::new()),
            lease: Duration::from_millis(150),
            _keep: Box::new(()),
        }
    }

    async fn redb() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = RedbStore::open(dir.path().join("idem.redb")).expect("open redb");
        Self {
            store: Arc::new(store),
            lease: SERVER_LEASE,
            _keep: Box::new(dir),
        }
    }

    async fn redis() -> Self {
        let prefix = RedisPrefix::new("queue-dedup");
        let options = RedisOptions {
            prefix: prefix.name().to_owned(),
            ..RedisOptions::default()
        };
        let store = RedisStore::connect_with(&idem_testkit::redis_url(), options)
            .await
            .expect("connect to Redis");
        Self {
            store: Arc::new(store),
            lease: SERVER_LEASE,
            _keep: Box::new(prefix),
        }
    }

    async fn postgres() -> Self {
        let schema = PostgresSchema::new("queue_dedup");
        let options = PostgresOptions::new()
            .table(format!("{}.records", schema.name()))
            .max_connections(8);
        let store = PostgresStore::connect_with(&idem_testkit::database_url(), &options)
            .await
            .expect("connect to Postgres");
        Self {
            store: Arc::new(store),
            lease: SERVER_LEASE,
            _keep: Box::new(schema),
        }
    }
}

/// Runs each listed `async fn(Backend)` as a test on every store: `memory::name`,
/// `redb::name`, `redis::name`, `postgres::name`.
macro_rules! on_every_store {
    ($($test:ident),* $(,)?) => {
        on_every_store!(@store memory: $($test),*);
        on_every_store!(@store redb: $($test),*);
        on_every_store!(@store redis: $($test),*);
        on_every_store!(@store postgres: $($test),*);
    };
    (@store $store:ident: $($test:ident),*) => {
        mod $store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    super::$test(super::Backend::$store().await).await;
                }
            )*
        }
    };
}

on_every_store!(
    runs_once_and_replays_the_stored_output,
    concurrent_deliveries_of_one_message_run_it_once,
    transient_errors_release_and_permanent_ones_are_kept,
    the_last_delivery_gives_up_instead_of_releasing,
    a_long_handler_keeps_its_lease,
    a_lost_lease_is_reported_and_nothing_is_stored,
    fingerprints_tell_a_reused_id_from_a_duplicate,
    dead_letters_are_written_once_and_read_back,
    ids_that_are_not_keys_are_hashed_and_empty_ids_refused,
    a_handler_that_blocks_its_thread_keeps_its_lease,
    forget_clears_the_dead_letter_too,
    a_forgotten_message_starts_again_at_attempt_one,
    dead_letters_are_listed_oldest_first_with_reason_and_deliveries,
    concurrent_dead_letters_are_all_listed,
    a_dead_writer_s_hole_in_the_index_hides_no_dead_letter,
);

fn dedup_with(backend: &Backend, options: DedupOptions) -> Deduplicator<Arc<dyn Store>> {
    Deduplicator::with_options(Arc::clone(&backend.store), Scope::new("test"), options).unwrap()
}

fn short_lease(backend: &Backend) -> DedupOptions {
    DedupOptions {
        lease: backend.lease,
        ..DedupOptions::default()
    }
}

async fn runs_once_and_replays_the_stored_output(backend: Backend) {
    let dedup = dedup_with(&backend, DedupOptions::default());
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

async fn concurrent_deliveries_of_one_message_run_it_once(backend: Backend) {
    let dedup = dedup_with(&backend, DedupOptions::default());
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

async fn transient_errors_release_and_permanent_ones_are_kept(backend: Backend) {
    let dedup = dedup_with(&backend, DedupOptions::default());

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

async fn the_last_delivery_gives_up_instead_of_releasing(backend: Backend) {
    let dedup = dedup_with(&backend, DedupOptions::default());
    let fail = || async { Err::<Bytes, _>(std::io::Error::other("down").into()) };
    for delivered in 1..3 {
        let outcome = dedup
            .process_with("x", None, DeliveryAttempt::new(delivered, Some(3)), fail)
            .await
            .unwrap();
        assert!(matches!(outcome, Outcome::Released { .. }), "{outcome:?}");
    }
    let outcome = dedup
        .process_with("x", None, DeliveryAttempt::new(3, Some(3)), fail)
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

async fn a_long_handler_keeps_its_lease(backend: Backend) {
    let dedup = dedup_with(&backend, short_lease(&backend));
    let other = dedup.clone();
    let lease = backend.lease;
    let running = dedup.process("long", || async {
        tokio::time::sleep(lease * 4).await;
        Ok("finished")
    });
    let meanwhile = async {
        // Four leases into the handler, the message is still held.
        tokio::time::sleep(lease * 3).await;
        other
            .process("long", || async { Ok("stolen") })
            .await
            .unwrap()
    };
    let (outcome, stolen) = tokio::join!(running, meanwhile);
    assert!(matches!(stolen, Outcome::InFlight { .. }), "{stolen:?}");
    assert!(matches!(outcome.unwrap(), Outcome::Processed { output } if output == "finished"));
}

async fn a_lost_lease_is_reported_and_nothing_is_stored(backend: Backend) {
    let dedup = dedup_with(&backend, short_lease(&backend));
    let thief = dedup.clone();
    let lease = backend.lease;
    let running = dedup.process("lost", || async {
        tokio::time::sleep(lease * 8 / 3).await;
        Ok("late")
    });
    let takeover = async {
        // Once the first consumer holds it (on a loaded machine, that may take a while).
        while thief.record("lost").await.unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Another consumer's takeover, as after an expired lease.
        assert!(thief.forget("lost").await.unwrap());
        thief
            .process("lost", || async {
                tokio::time::sleep(lease * 10 / 3).await;
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

async fn fingerprints_tell_a_reused_id_from_a_duplicate(backend: Backend) {
    let dedup = dedup_with(&backend, DedupOptions::default());
    let a = Fingerprint::builder().part("payload", b"a").finish();
    let b = Fingerprint::builder().part("payload", b"b").finish();
    let ok = || async { Ok("") };
    assert!(matches!(
        dedup
            .process_with("id", Some(&a), DeliveryAttempt::first(), ok)
            .await
            .unwrap(),
        Outcome::Processed { .. }
    ));
    assert!(matches!(
        dedup
            .process_with("id", Some(&a), DeliveryAttempt::first(), ok)
            .await
            .unwrap(),
        Outcome::Duplicate(_)
    ));
    assert!(matches!(
        dedup
            .process_with("id", Some(&b), DeliveryAttempt::first(), ok)
            .await
            .unwrap(),
        Outcome::Mismatch
    ));
}

async fn dead_letters_are_written_once_and_read_back(backend: Backend) {
    let dedup = dedup_with(&backend, DedupOptions::default());
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

fn letter(id: &str, reason: DeadLetterReason, deliveries: u64) -> DeadLetter {
    DeadLetter {
        id: id.into(),
        reason,
        deliveries,
        error: Some(format!("{id} failed")),
        origin: "test".into(),
        payload: Bytes::from(format!("payload of {id}")),
    }
}

fn ids(listed: &[DeadLetterEntry]) -> Vec<&str> {
    listed
        .iter()
        .map(|entry| entry.letter.id.as_str())
        .collect()
}

fn a_day_ago() -> SystemTime {
    SystemTime::now() - Duration::from_secs(86_400)
}

async fn forget_clears_the_dead_letter_too(backend: Backend) {
    let dedup = dedup_with(&backend, DedupOptions::default());
    let fail = || async { "x".parse::<u32>().permanent().map(|n| n.to_string()) };
    let outcome = dedup.process("poison", fail).await.unwrap();
    assert!(matches!(outcome, Outcome::Failed { .. }), "{outcome:?}");
    assert!(
        dedup
            .dead_letter(&letter("poison", DeadLetterReason::Permanent, 1))
            .await
            .unwrap()
    );

    assert!(dedup.forget("poison").await.unwrap());
    assert!(dedup.record("poison").await.unwrap().is_none());
    assert_eq!(dedup.dead_letter_record("poison").await.unwrap(), None);
    assert_eq!(
        ids(&dedup.dead_letters(a_day_ago(), 100).await.unwrap()),
        Vec::<&str>::new()
    );
    assert!(
        !dedup.forget("poison").await.unwrap(),
        "nothing left to forget"
    );

    // A dead letter without a message record (kept by a store that lost the message's, or
    // written by hand) is forgotten too.
    assert!(
        dedup
            .dead_letter(&letter("orphan", DeadLetterReason::Mismatch, 2))
            .await
            .unwrap()
    );
    assert!(dedup.forget("orphan").await.unwrap());
    assert_eq!(dedup.dead_letter_record("orphan").await.unwrap(), None);

    // Replayed, it runs again; failing again, it is dead-lettered again, listed once, with
    // the new record's fields.
    let outcome = dedup.process("poison", fail).await.unwrap();
    assert!(
        matches!(outcome, Outcome::Failed { .. }),
        "ran again: {outcome:?}"
    );
    assert!(
        dedup
            .dead_letter(&letter("poison", DeadLetterReason::Permanent, 7))
            .await
            .unwrap()
    );
    let listed = dedup.dead_letters(a_day_ago(), 100).await.unwrap();
    assert_eq!(ids(&listed), ["poison"]);
    assert_eq!(listed[0].letter.deliveries, 7);
}

async fn a_forgotten_message_starts_again_at_attempt_one(backend: Backend) {
    let dedup = dedup_with(&backend, DedupOptions::default());
    let fail = || async { Err::<Bytes, _>(HandlerError::transient("downstream down")) };
    let limit = DeliveryAttempt::limit(Some(3));
    for _ in 0..2 {
        let outcome = dedup
            .process_with("retry", None, limit, fail)
            .await
            .unwrap();
        assert!(matches!(outcome, Outcome::Released { .. }), "{outcome:?}");
    }
    let outcome = dedup
        .process_with("retry", None, limit, fail)
        .await
        .unwrap();
    assert!(
        matches!(
            outcome,
            Outcome::Failed {
                reason: DeadLetterReason::MaxDeliveries,
                ..
            }
        ),
        "{outcome:?}"
    );
    assert!(
        dedup
            .dead_letter(&letter("retry", DeadLetterReason::MaxDeliveries, 3))
            .await
            .unwrap()
    );

    // Replayed after the fix: its failed runs are forgotten with it, so one more failure
    // is retried, not given up at once.
    assert!(dedup.forget("retry").await.unwrap());
    assert_eq!(dedup.failed_attempts("retry").await.unwrap(), 0);
    let outcome = dedup
        .process_with("retry", None, limit, fail)
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Released { .. }), "{outcome:?}");
}

async fn dead_letters_are_listed_oldest_first_with_reason_and_deliveries(backend: Backend) {
    let dedup = dedup_with(&backend, DedupOptions::default());
    let before = SystemTime::now();
    let written = [
        letter("c-first", DeadLetterReason::MaxDeliveries, 5),
        letter("a-second", DeadLetterReason::Permanent, 1),
        letter("b-third", DeadLetterReason::Mismatch, 2),
    ];
    for letter in &written {
        assert!(dedup.dead_letter(letter).await.unwrap());
        // Not written twice: the second call finds the record and adds no index entry.
        assert!(!dedup.dead_letter(letter).await.unwrap());
    }

    let listed = dedup.dead_letters(a_day_ago(), 100).await.unwrap();
    assert_eq!(ids(&listed), ["c-first", "a-second", "b-third"]);
    for (entry, letter) in listed.iter().zip(&written) {
        assert_eq!(&entry.letter, letter);
        assert!(
            entry.at >= before && entry.at <= SystemTime::now(),
            "{entry:?}"
        );
    }
    assert!(listed.windows(2).all(|pair| pair[0].at < pair[1].at));

    // Pages: `limit` from `since`, and on from just after the last one.
    let page = dedup.dead_letters(before, 2).await.unwrap();
    assert_eq!(ids(&page), ["c-first", "a-second"]);
    let next = page[1].at + Duration::from_nanos(1);
    assert_eq!(
        ids(&dedup.dead_letters(next, 2).await.unwrap()),
        ["b-third"]
    );
    assert!(
        dedup
            .dead_letters(SystemTime::now(), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(dedup.dead_letters(before, 0).await.unwrap().is_empty());

    // Kept for the dead-letter retention (30 days), not for the lease or the message's.
    let key = ScopedKey::new(
        dedup.dead_letter_scope().clone(),
        Key::new("c-first").unwrap(),
    );
    let kept = dedup.store().get(&key).await.unwrap().unwrap().expires_at();
    let retention = dedup.options().dead_letter_retention;
    assert!(
        kept >= before + retention - Duration::from_secs(60),
        "{kept:?}"
    );
}

async fn concurrent_dead_letters_are_all_listed(backend: Backend) {
    let dedup = dedup_with(&backend, DedupOptions::default());
    let writers: Vec<_> = (0..24)
        .map(|n| {
            let dedup = dedup.clone();
            tokio::spawn(async move {
                let id = format!("m-{n:02}");
                dedup
                    .dead_letter(&letter(&id, DeadLetterReason::MaxDeliveries, n))
                    .await
                    .unwrap()
            })
        })
        .collect();
    for writer in writers {
        assert!(writer.await.unwrap());
    }
    let listed = dedup.dead_letters(a_day_ago(), 1_000).await.unwrap();
    let mut found = ids(&listed);
    found.sort_unstable();
    let expected: Vec<String> = (0..24).map(|n| format!("m-{n:02}")).collect();
    assert_eq!(found, expected);
    assert!(listed.windows(2).all(|pair| pair[0].at <= pair[1].at));
}

async fn a_dead_writer_s_hole_in_the_index_hides_no_dead_letter(backend: Backend) {
    let dedup = dedup_with(&backend, short_lease(&backend));
    assert!(
        dedup
            .dead_letter(&letter("before-hole", DeadLetterReason::Permanent, 1))
            .await
            .unwrap()
    );
    // A writer that claimed the next index slot and died before completing it.
    let day = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 86_400;
    let index = Scope::new(format!("{}.index", dedup.dead_letter_scope().as_str()));
    let slot = ScopedKey::new(index, Key::new(&format!("{day}.1")).unwrap());
    let any = Fingerprint::builder().part("dead writer", b"").finish();
    let begin = backend
        .store
        .begin(&slot, &any, backend.lease)
        .await
        .unwrap();
    assert!(matches!(begin, Begin::Acquired(_)), "{begin:?}");
    assert!(
        dedup
            .dead_letter(&letter("after-hole", DeadLetterReason::Permanent, 2))
            .await
            .unwrap()
    );
    assert_eq!(
        ids(&dedup.dead_letters(a_day_ago(), 10).await.unwrap()),
        ["before-hole", "after-hole"]
    );

    // Once the dead writer's claim has lapsed its slot is a hole; the listing reads past
    // it, and the next writer fills it.
    tokio::time::sleep(backend.lease * 10 / 3).await;
    assert!(backend.store.get(&slot).await.unwrap().is_none(), "a hole");
    assert_eq!(
        ids(&dedup.dead_letters(a_day_ago(), 10).await.unwrap()),
        ["before-hole", "after-hole"]
    );
    assert!(
        dedup
            .dead_letter(&letter("in-hole", DeadLetterReason::Permanent, 3))
            .await
            .unwrap()
    );
    assert!(backend.store.get(&slot).await.unwrap().is_some(), "filled");
    assert_eq!(
        ids(&dedup.dead_letters(a_day_ago(), 10).await.unwrap()),
        ["before-hole", "after-hole", "in-hole"]
    );
}

async fn ids_that_are_not_keys_are_hashed_and_empty_ids_refused(backend: Backend) {
    let dedup = dedup_with(&backend, DedupOptions::default());
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
    let check = |options: DedupOptions| options.validate().map_err(|e: OptionsError| e.field);
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
            lease: Duration::from_secs(400_000_000_000 * 365 * 86_400),
            retention: Duration::MAX,
            ..DedupOptions::default()
        }),
        Err("lease")
    );
    assert_eq!(
        check(DedupOptions {
            retention: Duration::MAX,
            ..DedupOptions::default()
        }),
        Err("retention")
    );
    assert_eq!(
        check(DedupOptions {
            dead_letter_retention: Duration::MAX,
            ..DedupOptions::default()
        }),
        Err("dead_letter_retention")
    );
    for store_timeout in [Duration::ZERO, Duration::from_secs(3_600)] {
        assert_eq!(
            check(DedupOptions {
                store_timeout,
                ..DedupOptions::default()
            }),
            Err("store_timeout")
        );
    }
    for complete_for in [Duration::ZERO, Duration::MAX] {
        assert_eq!(
            check(DedupOptions {
                complete_for,
                ..DedupOptions::default()
            }),
            Err("complete_for")
        );
    }
    let defaults = DedupOptions::default();
    assert_eq!(defaults.store_timeout, Duration::from_secs(5));
    assert_eq!(defaults.complete_for, Duration::from_secs(30));
}

/// Wall time that moves with tokio's clock, so that in a paused test leases end while the
/// deduplicator's retries and renewals sleep.
#[derive(Debug)]
struct TokioClock {
    started: tokio::time::Instant,
    at_start: SystemTime,
}

impl TokioClock {
    fn new() -> Self {
        Self {
            started: tokio::time::Instant::now(),
            at_start: SystemTime::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.at_start + self.started.elapsed()
    }
}

/// A memory store whose next `failures` calls to `complete` fail (`u32::MAX`: all of them).
fn flaky_complete(inner: MemoryStore, failures: u32) -> Arc<FaultyStore<MemoryStore>> {
    let store = Arc::new(FaultyStore::new(inner));
    store.fail_next_completes(failures);
    store
}

type Charging<'a> = Pin<Box<dyn Future<Output = Result<&'static str, HandlerError>> + 'a>>;

/// A handler that counts its runs and takes `takes` (of tokio time) to charge.
fn charge<'a>(runs: &'a AtomicUsize, takes: Duration) -> impl FnOnce() -> Charging<'a> {
    move || {
        Box::pin(async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(takes).await;
            Ok("charged")
        })
    }
}

#[tokio::test(start_paused = true)]
async fn an_outcome_is_stored_once_the_store_recovers_and_then_replayed() {
    // Ten failures in a row: several seconds of retries, well within `complete_for`.
    let store = flaky_complete(MemoryStore::new(), 10);
    let dedup = Deduplicator::new(Arc::clone(&store), Scope::new("recovering"));
    let runs = AtomicUsize::new(0);

    let first = dedup.process("pay-1", charge(&runs, Duration::ZERO)).await;
    assert!(
        matches!(first, Ok(Outcome::Processed { ref output }) if output == "charged"),
        "{first:?}"
    );
    assert_eq!(store.completes(), 11);

    // The redelivery (say the ack was lost) is a duplicate: acked, not run.
    let again = dedup.process("pay-1", charge(&runs, Duration::ZERO)).await;
    let Ok(Outcome::Duplicate(replay)) = &again else {
        panic!("expected a duplicate, got {again:?}")
    };
    assert_eq!(replay.output().unwrap(), "charged");
    assert_eq!(
        RetryPolicy::default().settlement(DeliveryAttempt::first(), &again),
        Settlement::Ack
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn an_outcome_that_cannot_be_stored_keeps_the_message_claimed_until_its_lease_ends() {
    let store = flaky_complete(MemoryStore::with_clock(TokioClock::new()), u32::MAX);
    let dedup = Deduplicator::new(Arc::clone(&store), Scope::new("unstorable"));
    let options = dedup.options().clone();
    let runs = AtomicUsize::new(0);
    let started = tokio::time::Instant::now();

    // The handler takes most of a lease; then the store refuses its outcome for good.
    let handler_takes = options.lease * 5 / 6;
    let first = dedup.process("pay-2", charge(&runs, handler_takes)).await;
    let gave_up_after = started.elapsed();
    match &first {
        Ok(Outcome::Unrecorded { result, error }) => {
            assert_eq!(result.as_ref().unwrap(), "charged");
            assert!(matches!(error, StoreError::Backend { .. }), "{error:?}");
        }
        other => panic!("expected an unrecorded outcome, got {other:?}"),
    }
    // Retried for `complete_for` with the lease renewed, not a few times in a blink.
    assert!(gave_up_after >= handler_takes + options.complete_for - Duration::from_secs(2));
    assert!(store.completes() > 10);
    // The handler ran: settled as done, not handed back for a redelivery that would run it.
    assert_eq!(
        RetryPolicy::default().settlement(DeliveryAttempt::first(), &first),
        Settlement::Ack
    );

    // A redelivery well past the first lease, but within the one renewed while storing was
    // retried: the claim was never released, so it is in flight and does not run.
    tokio::time::sleep_until(started + handler_takes + options.lease + options.lease / 6).await;
    let again = dedup.process("pay-2", charge(&runs, Duration::ZERO)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1, "ran again: {again:?}");
    assert!(matches!(again, Ok(Outcome::InFlight { .. })), "{again:?}");

    // Once that lease has ended nothing is left: a redelivery then runs it again (the
    // documented limit of a store that stays down).
    tokio::time::sleep(options.lease).await;
    let late = dedup.process("pay-2", charge(&runs, Duration::ZERO)).await;
    assert!(matches!(late, Ok(Outcome::Unrecorded { .. })), "{late:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn completing_a_claim_that_cannot_be_stored_does_not_release_it() {
    let store = flaky_complete(MemoryStore::new(), u32::MAX);
    let dedup = Deduplicator::new(Arc::clone(&store), Scope::new("claims"));
    let Ok(Claim::Acquired(held)) = dedup.claim("done-elsewhere", None).await else {
        panic!("expected a claim")
    };
    let error = held.complete("receipt").await.unwrap_err();
    assert!(
        matches!(error, DedupError::Unrecorded(StoreError::Backend { .. })),
        "{error:?}"
    );
    assert!(matches!(
        dedup.claim("done-elsewhere", None).await,
        Ok(Claim::InFlight { .. })
    ));
}

async fn a_handler_that_blocks_its_thread_keeps_its_lease(backend: Backend) {
    let dedup = dedup_with(&backend, short_lease(&backend));
    let lease = backend.lease;
    let running = {
        let dedup = dedup.clone();
        tokio::spawn(async move {
            dedup
                .process("blocking", || async {
                    // Four leases without yielding (a synchronous client, a CPU-bound step),
                    // blocking the way tokio asks for: without `block_in_place` a blocked
                    // worker now and then stops the runtime's timers, renewals included.
                    tokio::task::block_in_place(|| std::thread::sleep(lease * 4));
                    Ok("finished")
                })
                .await
        })
    };
    tokio::time::sleep(lease * 3).await;
    let second = dedup
        .process("blocking", || async { Ok("stolen") })
        .await
        .unwrap();
    assert!(matches!(second, Outcome::InFlight { .. }), "{second:?}");
    let first = running.await.unwrap().unwrap();
    assert!(
        matches!(first, Outcome::Processed { ref output } if output == "finished"),
        "{first:?}"
    );
}
