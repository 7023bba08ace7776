//! A store in process memory: for tests, demos and single-process services that accept
//! losing their records on restart.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::clock::{Clock, SystemClock};
use crate::record::{Begin, Lease, Record, Stored, Token};
use crate::store::{Store, StoreError, transition};
use crate::{Fingerprint, ScopedKey};

/// Records in a hash map behind a mutex. Expired records read as absent at once and are
/// removed by [`Store::sweep`] (see [`spawn_sweeper`](crate::spawn_sweeper)).
///
/// Nothing survives the process; use `idem-redb` for durability.
///
/// ```
/// use idem::{ManualClock, MemoryStore};
///
/// let clock = ManualClock::new();
/// let store = MemoryStore::with_clock(clock.clone());
/// # let _ = store;
/// ```
#[derive(Debug)]
pub struct MemoryStore {
    records: Mutex<HashMap<ScopedKey, Record>>,
    // One counter for the whole store makes tokens grow per key even after a key is
    // released or swept and claimed afresh.
    last_token: AtomicU64,
    clock: Arc<dyn Clock>,
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
            clock: Arc::new(clock),
        }
    }

    fn records(&self) -> MutexGuard<'_, HashMap<ScopedKey, Record>> {
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
            transition::begin(records.get(key), fingerprint, now, lease, || self.mint());
        if let Some(record) = write {
            records.insert(key.clone(), record);
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
        let record = transition::complete(records.get(key), token, stored, now, retain)?;
        let expires_at = record.expires_at();
        records.insert(key.clone(), record);
        Ok(expires_at)
    }

    async fn release(&self, key: &ScopedKey, token: Token) -> Result<(), StoreError> {
        let now = self.clock.now();
        let mut records = self.records();
        transition::held(records.get(key), token, now)?;
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
        let record = transition::renew(records.get(key), token, now, lease)?;
        let renewed = Lease {
            token,
            expires_at: record.expires_at(),
        };
        records.insert(key.clone(), record);
        Ok(renewed)
    }

    async fn get(&self, key: &ScopedKey) -> Result<Option<Record>, StoreError> {
        let now = self.clock.now();
        Ok(transition::live(self.records().get(key), now).cloned())
    }

    async fn delete(&self, key: &ScopedKey) -> Result<bool, StoreError> {
        let now = self.clock.now();
        let removed = self.records().remove(key);
        Ok(transition::live(removed.as_ref(), now).is_some())
    }

    async fn sweep(&self, limit: usize) -> Result<usize, StoreError> {
        let now = self.clock.now();
        let mut records = self.records();
        let expired: Vec<ScopedKey> = records
            .iter()
            .filter(|(_, record)| !record.is_live(now))
            .map(|(key, _)| key.clone())
            .take(limit)
            .collect();
        for key in &expired {
            records.remove(key);
        }
        Ok(expired.len())
    }
}

impl MemoryStore {
    /// How many records the map holds, live or expired but not yet swept.
    pub fn len(&self) -> usize {
        self.records().len()
    }

    /// Whether the map holds no record at all.
    pub fn is_empty(&self) -> bool {
        self.records().is_empty()
    }
}
