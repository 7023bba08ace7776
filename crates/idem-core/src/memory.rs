//! A store in process memory: for tests, demos and single-process services that accept
//! losing their records on restart.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::clock::{Clock, SystemClock};
use crate::record::{Begin, InFlightRecord, Lease, Record, RecordState, Stored, Token};
use crate::store::{Store, StoreCounters, StoreError, transition};
use crate::{Fingerprint, ScopedKey};

/// Records in a hash map behind a mutex. Expired records read as absent at once and are
/// removed by [`Store::sweep`] (see [`spawn_sweeper`](crate::spawn_sweeper)); an in-flight
/// record whose lease ended is kept one more lease length first, so that its holder's late
/// `complete` still finds it.
///
/// Nothing survives the process; use `idem-redb` for durability.
///
/// ```
/// use idem_core::{ManualClock, MemoryStore};
///
/// let clock = ManualClock::new();
/// let store = MemoryStore::with_clock(clock.clone());
/// # let _ = store;
/// ```
#[derive(Debug)]
pub struct MemoryStore {
    records: Mutex<HashMap<ScopedKey, Kept>>,
    // One counter for the whole store makes tokens grow per key even after a key is
    // released or swept and claimed afresh.
    last_token: AtomicU64,
    swept: AtomicU64,
    clock: Arc<dyn Clock>,
}

/// A record and until when the store keeps it (see [`transition::kept_until`]).
#[derive(Debug)]
struct Kept {
    record: Record,
    until: SystemTime,
    // When the current token claimed the key, for `in_flight`.
    claimed_at: SystemTime,
}

impl Kept {
    fn in_flight(record: Record, lease: Duration, claimed_at: SystemTime) -> Self {
        let until = transition::kept_until(record.expires_at(), lease);
        Self {
            record,
            until,
            claimed_at,
        }
    }

    fn completed(record: Record, claimed_at: SystemTime) -> Self {
        let until = record.expires_at();
        Self {
            record,
            until,
            claimed_at,
        }
    }
}

/// The record of `key` if the store still keeps it at `now`, expired or not.
fn kept<'a>(
    records: &'a HashMap<ScopedKey, Kept>,
    key: &ScopedKey,
    now: SystemTime,
) -> Option<&'a Record> {
    records
        .get(key)
        .filter(|kept| now < kept.until)
        .map(|kept| &kept.record)
}

impl MemoryStore {
    /// An empty store on the system clock.
    pub fn new() -> Self {
        Self::with_clock(SystemClock)
    }

    /// An empty store on the given clock.
    pub fn with_clock(clock: impl Clock) -> Self {
        Self {
            records: Mutex::new(HashMap::new()),
            last_token: AtomicU64::new(0),
            swept: AtomicU64::new(0),
            clock: Arc::new(clock),
        }
    }

    fn records(&self) -> MutexGuard<'_, HashMap<ScopedKey, Kept>> {
        // A panic while holding the lock cannot leave a half-written record (every update is
        // one insert or remove), so a poisoned map is still consistent.
        self.records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn mint(&self) -> Token {
        Token::new(self.last_token.fetch_add(1, Ordering::Relaxed) + 1)
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn begin(
        &self,
        key: &ScopedKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let now = self.clock.now();
        let mut records = self.records();
        let (answer, write) =
            transition::begin(kept(&records, key, now), fingerprint, now, lease, || {
                self.mint()
            })?;
        if let Some(record) = write {
            records.insert(key.clone(), Kept::in_flight(record, lease, now));
        }
        Ok(answer)
    }

    async fn complete(
        &self,
        key: &ScopedKey,
        token: Token,
        stored: &Stored,
        retain: Duration,
    ) -> Result<SystemTime, StoreError> {
        let now = self.clock.now();
        let mut records = self.records();
        let (expires_at, write) =
            transition::complete(kept(&records, key, now), token, stored, now, retain)?;
        if let Some(record) = write {
            let claimed_at = records.get(key).map_or(now, |kept| kept.claimed_at);
            records.insert(key.clone(), Kept::completed(record, claimed_at));
        }
        Ok(expires_at)
    }

    async fn release(&self, key: &ScopedKey, token: Token) -> Result<(), StoreError> {
        let now = self.clock.now();
        let mut records = self.records();
        transition::held(kept(&records, key, now), token, now)?;
        records.remove(key);
        Ok(())
    }

    async fn renew(
        &self,
        key: &ScopedKey,
        token: Token,
        lease: Duration,
    ) -> Result<Lease, StoreError> {
        let now = self.clock.now();
        let mut records = self.records();
        let record = transition::renew(kept(&records, key, now), token, now, lease)?;
        let renewed = Lease {
            token,
            expires_at: record.expires_at(),
        };
        let claimed_at = records.get(key).map_or(now, |kept| kept.claimed_at);
        records.insert(key.clone(), Kept::in_flight(record, lease, claimed_at));
        Ok(renewed)
    }

    async fn get(&self, key: &ScopedKey) -> Result<Option<Record>, StoreError> {
        let now = self.clock.now();
        Ok(transition::live(kept(&self.records(), key, now), now).cloned())
    }

    async fn delete(&self, key: &ScopedKey) -> Result<bool, StoreError> {
        let now = self.clock.now();
        let removed = self.records().remove(key);
        Ok(transition::live(removed.as_ref().map(|kept| &kept.record), now).is_some())
    }

    async fn sweep(&self, limit: usize) -> Result<usize, StoreError> {
        let now = self.clock.now();
        let mut records = self.records();
        let expired: Vec<ScopedKey> = records
            .iter()
            .filter(|(_, kept)| now >= kept.until)
            .map(|(key, _)| key.clone())
            .take(limit)
            .collect();
        for key in &expired {
            records.remove(key);
        }
        self.swept
            .fetch_add(expired.len() as u64, Ordering::Relaxed);
        Ok(expired.len())
    }

    // A scan of the whole map: the memory store is for tests and small services.
    async fn in_flight(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> Result<Vec<InFlightRecord>, StoreError> {
        let now = self.clock.now();
        let records = self.records();
        let mut held: Vec<InFlightRecord> = records
            .iter()
            .filter(|(_, kept)| kept.record.is_live(now))
            .filter(|(_, kept)| {
                now.duration_since(kept.claimed_at)
                    .is_ok_and(|age| age >= older_than)
            })
            .filter_map(|(key, kept)| match kept.record.state {
                RecordState::InFlight { lease_expires_at } => Some(InFlightRecord {
                    key: key.clone(),
                    token: kept.record.token,
                    claimed_at: kept.claimed_at,
                    lease_expires_at,
                }),
                RecordState::Completed { .. } => None,
            })
            .collect();
        held.sort_by_key(|record| record.claimed_at);
        held.truncate(limit);
        Ok(held)
    }

    fn counters(&self) -> StoreCounters {
        StoreCounters {
            records: Some(self.len() as u64),
            swept: Some(self.swept.load(Ordering::Relaxed)),
            ..StoreCounters::default()
        }
    }
}

impl MemoryStore {
    /// How many records the map holds, live or expired but not yet swept (an in-flight
    /// record is kept one lease length past its lease).
    pub fn len(&self) -> usize {
        self.records().len()
    }

    /// Whether the map holds no record at all.
    pub fn is_empty(&self) -> bool {
        self.records().is_empty()
    }
}
