//! The sweeping suite for stores that sweep expired records by themselves: a backlog of
//! expired records leaves the store in bounded steps, while new claims keep being served,
//! and live records stay.
//!
//! A store crate runs it with one macro call, [`sweeping_suite!`](crate::sweeping_suite),
//! fed a function that returns a [`Sweeping`]: how to open the store with a manual clock
//! and a given sweep, and how to count its records.

use std::path::Path;
use std::time::Duration;

use crate::{Begin, Fingerprint, Key, ManualClock, Scope, ScopedKey, Store, Stored};

/// How often, and how much at a time, the store under test must sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sweep {
    /// Time between two sweeping steps.
    pub interval: Duration,
    /// The most records one step removes.
    pub batch: usize,
}

/// How the sweeping suite opens one store; see [`sweeping_suite!`](crate::sweeping_suite)
/// for a use.
///
/// ```
/// use idem_core::testing::sweeping::{Sweep, Sweeping};
/// use idem_core::{ManualClock, MemoryStore};
///
/// let memory: Sweeping<MemoryStore> = Sweeping {
///     name: "memory",
///     open: |_path, clock, _sweep| MemoryStore::with_clock(clock),
///     record_count: |store| store.len() as u64,
/// };
/// let sweep = Sweep { interval: std::time::Duration::from_millis(20), batch: 100 };
/// let store = (memory.open)(std::path::Path::new("unused"), ManualClock::new(), sweep);
/// assert_eq!((memory.record_count)(&store), 0);
/// ```
pub struct Sweeping<S> {
    /// The store's name, such as `"redb"`: the extension of the path the suite opens.
    pub name: &'static str,
    /// Opens a new store at a path in an empty directory, reading `clock` and sweeping
    /// as `Sweep` says.
    pub open: fn(&Path, ManualClock, Sweep) -> S,
    /// How many records the store holds, live or expired.
    pub record_count: fn(&S) -> u64,
}

impl<S> std::fmt::Debug for Sweeping<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sweeping")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Runs the sweeping suite: one `#[test]` a case, in a module `sweeping`, each given the
/// [`Sweeping`] that `$make` (a function) returns.
///
/// ```no_run
/// use idem_core::testing::sweeping::Sweeping;
/// use idem_core::MemoryStore;
///
/// // An example only: a memory store sweeps only when asked and fails the suite.
/// fn memory() -> Sweeping<MemoryStore> {
///     Sweeping {
///         name: "memory",
///         open: |_path, clock, _sweep| MemoryStore::with_clock(clock),
///         record_count: |store| store.len() as u64,
///     }
/// }
///
/// idem_core::sweeping_suite!(memory);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! sweeping_suite {
    ($make:ident) => {
        mod sweeping {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn expired_records_are_swept_in_the_background() {
                $crate::testing::sweeping::expired_records_are_swept_in_the_background(
                    super::$make(),
                )
                .await;
            }
        }
    };
}

fn key(i: usize) -> ScopedKey {
    ScopedKey::new(Scope::new("sweep"), Key::new(&format!("k-{i}")).unwrap())
}

/// 1,000 records expire at once; swept 100 at a time, they leave the store within 500
/// rounds of new claims, each served meanwhile, and the one live record stays.
#[doc(hidden)]
pub async fn expired_records_are_swept_in_the_background<S: Store>(sweeping: Sweeping<S>) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let clock = ManualClock::new();
    let sweep = Sweep {
        interval: Duration::from_millis(20),
        batch: 100,
    };
    let path = dir.path().join(format!("sweep.{}", sweeping.name));
    let store = (sweeping.open)(&path, clock.clone(), sweep);
    let record_count = || (sweeping.record_count)(&store);
    let fp = Fingerprint::builder().part("body", b"x").finish();
    for i in 0..1_000 {
        let Begin::Acquired(lease) = store
            .begin(&key(i), &fp, Duration::from_secs(5))
            .await
            .unwrap()
        else {
            panic!("not acquired")
        };
        if i % 2 == 0 {
            store
                .complete(
                    &key(i),
                    lease.token,
                    &Stored::new(200),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
        }
    }
    let survivor = key(1_000_000);
    store
        .begin(&survivor, &fp, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(record_count(), 1_001);

    clock.advance(Duration::from_secs(11));
    // While the backlog of 1,000 is swept 100 at a time, new claims keep being served.
    let mut rounds = 0;
    while record_count() > 1 + rounds {
        let fresh = key(2_000_000 + rounds as usize);
        assert!(matches!(
            store
                .begin(&fresh, &fp, Duration::from_secs(3600))
                .await
                .unwrap(),
            Begin::Acquired(_)
        ));
        rounds += 1;
        assert!(rounds < 500, "the sweeper did not empty the backlog");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        store.get(&survivor).await.unwrap().is_some(),
        "a live record was swept"
    );
    assert_eq!(record_count(), 1 + rounds);
}
