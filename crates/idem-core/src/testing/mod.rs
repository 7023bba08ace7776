//! The conformance suite and the randomized model test that every [`Store`] must pass.
//!
//! A backend crate runs the whole suite with one macro call, fed an async function that
//! makes a fresh, isolated [`Subject`]:
//!
//! ```
//! use idem_core::testing::{Subject, TimeTravel};
//! use idem_core::{ManualClock, MemoryStore};
//!
//! async fn memory() -> Subject<MemoryStore> {
//!     let clock = ManualClock::new();
//!     Subject::new(MemoryStore::with_clock(clock.clone()), TimeTravel::Manual(clock))
//! }
//!
//! idem_core::conformance_suite!(memory);
//! # fn main() {}
//! ```
//!
//! Stores that read the time from their server (Redis, Postgres) use [`TimeTravel::Real`]:
//! the suite then sleeps, with durations scaled down so that it stays fast.
//!
//! Embedded stores kept on disk also run the [`durability`] suite (kills, reopens, one
//! owner a path) and, if they sweep by themselves, the [`sweeping`] suite; their criterion
//! benches share the [`bench`] driver.

pub mod bench;
pub mod durability;
pub mod model;
pub mod sweeping;

pub use crate::faulty::FaultyStore;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::{Begin, Fingerprint, Key, RecordState, Scope, ScopedKey, Store, StoreError, Stored};

/// How a subject's time moves forward in tests.
#[derive(Debug, Clone)]
pub enum TimeTravel {
    /// The store reads this clock; advancing it is instant.
    Manual(crate::ManualClock),
    /// The store reads a real clock (its own or its server's); advancing sleeps.
    Real,
}

impl TimeTravel {
    /// Lets `by` pass, as the store sees it.
    pub async fn advance(&self, by: Duration) {
        match self {
            Self::Manual(clock) => clock.advance(by),
            Self::Real => tokio::time::sleep(by + Duration::from_millis(25)).await,
        }
    }

    /// The suite's time unit: leases and retentions are small multiples of it.
    pub fn unit(&self) -> Duration {
        match self {
            Self::Manual(_) => Duration::from_secs(10),
            Self::Real => Duration::from_millis(250),
        }
    }
}

/// A fresh store under test, and the means to move its time.
pub struct Subject<S> {
    /// The store, empty and isolated from every other test.
    pub store: Arc<S>,
    /// How to let time pass for it.
    pub time: TimeTravel,
    // Declared after the store so it is dropped after it: a temporary directory, a
    // database to drop, whatever must outlive the store.
    _guard: Option<Box<dyn Send + Sync>>,
}

impl<S: Store> Subject<S> {
    /// Wraps a fresh store.
    pub fn new(store: S, time: TimeTravel) -> Self {
        Self {
            store: Arc::new(store),
            time,
            _guard: None,
        }
    }

    /// Wraps a fresh store with something that must live as long as it (and is dropped
    /// after it), such as its temporary directory.
    pub fn with_guard(store: S, time: TimeTravel, guard: impl Send + Sync + 'static) -> Self {
        Self {
            store: Arc::new(store),
            time,
            _guard: Some(Box::new(guard)),
        }
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for Subject<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subject")
            .field("store", &self.store)
            .field("time", &self.time)
            .finish_non_exhaustive()
    }
}

/// `key` in the suite's default scope.
pub fn scoped(key: &str) -> ScopedKey {
    scoped_in("conformance", key)
}

/// `key` in `scope`.
pub fn scoped_in(scope: &str, key: &str) -> ScopedKey {
    match Key::new(key) {
        Ok(key) => ScopedKey::new(Scope::new(scope), key),
        Err(error) => panic!("test key {key:?} is invalid: {error}"),
    }
}

/// A fingerprint from a label.
pub fn fingerprint(label: &str) -> Fingerprint {
    Fingerprint::builder()
        .part("test", label.as_bytes())
        .finish()
}

async fn acquire<S: Store>(
    store: &S,
    key: &ScopedKey,
    fp: &Fingerprint,
    lease: Duration,
) -> crate::Lease {
    match store.begin(key, fp, lease).await {
        Ok(Begin::Acquired(lease)) => lease,
        other => panic!("begin of {key:?} should acquire, got {other:?}"),
    }
}

fn assert_lease_lost<T: std::fmt::Debug>(result: Result<T, StoreError>, what: &str) {
    match result {
        Err(StoreError::LeaseLost) => {}
        other => panic!("{what} should fail with LeaseLost, got {other:?}"),
    }
}

