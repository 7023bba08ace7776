//! The driver of the store benchmarks: what one call does ([`Op`]), the completed keys a
//! replay needs ([`seed`]), and timed runs of many concurrent callers ([`Driver`]). The
//! store crates' criterion benches keep only their list of stores and their groups.
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use idem_core::testing::bench::{Driver, Op, seed};
//! use idem_core::{MemoryStore, Store};
//!
//! # #[tokio::main] async fn main() {
//! let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
//! seed(&*store).await;
//! let driver = Driver::new();
//! for op in Op::ALL {
//!     let took = driver.time(op, &store, 32, 10_000).await;
//!     println!("{}: {:?} a call", op.name(), took / 10_000);
//! }
//! # }
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::{Begin, Fingerprint, Key, Scope, ScopedKey, Store, Stored};

const LEASE: Duration = Duration::from_secs(60);
const RETAIN: Duration = Duration::from_secs(3600);

/// How many completed keys [`seed`] leaves for [`Op::Replay`] to replay, numbered from 0.
pub const REPLAY_KEYS: u64 = 1024;

fn key(i: u64) -> ScopedKey {
    ScopedKey::new(
        Scope::new("bench"),
        Key::new(&format!("key-{i}")).expect("valid key"),
    )
}

fn fingerprint() -> Fingerprint {
    Fingerprint::builder()
        .part("body", b"{\"cents\":100}")
        .finish()
}

fn outcome() -> Stored {
    Stored::new(201)
        .with_header("content-type", "application/json")
        .with_body(r#"{"id":"ch_1","status":"succeeded","cents":100}"#)
}

/// What one benchmarked call does, with key number `i`.
///
/// ```
/// use idem_core::testing::bench::Op;
/// use idem_core::MemoryStore;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let store = MemoryStore::new();
/// Op::BeginComplete.run(&store, 7).await;
/// assert_eq!(store.len(), 1);
/// assert_eq!(Op::BeginComplete.name(), "begin_complete");
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Claim the new key `i` and store its outcome: two writes (on a durable store, two
    /// synced commits unless concurrent callers share them).
    BeginComplete,
    /// `begin` on the completed key `i % REPLAY_KEYS`: a read. Needs [`seed`] first.
    Replay,
}

impl Op {
    /// Every operation, in the order the benches run them.
    pub const ALL: [Op; 2] = [Op::BeginComplete, Op::Replay];

    /// The name of the operation's benchmark group.
    pub fn name(self) -> &'static str {
        match self {
            Op::BeginComplete => "begin_complete",
            Op::Replay => "replay",
        }
    }

    /// Makes the call with key number `i`; panics if the store answers otherwise than a
    /// well-behaved store would.
    pub async fn run(self, store: &dyn Store, i: u64) {
        match self {
            Op::BeginComplete => {
                let Ok(Begin::Acquired(lease)) = store.begin(&key(i), &fingerprint(), LEASE).await
                else {
                    panic!("new key {i} not acquired")
                };
                store
                    .complete(&key(i), lease.token, &outcome(), RETAIN)
                    .await
                    .expect("complete");
            }
            Op::Replay => {
                let Ok(Begin::Completed { .. }) = store
                    .begin(&key(i % REPLAY_KEYS), &fingerprint(), LEASE)
                    .await
                else {
                    panic!("completed key not replayed")
                };
            }
        }
    }
}

/// Completes the keys `0..REPLAY_KEYS` in `store`, for [`Op::Replay`].
///
/// ```
/// use idem_core::testing::bench::{REPLAY_KEYS, seed};
/// use idem_core::MemoryStore;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let store = MemoryStore::new();
/// seed(&store).await;
/// assert_eq!(store.len() as u64, REPLAY_KEYS);
/// # }
/// ```
pub async fn seed(store: &dyn Store) {
    for i in 0..REPLAY_KEYS {
        Op::BeginComplete.run(store, i).await;
    }
}

/// Times runs of calls split over concurrent callers; hands every run key numbers that
/// no run before it used (past the seeded ones), so [`Op::BeginComplete`] always claims
/// new keys, whatever the store.
///
/// ```
/// use std::sync::Arc;
///
/// use idem_core::testing::bench::{Driver, Op};
/// use idem_core::{MemoryStore, Store};
///
/// # #[tokio::main] async fn main() {
/// let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
/// let driver = Driver::new();
/// driver.time(Op::BeginComplete, &store, 4, 100).await;
/// driver.time(Op::BeginComplete, &store, 4, 100).await;
/// # }
/// ```
#[derive(Debug)]
pub struct Driver {
    next: AtomicU64,
}

impl Default for Driver {
    fn default() -> Self {
        Self::new()
    }
}

impl Driver {
    /// A driver whose first run starts at key number [`REPLAY_KEYS`].
    pub fn new() -> Self {
        Self {
            next: AtomicU64::new(REPLAY_KEYS),
        }
    }

    /// Runs `iters` calls of `op` on `store`, split over `callers` concurrent tasks, and
    /// returns how long they took together (for criterion's `iter_custom`).
    pub async fn time(&self, op: Op, store: &Arc<dyn Store>, callers: u64, iters: u64) -> Duration {
        let start = Instant::now();
        let first = self.next.fetch_add(iters, Ordering::Relaxed);
        let mut tasks = Vec::new();
        for caller in 0..callers {
            let store = Arc::clone(store);
            tasks.push(tokio::spawn(async move {
                let mut i = caller;
                while i < iters {
                    // A clone a call, as the benches' earlier closures took: figures stay
                    // comparable with earlier runs.
                    let call = Arc::clone(&store);
                    op.run(&*call, first + i).await;
                    i += callers;
                }
            }));
        }
        for task in tasks {
            task.await.expect("caller task");
        }
        start.elapsed()
    }
}
