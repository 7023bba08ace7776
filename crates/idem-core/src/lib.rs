//! # idem: exactly-once effects for retried operations
//!
//! A client that timed out and retries with the same idempotency key must get the first
//! answer back, not a second execution. This crate holds what every part of idem shares:
//!
//! - [`Key`], [`Scope`] and [`ScopedKey`]: which record a request names, per tenant;
//! - [`Fingerprint`]: what makes a retry the same request;
//! - [`Record`], [`Stored`], [`Token`], [`Begin`]: what is kept and what a claim answers;
//! - the [`Store`] trait, its state machine ([`transition`]) and the in-process
//!   [`MemoryStore`];
//! - [`Clock`]: injectable time, so lease and retention are testable without sleeping;
//! - with feature `testing`, the conformance suite and model test every store must pass.
//!
//! It does no I/O of its own; HTTP, brokers and durable stores live in sibling crates.
//!
//! ```
//! use std::time::Duration;
//! use idem_core::{Begin, Fingerprint, Key, MemoryStore, Scope, ScopedKey, Store};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idem_core::StoreError> {
//! let store = MemoryStore::new();
//! let key = ScopedKey::new(Scope::anonymous(), Key::parse(b"\"order-7\"").unwrap());
//! let fingerprint = Fingerprint::builder().part("body", b"{}").finish();
//! let first = store.begin(&key, &fingerprint, Duration::from_secs(30)).await?;
//! let second = store.begin(&key, &fingerprint, Duration::from_secs(30)).await?;
//! assert!(matches!(first, Begin::Acquired(_)));
//! assert!(matches!(second, Begin::InFlight { .. }));
//! # Ok(()) }
//! ```

mod clock;
mod deadline;
#[cfg(any(test, feature = "testing"))]
mod faulty;
mod fingerprint;
mod holder;
mod key;
mod memory;
mod record;
mod store;

#[cfg(feature = "testing")]
pub mod testing;

pub use clock::{Clock, ManualClock, SystemClock, from_unix_millis, to_millis, unix_millis};
pub use deadline::{TimeoutStore, within};
pub use fingerprint::{Fingerprint, FingerprintBuilder};
pub use holder::{HoldOptions, Holder};
pub use key::{DEFAULT_MAX_KEY_LEN, Key, KeyError, Scope, ScopedKey};
pub use memory::{DEFAULT_MAX_BYTES, MemoryLimits, MemoryStore, RECORD_OVERHEAD};
pub use record::{Begin, InFlightRecord, Lease, Record, RecordState, Stored, Token};
pub use store::{
    BoxError, CommitCounters, Store, StoreCounters, StoreError, spawn_sweeper, transition,
};