fn assert_close(actual: SystemTime, expected: SystemTime, slack: Duration, what: &str) {
    let gap = actual
        .duration_since(expected)
        .unwrap_or_else(|e| e.duration());
    assert!(
        gap <= slack,
        "{what}: {actual:?} is {gap:?} away from {expected:?}"
    );
}

fn slack(time: &TimeTravel) -> Duration {
    match time {
        TimeTravel::Manual(_) => Duration::ZERO,
        // Server clocks and the test's clock differ a little, and calls take time.
        TimeTravel::Real => Duration::from_millis(200),
    }
}

fn now_for(time: &TimeTravel) -> SystemTime {
    match time {
        TimeTravel::Manual(clock) => crate::Clock::now(clock),
        TimeTravel::Real => SystemTime::now(),
    }
}

/// A new key is acquired; the record says in flight, with the claim's token and fingerprint.
pub async fn single_begin<S: Store>(subject: Subject<S>) {
    let (store, unit) = (&subject.store, subject.time.unit());
    let key = scoped("single");
    let fp = fingerprint("a");
    let started = now_for(&subject.time);
    let lease = acquire(&**store, &key, &fp, unit * 3).await;
    assert_close(
        lease.expires_at,
        started + unit * 3,
        slack(&subject.time),
        "lease end",
    );
    let record = store.get(&key).await.unwrap().expect("record after begin");
    assert_eq!(record.fingerprint, fp);
    assert_eq!(record.token, lease.token);
    assert_eq!(
        record.state,
        RecordState::InFlight {
            lease_expires_at: lease.expires_at
        }
    );
    assert_eq!(store.get(&scoped("other")).await.unwrap(), None);
}

/// Many tasks race `begin` on one key: exactly one acquires, the rest see it in flight.
/// The same holds for many keys raced at once.
pub async fn concurrent_begin_has_one_winner<S: Store>(subject: Subject<S>) {
    let lease = subject.time.unit() * 6;
    let fp = fingerprint("race");
    let mut tasks = Vec::new();
    for round in 0..128 {
        let store = Arc::clone(&subject.store);
        tasks.push(tokio::spawn(async move {
            let key = scoped(&format!("race-{}", round % 8));
            (round % 8, store.begin(&key, &fp, lease).await)
        }));
    }
    tasks.push({
        let store = Arc::clone(&subject.store);
        tokio::spawn(async move { (8, store.begin(&scoped("race-8"), &fp, lease).await) })
    });
    let mut acquired = [0usize; 9];
    let mut in_flight = [0usize; 9];
    for task in tasks {
        let (key, answer) = task.await.expect("task");
        match answer {
            Ok(Begin::Acquired(_)) => acquired[key] += 1,
            Ok(Begin::InFlight { retry_after }) => {
                assert!(retry_after > Duration::ZERO && retry_after <= lease);
                in_flight[key] += 1
            }
            other => panic!("racing begin answered {other:?}"),
        }
    }
    assert_eq!(acquired, [1; 9], "exactly one winner per key");
    assert_eq!(
        in_flight[..8],
        [15; 8],
        "every loser sees the key in flight"
    );
}

/// After `complete`, `begin` with the same fingerprint replays the stored outcome.
pub async fn replay_after_complete<S: Store>(subject: Subject<S>) {
    let (store, unit) = (&subject.store, subject.time.unit());
    let key = scoped("replay");
    let fp = fingerprint("a");
    let lease = acquire(&**store, &key, &fp, unit * 3).await;
    let outcome = Stored::new(201)
        .with_header("content-type", "application/json")
        .with_header("x-charge", "ch_1")
        .with_body(r#"{"charged":true}"#);
    let before = now_for(&subject.time);
    let expires_at = store
        .complete(&key, lease.token, &outcome, unit * 100)
        .await
        .expect("complete by the holder");
    assert_close(
        expires_at,
        before + unit * 100,
        slack(&subject.time),
        "retention end",
    );
    for _ in 0..3 {
        match store.begin(&key, &fp, unit * 3).await.unwrap() {
            Begin::Completed {
                stored,
                expires_at: replay_expiry,
            } => {
                assert_eq!(*stored, outcome);
                assert_eq!(replay_expiry, expires_at);
            }
            other => panic!("expected a replay, got {other:?}"),
        }
    }
    let record = store.get(&key).await.unwrap().expect("completed record");
    assert_eq!(record.token, lease.token);
    match record.state {
        RecordState::Completed { stored, .. } => assert_eq!(*stored, outcome),
        other => panic!("expected completed, got {other:?}"),
    }
    // The holder's retry of a complete whose answer it lost is answered from the record.
    assert_eq!(
        store
            .complete(&key, lease.token, &outcome, unit * 7)
            .await
            .expect("a repeated complete"),
        expires_at
    );
}

/// A key is bound to its first fingerprint, in flight and completed.
pub async fn fingerprint_mismatch<S: Store>(subject: Subject<S>) {
    let (store, unit) = (&subject.store, subject.time.unit());
    let key = scoped("mismatch");
    let lease = acquire(&**store, &key, &fingerprint("a"), unit * 3).await;
    assert_eq!(
        store
            .begin(&key, &fingerprint("b"), unit * 3)
            .await
            .unwrap(),
        Begin::Mismatch
    );
    store
        .complete(&key, lease.token, &Stored::new(200), unit * 10)
        .await
        .unwrap();
    assert_eq!(
        store
            .begin(&key, &fingerprint("b"), unit * 3)
            .await
            .unwrap(),
        Begin::Mismatch
    );
    assert!(matches!(
        store
            .begin(&key, &fingerprint("a"), unit * 3)
            .await
            .unwrap(),
        Begin::Completed { .. }
    ));
}

/// While a key is held, others are told to come back within the holder's remaining lease.
pub async fn in_flight_retry_after<S: Store>(subject: Subject<S>) {
    let (store, unit) = (&subject.store, subject.time.unit());
    let key = scoped("busy");
    let fp = fingerprint("a");
    acquire(&**store, &key, &fp, unit * 4).await;
    let first = match store.begin(&key, &fp, unit * 4).await.unwrap() {
        Begin::InFlight { retry_after } => retry_after,
        other => panic!("expected in flight, got {other:?}"),
    };
    assert!(first > Duration::ZERO && first <= unit * 4, "{first:?}");
    subject.time.advance(unit * 2).await;
    let second = match store.begin(&key, &fp, unit * 4).await.unwrap() {
        Begin::InFlight { retry_after } => retry_after,
        other => panic!("expected in flight, got {other:?}"),
    };
    assert!(second > Duration::ZERO && second <= unit * 2, "{second:?}");
}

/// After the lease ends, the next `begin` takes the key over with a larger token, even with
/// another fingerprint.
pub async fn lease_expiry_takeover<S: Store>(subject: Subject<S>) {
    let (store, unit) = (&subject.store, subject.time.unit());
    let key = scoped("takeover");
    let old = acquire(&**store, &key, &fingerprint("a"), unit).await;
    subject.time.advance(unit * 2).await;
    assert_eq!(
        store.get(&key).await.unwrap(),
        None,
        "expired lease reads as absent"
    );
    let new = acquire(&**store, &key, &fingerprint("b"), unit * 4).await;
    assert!(new.token > old.token, "{new:?} must outrank {old:?}");
    let record = store.get(&key).await.unwrap().expect("new holder's record");
    assert_eq!(record.fingerprint, fingerprint("b"));
}

/// A holder whose lease was taken over can neither complete, release nor renew, and the new
/// holder's record is untouched by its attempts.
pub async fn stale_token_is_fenced<S: Store>(subject: Subject<S>) {
    let (store, unit) = (&subject.store, subject.time.unit());
    let key = scoped("fenced");
    let fp = fingerprint("a");
    let old = acquire(&**store, &key, &fp, unit).await;
    subject.time.advance(unit * 2).await;
    let new = acquire(&**store, &key, &fp, unit * 8).await;
    let before = store.get(&key).await.unwrap();

    assert_lease_lost(
        store
            .complete(
                &key,
                old.token,
                &Stored::new(500).with_body("stale"),
                unit * 10,
            )
            .await,
        "complete with a stale token",
    );
    assert_lease_lost(
        store.release(&key, old.token).await,
        "release with a stale token",
    );
    assert_lease_lost(
        store.renew(&key, old.token, unit * 50).await,
        "renew with a stale token",
    );
    assert_eq!(
        store.get(&key).await.unwrap(),
        before,
        "new holder's record untouched"
    );

    let fresh = Stored::new(200).with_body("fresh");
    store
        .complete(&key, new.token, &fresh, unit * 10)
        .await
        .unwrap();
    match store.begin(&key, &fp, unit).await.unwrap() {
        Begin::Completed { stored, .. } => assert_eq!(*stored, fresh),
        other => panic!("expected the new holder's outcome, got {other:?}"),
    }
}

/// The holder may complete after its own lease ended, as long as nobody took the key over:
/// the outcome is kept and replayed, so a slow write never turns into a second execution.
/// Until then the expired claim reads as absent.
pub async fn late_complete_is_kept<S: Store>(subject: Subject<S>) {
    let (store, unit) = (&subject.store, subject.time.unit());
    let key = scoped("late");
    let fp = fingerprint("a");
    let lease = acquire(&**store, &key, &fp, unit * 4).await;
    // Past the lease, well within one more lease length.
    subject.time.advance(unit * 5).await;
    assert_eq!(
        store.get(&key).await.unwrap(),
        None,
        "an expired claim reads as absent"
    );
    let outcome = Stored::new(201).with_body("late but kept");
    let before = now_for(&subject.time);
    let expires_at = store
        .complete(&key, lease.token, &outcome, unit * 10)
        .await
        .expect("the holder completes after its lease ended");
    assert_close(
        expires_at,
        before + unit * 10,
        slack(&subject.time),
        "retention end",
    );
    match store.begin(&key, &fp, unit).await.unwrap() {
        Begin::Completed {
            stored,
            expires_at: replay_expiry,
        } => {
            assert_eq!(*stored, outcome);
            assert_eq!(replay_expiry, expires_at);
        }
        other => panic!("expected the late outcome replayed, got {other:?}"),
    }
    let record = store.get(&key).await.unwrap().expect("completed record");
    assert_eq!(record.token, lease.token);
}

/// `complete` repeated with the token that completed the record answers the same expiry and
/// changes nothing, so a complete whose answer was lost can be retried; another token is
/// still refused.
pub async fn complete_is_idempotent_for_its_token<S: Store>(subject: Subject<S>) {
    let (store, unit) = (&subject.store, subject.time.unit());
    let key = scoped("idempotent");
    let fp = fingerprint("a");
    let lease = acquire(&**store, &key, &fp, unit * 4).await;
    let first = Stored::new(200).with_body("first");
    let expires_at = store
        .complete(&key, lease.token, &first, unit * 10)
        .await
        .expect("complete by the holder");
    let before = store.get(&key).await.unwrap();
    subject.time.advance(unit).await;
    for _ in 0..2 {
        let again = store
            .complete(
                &key,
                lease.token,
                &Stored::new(500).with_body("retry"),
                unit * 30,
            )
            .await
            .expect("a repeated complete by the same token");
        assert_eq!(again, expires_at, "answered with the record's expiry");
    }
    assert_eq!(store.get(&key).await.unwrap(), before, "record unchanged");
    for other in [lease.token.get() + 1, lease.token.get().saturating_sub(1)] {
        assert_lease_lost(
            store
                .complete(&key, crate::Token::new(other), &first, unit * 10)
                .await,
            "complete by another token",
        );
    }
    match store.begin(&key, &fp, unit).await.unwrap() {
        Begin::Completed { stored, .. } => assert_eq!(*stored, first),
        other => panic!("expected the first outcome, got {other:?}"),
    }
}

/// A holder that released its key cannot complete it afterwards, and the key stays free.
pub async fn complete_after_release_is_rejected<S: Store>(subject: Subject<S>) {
    let (store, unit) = (&subject.store, subject.time.unit());
    let key = scoped("released");
    let fp = fingerprint("a");
    let lease = acquire(&**store, &key, &fp, unit * 4).await;
    store.release(&key, lease.token).await.unwrap();
    assert_lease_lost(
        store
            .complete(&key, lease.token, &Stored::new(200), unit * 10)
            .await,
        "complete after release",
    );
    assert_eq!(store.get(&key).await.unwrap(), None);
    let next = acquire(&**store, &key, &fp, unit * 4).await;
    assert!(next.token > lease.token);
}

/// Once a newer claim took the key over (and even completed it), the old holder's late
/// complete is refused: it neither overwrites nor is mistaken for a repeat.
pub async fn complete_after_takeover_is_rejected<S: Store>(subject: Subject<S>) {
    let (store, unit) = (&subject.store, subject.time.unit());
    let key = scoped("taken-over");
    let fp = fingerprint("a");
    let old = acquire(&**store, &key, &fp, unit * 2).await;
    subject.time.advance(unit * 3).await;
    let new = acquire(&**store, &key, &fp, unit * 4).await;
    let fresh = Stored::new(200).with_body("new holder");
    store
        .complete(&key, new.token, &fresh, unit * 10)
        .await
        .unwrap();
    assert_lease_lost(
        store
            .complete(
                &key,
                old.token,
                &Stored::new(200).with_body("old"),
                unit * 10,
            )
            .await,
        "the previous holder's late complete",
    );
    match store.begin(&key, &fp, unit).await.unwrap() {
        Begin::Completed { stored, .. } => assert_eq!(*stored, fresh),
        other => panic!("expected the new holder's outcome, got {other:?}"),
    }
}

/// Leases and retentions no store can represent are refused with an error, never a panic or
/// an overflow, and leave the store serving as before.
pub async fn absurd_durations_are_refused<S: Store>(subject: Subject<S>) {
    let (store, unit) = (&subject.store, subject.time.unit());
    let key = scoped("absurd");
    let fp = fingerprint("a");
    let absurd = [
        Duration::MAX,
        // 400 000 000 000 years.
        Duration::from_secs(400_000_000_000 * 365 * 24 * 3600),
        crate::transition::MAX_SPAN + Duration::from_millis(1),
    ];
    for duration in absurd {
        assert_out_of_range(store.begin(&key, &fp, duration).await, "begin", duration);
    }
    assert_eq!(store.get(&key).await.unwrap(), None, "nothing was claimed");
    let lease = acquire(&**store, &key, &fp, unit * 4).await;
    for duration in absurd {
        assert_out_of_range(
            store.renew(&key, lease.token, duration).await,
            "renew",
            duration,
        );
        assert_out_of_range(
            store
                .complete(&key, lease.token, &Stored::new(200), duration)
                .await,
            "complete",
            duration,
        );
    }
    let record = store.get(&key).await.unwrap().expect("still held");
    assert_eq!(record.token, lease.token);
    assert!(matches!(record.state, RecordState::InFlight { .. }));
    // The store still serves, and the longest accepted span works.
    let renewed = store.renew(&key, lease.token, unit * 4).await.unwrap();
    assert_eq!(renewed.token, lease.token);
    store
        .complete(
            &key,
            lease.token,
            &Stored::new(200),
            crate::transition::MAX_SPAN,
        )
        .await
        .expect("the longest retention is accepted");
    assert!(matches!(
        store.begin(&key, &fp, unit).await.unwrap(),
        Begin::Completed { .. }
    ));
    acquire(&**store, &scoped("absurd-after"), &fp, unit).await;
}

fn assert_out_of_range<T: std::fmt::Debug>(
    result: Result<T, StoreError>,
    operation: &str,
    duration: Duration,
) {
    match result {
        Err(StoreError::DurationOutOfRange {
            operation: op,
            duration: refused,
        }) => {
            assert_eq!(op, operation);
            assert_eq!(refused, duration);
        }
        other => panic!("{operation} with {duration:?} should be out of range, got {other:?}"),
    }
}

/// `renew` keeps a long operation's key held past its first lease.
pub async fn renew_extends_the_lease<S: Store>(subject: Subject<S>) {
    let (store, unit) = (&subject.store, subject.time.unit());
    let key = scoped("renew");
    let fp = fingerprint("a");
    let lease = acquire(&**store, &key, &fp, unit * 2).await;
    subject.time.advance(unit).await;
    let renewed = store.renew(&key, lease.token, unit * 4).await.unwrap();
    assert_eq!(renewed.token, lease.token);
    assert!(renewed.expires_at > lease.expires_at);
    subject.time.advance(unit * 2).await;
    assert!(matches!(
        store.begin(&key, &fp, unit).await.unwrap(),
        Begin::InFlight { .. }
    ));
    store
        .complete(&key, lease.token, &Stored::new(200), unit * 10)
        .await
        .unwrap();
}

/// After `release`, the key is free again and the next claim gets a larger token; releasing
/// twice is refused.
pub async fn release_then_begin_again<S: Store>(subject: Subject<S>) {
    let (store, unit) = (&subject.store, subject.time.unit());
    let key = scoped("release");
    let fp = fingerprint("a");
    let first = acquire(&**store, &key, &fp, unit * 3).await;
    store.release(&key, first.token).await.unwrap();
    assert_eq!(store.get(&key).await.unwrap(), None);
    assert_lease_lost(store.release(&key, first.token).await, "a second release");
    let second = acquire(&**store, &key, &fingerprint("other"), unit * 3).await;
    assert!(second.token > first.token);
}

/// A completed record is replayed until retention ends, then forgotten.
pub async fn retention_expiry<S: Store>(subject: Subject<S>) {
    let (store, unit) = (&subject.store, subject.time.unit());
    let key = scoped("retention");
    let fp = fingerprint("a");
    let first = acquire(&**store, &key, &fp, unit).await;
    store
        .complete(&key, first.token, &Stored::new(200), unit * 3)
        .await
        .unwrap();
    subject.time.advance(unit * 2).await;
    assert!(matches!(
        store.begin(&key, &fp, unit).await.unwrap(),
        Begin::Completed { .. }
    ));
    subject.time.advance(unit * 2).await;
    assert_eq!(store.get(&key).await.unwrap(), None);
    let second = acquire(&**store, &key, &fp, unit).await;
    assert!(second.token > first.token);
}

/// `sweep` removes expired records and leaves live ones.
pub async fn sweep_keeps_live_records<S: Store>(subject: Subject<S>) {
    let (store, unit) = (&subject.store, subject.time.unit());
    let fp = fingerprint("a");
    for i in 0..10 {
        let lease = acquire(&**store, &scoped(&format!("short-{i}")), &fp, unit).await;
        if i % 2 == 0 {
            store
                .complete(
                    &scoped(&format!("short-{i}")),
                    lease.token,
                    &Stored::new(200),
                    unit,
                )
                .await
                .unwrap();
        }
    }
    let keeper = acquire(&**store, &scoped("long"), &fp, unit * 20).await;
    subject.time.advance(unit * 2).await;
    let mut removed = 0;
    loop {
        let step = store.sweep(3).await.unwrap();
        assert!(step <= 3, "sweep removed {step}, over its limit of 3");
        removed += step;
        if step < 3 {
            break;
        }
    }
    assert!(removed <= 10);
    for i in 0..10 {
        assert_eq!(
            store.get(&scoped(&format!("short-{i}"))).await.unwrap(),
            None
        );
    }
    let record = store
        .get(&scoped("long"))
        .await
        .unwrap()
        .expect("live record survives");
    assert_eq!(record.token, keeper.token);
}

/// `delete` forgets a key in any state and says whether there was one.
pub async fn delete_forgets<S: Store>(subject: Subject<S>) {
    let (store, unit) = (&subject.store, subject.time.unit());
    let key = scoped("delete");
    let fp = fingerprint("a");
    assert!(!store.delete(&key).await.unwrap());
    let lease = acquire(&**store, &key, &fp, unit).await;
    store
        .complete(&key, lease.token, &Stored::new(200), unit * 10)
        .await
        .unwrap();
    assert!(store.delete(&key).await.unwrap());
    assert_eq!(store.get(&key).await.unwrap(), None);
    let again = acquire(&**store, &key, &fp, unit).await;
    assert!(again.token > lease.token);
}

/// The same key in two scopes names two records; neither sees the other's outcome.
pub async fn scopes_are_isolated<S: Store>(subject: Subject<S>) {
    let (store, unit) = (&subject.store, subject.time.unit());
    let fp = fingerprint("a");
    let a = scoped_in("tenant-a", "shared-key");
    let b = scoped_in("tenant-b", "shared-key");
    let lease_a = acquire(&**store, &a, &fp, unit * 3).await;
    let lease_b = acquire(&**store, &b, &fp, unit * 3).await;
    store
        .complete(
            &a,
            lease_a.token,
            &Stored::new(200).with_body("for a"),
            unit * 10,
        )
        .await
        .unwrap();
    assert!(matches!(
        store.begin(&b, &fp, unit).await.unwrap(),
        Begin::InFlight { .. }
    ));
    store
        .complete(
            &b,
            lease_b.token,
            &Stored::new(200).with_body("for b"),
            unit * 10,
        )
        .await
        .unwrap();
    for (key, body) in [(&a, "for a"), (&b, "for b")] {
        match store.begin(key, &fp, unit).await.unwrap() {
            Begin::Completed { stored, .. } => {
                assert_eq!(stored.body.as_deref(), Some(body.as_bytes()))
            }
            other => panic!("expected a replay, got {other:?}"),
        }
    }
    // Separators inside scope or key must not make two pairs collide.
    let left = scoped_in("x:y", "z");
    let right = scoped_in("x", "y:z");
    acquire(&**store, &left, &fp, unit).await;
    acquire(&**store, &right, &fp, unit).await;
}

/// The longest allowed key and keys of awkward characters work, and differ from each other.
pub async fn long_and_odd_keys<S: Store>(subject: Subject<S>) {
    let (store, unit) = (&subject.store, subject.time.unit());
    let fp = fingerprint("a");
    let longest = "k".repeat(crate::DEFAULT_MAX_KEY_LEN);
    let odd = [
        longest.as_str(),
        " leading space",
        "quote\"back\\slash",
        "{hash}tag}",
        "percent%2F*glob?[x]",
        "KEY",
        "key",
        "'; DROP TABLE records; --",
        "~!@#$^&()_+=`|<>,./",
    ];
    for (i, text) in odd.iter().enumerate() {
        let key = scoped_in("odd {scope}", text);
        let lease = acquire(&**store, &key, &fp, unit).await;
        let body = format!("outcome {i}");
        store
            .complete(
                &key,
                lease.token,
                &Stored::new(200).with_body(body),
                unit * 10,
            )
            .await
            .unwrap();
    }
    for (i, text) in odd.iter().enumerate() {
        let key = scoped_in("odd {scope}", text);
        match store.begin(&key, &fp, unit).await.unwrap() {
            Begin::Completed { stored, .. } => assert_eq!(
                stored.body.as_deref(),
                Some(format!("outcome {i}").as_bytes()),
                "key {text:?}"
            ),
            other => panic!("key {text:?}: expected a replay, got {other:?}"),
        }
    }
}

/// A 1 MiB body, binary header values and a not-kept body survive storage byte for byte.
pub async fn large_and_binary_outcomes<S: Store>(subject: Subject<S>) {
    let (store, unit) = (&subject.store, subject.time.unit());
    let fp = fingerprint("a");
    let body: Vec<u8> = (0..(1usize << 20)).map(|i| (i * 31 % 251) as u8).collect();
    let mut big = Stored::new(200).with_body(body);
    for i in 0..50 {
        big = big.with_header(format!("x-h{i}"), Bytes::from(vec![0xff, 0x00, i as u8]));
    }
    let not_kept = Stored::new(201)
        .with_header("location", "/p/1")
        .without_body();
    for (name, outcome) in [("big", &big), ("not-kept", &not_kept)] {
        let key = scoped(name);
        let lease = acquire(&**store, &key, &fp, unit).await;
        store
            .complete(&key, lease.token, outcome, unit * 10)
            .await
            .unwrap();
        match store.begin(&key, &fp, unit).await.unwrap() {
            Begin::Completed { stored, .. } => assert!(*stored == *outcome, "{name} differs"),
            other => panic!("expected a replay, got {other:?}"),
        }
    }
}

/// `in_flight` lists keys held at least so long, oldest claim first, bounded by its limit;
/// not completed, released or fresh ones; a renewal keeps the claim's age. A store that
/// answers [`StoreError::Unsupported`] is not checked further.
pub async fn in_flight_lists_old_claims<S: Store>(subject: Subject<S>) {
    let (store, unit) = (&subject.store, subject.time.unit());
    let fp = fingerprint("a");
    let (held, other, done, released) = (
        scoped("stuck-held"),
        scoped_in("stuck-other-scope", "stuck-held"),
        scoped("stuck-done"),
        scoped("stuck-released"),
    );
    let first = acquire(&**store, &held, &fp, unit * 40).await;
    match store.in_flight(Duration::ZERO, 10).await {
        Err(StoreError::Unsupported { .. }) => return,
        other => drop(other.expect("in_flight")),
    }
    subject.time.advance(unit / 5).await;
    let second = acquire(&**store, &other, &fp, unit * 40).await;
    let finished = acquire(&**store, &done, &fp, unit * 40).await;
    store
        .complete(&done, finished.token, &Stored::new(200), unit * 40)
        .await
        .unwrap();
    let gone = acquire(&**store, &released, &fp, unit * 40).await;
    store.release(&released, gone.token).await.unwrap();
    subject.time.advance(unit * 2).await;
    store.renew(&held, first.token, unit * 40).await.unwrap();
    let fresh = scoped("stuck-fresh");
    acquire(&**store, &fresh, &fp, unit * 40).await;

    let stuck = store.in_flight(unit, 10).await.unwrap();
    let keys: Vec<&ScopedKey> = stuck.iter().map(|record| &record.key).collect();
    assert_eq!(
        keys,
        [&held, &other],
        "oldest claim first, renewal kept its age"
    );
    assert_eq!(stuck[0].token, first.token);
    assert_eq!(stuck[1].token, second.token);
    assert!(stuck[0].claimed_at <= stuck[1].claimed_at);
    assert!(
        stuck[0].lease_expires_at > stuck[0].claimed_at + unit * 2,
        "the lease shown is the renewed one"
    );
    let one = store.in_flight(unit, 1).await.unwrap();
    assert_eq!(one.len(), 1, "the limit bounds the answer");
    assert_eq!(one[0].key, held);
    assert!(store.in_flight(unit * 30, 10).await.unwrap().is_empty());
    let all = store.in_flight(Duration::ZERO, 10).await.unwrap();
    assert_eq!(all.len(), 3, "the fresh claim counts with no minimum age");

    // A policy may allow keys longer than the default 255: the store reads them back.
    let long = ScopedKey::new(
        Scope::new("conformance"),
        Key::new_with_max_len(&"k".repeat(300), 300).unwrap(),
    );
    acquire(&**store, &long, &fp, unit * 40).await;
    subject.time.advance(unit * 2).await;
    let listed = store.in_flight(unit, 10).await.unwrap();
    assert!(
        listed.iter().any(|record| record.key == long),
        "a 300-character key is listed: {listed:?}"
    );
}

/// Runs every case of the conformance suite as its own `#[tokio::test]`, each on a fresh
/// subject from `$make` (an async function returning [`Subject`]).
#[macro_export]
macro_rules! conformance_suite {
    ($make:ident) => {
        $crate::__conformance_cases!(@tests $make);
    };
}

/// Runs every case of the conformance suite one after another, each on a fresh subject from
/// `$make` (an async function or closure returning [`Subject`]): for a backend whose
/// server the test starts once and shares, such as a Redis Cluster. Evaluates to a future.
///
/// ```
/// use idem_core::testing::{Subject, TimeTravel};
/// use idem_core::{ManualClock, MemoryStore};
///
/// # #[tokio::main] async fn main() {
/// let make = || async {
///     let clock = ManualClock::new();
///     Subject::new(MemoryStore::with_clock(clock.clone()), TimeTravel::Manual(clock))
/// };
/// idem_core::conformance_sequence!(make).await;
/// # }
/// ```
#[macro_export]
macro_rules! conformance_sequence {
    ($make:expr) => {
        $crate::__conformance_cases!(@sequence ($make))
    };
}

/// The one list of conformance cases, handed to the emitter in the mode asked for.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_cases {
    (@$mode:ident $make:tt) => {
        $crate::__conformance_emit! { @$mode [$make]
            single_begin,
            concurrent_begin_has_one_winner,
            replay_after_complete,
            fingerprint_mismatch,
            in_flight_retry_after,
            lease_expiry_takeover,
            stale_token_is_fenced,
            late_complete_is_kept,
            complete_is_idempotent_for_its_token,
            complete_after_release_is_rejected,
            complete_after_takeover_is_rejected,
            absurd_durations_are_refused,
            renew_extends_the_lease,
            release_then_begin_again,
            retention_expiry,
            sweep_keeps_live_records,
            delete_forgets,
            scopes_are_isolated,
            long_and_odd_keys,
            large_and_binary_outcomes,
            in_flight_lists_old_claims,
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_emit {
    (@tests [$make:ident] $($case:ident),+ $(,)?) => {
        mod conformance {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    $crate::testing::$case(super::$make().await).await;
                }
            )+
        }
    };
    (@sequence [$make:expr] $($case:ident),+ $(,)?) => {
        async {
            $(
                $crate::testing::$case(($make)().await).await;
            )+
        }
    };
}

/// A store whose every call fails as an unreachable backend's would, with a
/// [`StoreError::Backend`]; it counts the calls. For testing what sits above a store.
///
/// ```
/// use idem_core::testing::{FailingStore, scoped, fingerprint};
/// use idem_core::{Store, StoreError};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let store = FailingStore::default();
/// let answer = store.begin(&scoped("k"), &fingerprint("a"), std::time::Duration::from_secs(1)).await;
/// assert!(matches!(answer, Err(StoreError::Backend { .. })));
/// assert_eq!(store.calls(), 1);
/// # }
/// ```
#[derive(Debug, Default, Clone)]
pub struct FailingStore {
    calls: Arc<std::sync::atomic::AtomicU64>,
}

impl FailingStore {
    /// How many calls were made, across clones.
    pub fn calls(&self) -> u64 {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn fail(&self, operation: &'static str) -> StoreError {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        StoreError::backend(
            operation,
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused"),
        )
    }
}

#[async_trait::async_trait]
impl Store for FailingStore {
    async fn begin(
        &self,
        _: &ScopedKey,
        _: &Fingerprint,
        _: Duration,
    ) -> Result<Begin, StoreError> {
        Err(self.fail("begin"))
    }
    async fn complete(
        &self,
        _: &ScopedKey,
        _: crate::Token,
        _: &Stored,
        _: Duration,
    ) -> Result<SystemTime, StoreError> {
        Err(self.fail("complete"))
    }
    async fn release(&self, _: &ScopedKey, _: crate::Token) -> Result<(), StoreError> {
        Err(self.fail("release"))
    }
    async fn renew(
        &self,
        _: &ScopedKey,
        _: crate::Token,
        _: Duration,
    ) -> Result<crate::Lease, StoreError> {
        Err(self.fail("renew"))
    }
    async fn get(&self, _: &ScopedKey) -> Result<Option<crate::Record>, StoreError> {
        Err(self.fail("get"))
    }
    async fn delete(&self, _: &ScopedKey) -> Result<bool, StoreError> {
        Err(self.fail("delete"))
    }
    async fn sweep(&self, _: usize) -> Result<usize, StoreError> {
        Err(self.fail("sweep"))
    }
}
