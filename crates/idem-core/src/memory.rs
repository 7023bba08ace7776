//! A store in process memory: for tests, demos and single-process services that accept
//! losing their records on restart.

use std::collections::BinaryHeap;
use std::fmt;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use hashbrown::HashTable;
use hashbrown::hash_table::Entry as Slot;

use crate::clock::{Clock, SystemClock};
use crate::record::{Begin, InFlightRecord, Lease, Record, RecordState, Stored, Token};
use crate::store::{Store, StoreCounters, StoreError, transition};
use crate::{Fingerprint, Key, Scope, ScopedKey};

/// The memory store's default [`MemoryLimits::max_bytes`]: 16 MiB of records (about 85,000
/// of a small JSON response), which keeps `idem serve --store memory:` under 64 MiB of
/// resident memory however many new keys arrive: measured at 49 MiB after 60 s of new keys
/// from 64 connections, against 64 MiB with 24 MiB of records (each counted MiB takes about
/// 1.3 MiB resident, and a gateway under load about 37 MiB before it holds any).
pub const DEFAULT_MAX_BYTES: usize = 16 << 20;

/// What a record costs beyond its encoded bytes, as the store counts it against
/// [`MemoryLimits::max_bytes`]: its slot in the hash table (24 bytes and a tag byte, at a
/// load between 7/16 and 7/8) and the allocator's rounding.
pub const RECORD_OVERHEAD: usize = 48;

/// How much the [`MemoryStore`] may hold. A `begin` that would add a record beyond either
/// limit is refused with [`StoreError::Full`]; nothing is ever evicted to make room, so a
/// live record is kept until it expires, is released or is deleted.
///
/// The limits bound new keys only. A `complete` is never refused (refusing it would lose an
/// outcome that already happened), so the bytes counted may exceed `max_bytes` by the
/// outcomes of the requests in flight when the store filled up. A record counts from its
/// claim until [`Store::sweep`] removes it after it expired.
///
/// ```
/// use idem_core::{MemoryLimits, MemoryStore};
///
/// let limits = MemoryLimits::default().max_records(10_000).max_bytes(4 << 20);
/// assert_eq!(limits.records(), 10_000);
/// let store = MemoryStore::with_limits(limits);
/// assert_eq!(store.limits(), limits);
/// assert_eq!(MemoryLimits::default().bytes(), idem_core::DEFAULT_MAX_BYTES);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemoryLimits {
    max_records: usize,
    max_bytes: usize,
}

impl MemoryLimits {
    /// No limit at all: the store grows until the process runs out of memory. For
    /// benchmarks and tests that want to see growth.
    pub const UNLIMITED: Self = Self {
        max_records: usize::MAX,
        max_bytes: usize::MAX,
    };

    /// At most `max` records, live or expired but not yet swept.
    pub fn max_records(self, max: usize) -> Self {
        Self {
            max_records: max,
            ..self
        }
    }

    /// At most `max` bytes of records: each record's encoded size (key, fingerprint, times,
    /// response status, headers and body) plus [`RECORD_OVERHEAD`].
    pub fn max_bytes(self, max: usize) -> Self {
        Self {
            max_bytes: max,
            ..self
        }
    }

    /// The record limit (`usize::MAX`: none).
    pub fn records(&self) -> usize {
        self.max_records
    }

    /// The byte limit (`usize::MAX`: none).
    pub fn bytes(&self) -> usize {
        self.max_bytes
    }
}

impl Default for MemoryLimits {
    /// No record limit and [`DEFAULT_MAX_BYTES`].
    fn default() -> Self {
        Self {
            max_records: usize::MAX,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

/// Records in process memory, in many small hash tables ("shards") each behind its own
/// mutex. A call locks only the shard its key hashes to, so callers on different keys
/// rarely wait for one another, and a shard that grows rehashes only its own records: the
/// shard count is chosen from the limits so that a full store has about 1024 records per
/// shard, which keeps every stall short however many records the store holds. A record is one allocation holding its key, fingerprint, token, times
/// and (once completed) the response in a compact encoding.
///
/// Expired records read as absent at once and are removed by [`Store::sweep`] (see
/// [`spawn_sweeper`](crate::spawn_sweeper)); an in-flight record whose lease ended is kept
/// one more lease length first, so that its holder's late `complete` still finds it. The
/// store holds at most what its [`MemoryLimits`] allow: beyond them a new key is refused
/// with [`StoreError::Full`], never by evicting a record.
///
/// Nothing survives the process; use `idem-redb` for durability.
///
/// ```
/// use idem_core::{ManualClock, MemoryLimits, MemoryStore};
///
/// let clock = ManualClock::new();
/// let store = MemoryStore::with_clock(clock.clone());
/// let small = MemoryStore::with_clock_and_limits(clock, MemoryLimits::default().max_records(100));
/// # let _ = (store, small);
/// ```
pub struct MemoryStore {
    shards: Box<[Shard]>,
    hasher: RandomState,
    // One counter for the whole store makes tokens grow per key even after a key is
    // released or swept and claimed afresh.
    last_token: AtomicU64,
    swept: AtomicU64,
    clock: Arc<dyn Clock>,
    limits: MemoryLimits,
    records: AtomicUsize,
    bytes: AtomicUsize,
    // The shard the next sweep starts at, so that successive sweeps go round the store.
    sweep_from: AtomicUsize,
}

/// About how many records one shard holds when the store is at its limits: small enough
/// that a shard's resize (which rehashes its records under its lock) takes microseconds.
const SHARD_TARGET: usize = 1024;

/// The smallest encoded record, for deriving the shard count from a byte limit.
const MIN_RECORD: usize = 96;

const MIN_SHARDS: usize = 16;
const MAX_SHARDS: usize = 1 << 14;

// Aligned to a cache line so that two shards' locks never share one.
#[repr(align(64))]
#[derive(Default)]
struct Shard(Mutex<HashTable<Entry>>);

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("records", &self.len())
            .field("bytes", &self.bytes())
            .field("limits", &self.limits)
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

impl MemoryStore {
    /// An empty store on the system clock, with the default [`MemoryLimits`].
    pub fn new() -> Self {
        Self::with_clock(SystemClock)
    }

    /// An empty store on the given clock, with the default [`MemoryLimits`].
    pub fn with_clock(clock: impl Clock) -> Self {
        Self::with_clock_and_limits(clock, MemoryLimits::default())
    }

    /// An empty store on the system clock that holds at most `limits`.
    pub fn with_limits(limits: MemoryLimits) -> Self {
        Self::with_clock_and_limits(SystemClock, limits)
    }

    /// An empty store on the given clock that holds at most `limits`.
    pub fn with_clock_and_limits(clock: impl Clock, limits: MemoryLimits) -> Self {
        let most = limits.max_records.min(limits.max_bytes / MIN_RECORD);
        let shards = (most / SHARD_TARGET)
            .clamp(MIN_SHARDS, MAX_SHARDS)
            .next_power_of_two();
        Self {
            shards: (0..shards).map(|_| Shard::default()).collect(),
            hasher: RandomState::new(),
            last_token: AtomicU64::new(0),
            swept: AtomicU64::new(0),
            clock: Arc::new(clock),
            limits,
            records: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            sweep_from: AtomicUsize::new(0),
        }
    }

    /// The limits the store was made with.
    pub fn limits(&self) -> MemoryLimits {
        self.limits
    }

    /// How many records the store holds, live or expired but not yet swept (an in-flight
    /// record is kept one lease length past its lease).
    pub fn len(&self) -> usize {
        self.records.load(Ordering::Relaxed)
    }

    /// Whether the store holds no record at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes its records take, as counted against [`MemoryLimits::max_bytes`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use idem_core::{Fingerprint, Key, MemoryStore, Scope, ScopedKey, Store};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idem_core::StoreError> {
    /// let store = MemoryStore::new();
    /// assert_eq!(store.bytes(), 0);
    /// let key = ScopedKey::new(Scope::anonymous(), Key::new("k").unwrap());
    /// let fingerprint = Fingerprint::builder().finish();
    /// store.begin(&key, &fingerprint, Duration::from_secs(30)).await?;
    /// assert!(store.bytes() > 0 && store.bytes() < 200);
    /// # Ok(()) }
    /// ```
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    fn mint(&self) -> Token {
        Token::new(self.last_token.fetch_add(1, Ordering::Relaxed) + 1)
    }

    fn hash(&self, scope: &[u8], key: &[u8]) -> u64 {
        // SipHash with a random key: client-chosen keys cannot be made to collide.
        let mut hasher = self.hasher.build_hasher();
        hasher.write_usize(scope.len());
        hasher.write(scope);
        hasher.write(key);
        hasher.finish()
    }

    /// The shard of `hash`, locked. Bits 40 and up pick the shard: hashbrown uses the low
    /// bits for the slot and the top 7 for its tags.
    fn shard(&self, hash: u64) -> MutexGuard<'_, HashTable<Entry>> {
        let index = (hash >> 40) as usize & (self.shards.len() - 1);
        lock(&self.shards[index])
    }

    /// Counts a new record of `charge` bytes, or refuses it if the store is full.
    fn reserve(&self, charge: usize) -> Result<(), StoreError> {
        let records = self.records.fetch_add(1, Ordering::Relaxed);
        if records >= self.limits.max_records {
            self.records.fetch_sub(1, Ordering::Relaxed);
            return Err(StoreError::Full {
                resource: "records",
                limit: self.limits.max_records as u64,
            });
        }
        let bytes = self.bytes.fetch_add(charge, Ordering::Relaxed);
        if bytes.saturating_add(charge) > self.limits.max_bytes {
            self.bytes.fetch_sub(charge, Ordering::Relaxed);
            self.records.fetch_sub(1, Ordering::Relaxed);
            return Err(StoreError::Full {
                resource: "bytes",
                limit: self.limits.max_bytes as u64,
            });
        }
        Ok(())
    }

    /// Counts the replacement of a record by one of another size; never refused.
    fn recharge(&self, old: usize, new: usize) {
        if new >= old {
            self.bytes.fetch_add(new - old, Ordering::Relaxed);
        } else {
            self.bytes.fetch_sub(old - new, Ordering::Relaxed);
        }
    }

    fn discharge(&self, charge: usize) {
        self.bytes.fetch_sub(charge, Ordering::Relaxed);
        self.records.fetch_sub(1, Ordering::Relaxed);
    }
}

fn lock(shard: &Shard) -> MutexGuard<'_, HashTable<Entry>> {
    // Every update is one assignment, insert or remove of a whole entry, so a panic while
    // the lock was held cannot leave a half-written record: a poisoned shard is consistent.
    shard
        .0
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

fn name_of(key: &ScopedKey) -> (&[u8], &[u8]) {
    (
        key.scope().as_str().as_bytes(),
        key.key().as_str().as_bytes(),
    )
}

/// The record of an entry if the store still keeps it at `now`, expired or not.
fn kept(entry: Option<&Entry>, now: SystemTime) -> Result<Option<Record>, StoreError> {
    match entry {
        Some(entry) if now < entry.until() => entry.record().map(Some),
        _ => Ok(None),
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
        let (scope, name) = name_of(key);
        let hash = self.hash(scope, name);
        let mut table = self.shard(hash);
        match table.entry(hash, |e| e.named(hash, scope, name), |e| e.hash) {
            Slot::Occupied(mut slot) => {
                let current = kept(Some(slot.get()), now)?;
                let (answer, write) =
                    transition::begin(current.as_ref(), fingerprint, now, lease, || self.mint())?;
                if let Some(record) = write {
                    // A takeover, or a claim over an expired record not yet swept: the
                    // record replaces one the store already counts, so it is never refused.
                    let entry = Entry::in_flight(scope, name, &record, lease, now).at(hash);
                    self.recharge(slot.get().charge(), entry.charge());
                    *slot.get_mut() = entry;
                }
                Ok(answer)
            }
            Slot::Vacant(slot) => {
                let (answer, write) =
                    transition::begin(None, fingerprint, now, lease, || self.mint())?;
                if let Some(record) = write {
                    let entry = Entry::in_flight(scope, name, &record, lease, now).at(hash);
                    self.reserve(entry.charge())?;
                    slot.insert(entry);
                }
                Ok(answer)
            }
        }
    }

    async fn complete(
        &self,
        key: &ScopedKey,
        token: Token,
        stored: &Stored,
        retain: Duration,
    ) -> Result<SystemTime, StoreError> {
        let now = self.clock.now();
        let (scope, name) = name_of(key);
        let hash = self.hash(scope, name);
        let mut table = self.shard(hash);
        let mut slot = table.find_mut(hash, |e| e.named(hash, scope, name));
        let current = kept(slot.as_deref(), now)?;
        let (expires_at, write) =
            transition::complete(current.as_ref(), token, stored, now, retain)?;
        if let (Some(record), Some(slot)) = (write, slot.as_mut()) {
            let entry =
                Entry::completed(scope, name, &record.fingerprint, token, expires_at, stored)
                    .at(hash);
            self.recharge(slot.charge(), entry.charge());
            **slot = entry;
        }
        Ok(expires_at)
    }

    async fn release(&self, key: &ScopedKey, token: Token) -> Result<(), StoreError> {
        let now = self.clock.now();
        let (scope, name) = name_of(key);
        let hash = self.hash(scope, name);
        let mut table = self.shard(hash);
        let Ok(slot) = table.find_entry(hash, |e| e.named(hash, scope, name)) else {
            return Err(StoreError::LeaseLost);
        };
        transition::held(kept(Some(slot.get()), now)?.as_ref(), token, now)?;
        let (entry, _) = slot.remove();
        self.discharge(entry.charge());
        Ok(())
    }

    async fn renew(
        &self,
        key: &ScopedKey,
        token: Token,
        lease: Duration,
    ) -> Result<Lease, StoreError> {
        let now = self.clock.now();
        let (scope, name) = name_of(key);
        let hash = self.hash(scope, name);
        let mut table = self.shard(hash);
        let mut slot = table.find_mut(hash, |e| e.named(hash, scope, name));
        let record = transition::renew(kept(slot.as_deref(), now)?.as_ref(), token, now, lease)?;
        let lease_expires_at = record.expires_at();
        if let Some(entry) = slot.as_mut() {
            entry.renew(
                lease_expires_at,
                transition::kept_until(lease_expires_at, lease),
            );
        }
        Ok(Lease {
            token,
            expires_at: lease_expires_at,
        })
    }

    async fn get(&self, key: &ScopedKey) -> Result<Option<Record>, StoreError> {
        let now = self.clock.now();
        let (scope, name) = name_of(key);
        let hash = self.hash(scope, name);
        let table = self.shard(hash);
        let record = kept(table.find(hash, |e| e.named(hash, scope, name)), now)?;
        Ok(record.filter(|record| record.is_live(now)))
    }

    async fn delete(&self, key: &ScopedKey) -> Result<bool, StoreError> {
        let now = self.clock.now();
        let (scope, name) = name_of(key);
        let hash = self.hash(scope, name);
        let mut table = self.shard(hash);
        let Ok(slot) = table.find_entry(hash, |e| e.named(hash, scope, name)) else {
            return Ok(false);
        };
        let (entry, _) = slot.remove();
        self.discharge(entry.charge());
        Ok(entry.live_at(now))
    }

    /// Removes up to `limit` expired records, going round the shards from where the last
    /// sweep stopped. The work per call is bounded: it looks at about `64 × limit` records
    /// at most (whole shards, each under its own lock), so a store full of live records is
    /// gone round in `len / (64 × limit)` calls.
    async fn sweep(&self, limit: usize) -> Result<usize, StoreError> {
        let now = self.clock.now();
        let budget = limit.saturating_mul(64);
        let count = self.shards.len();
        let start = self.sweep_from.load(Ordering::Relaxed) % count;
        let (mut removed, mut looked) = (0, 0);
        let mut next = start;
        for step in 0..count {
            if removed >= limit || looked >= budget {
                break;
            }
            let index = (start + step) % count;
            let mut table = lock(&self.shards[index]);
            looked += table.len();
            for entry in table.extract_if(|entry| now >= entry.until()) {
                self.discharge(entry.charge());
                removed += 1;
                if removed >= limit {
                    break;
                }
            }
            // A shard left at the limit may hold more expired records: start there next.
            next = if removed >= limit { index } else { index + 1 };
        }
        self.sweep_from.store(next % count, Ordering::Relaxed);
        self.swept.fetch_add(removed as u64, Ordering::Relaxed);
        Ok(removed)
    }

    // A scan of every shard, one lock at a time: the memory store keeps no index by claim
    // time. Only the `limit` oldest claims are kept while scanning.
    async fn in_flight(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> Result<Vec<InFlightRecord>, StoreError> {
        let now = self.clock.now();
        if limit == 0 {
            return Ok(Vec::new());
        }
        // A max-heap by claim time: its top is the youngest of the oldest `limit`.
        let mut oldest: BinaryHeap<OldClaim> = BinaryHeap::new();
        for shard in &*self.shards {
            let table = lock(shard);
            for entry in table.iter() {
                let Some((claimed_at, lease_expires_at)) = entry.in_flight_times() else {
                    continue;
                };
                let old_enough = now
                    .duration_since(claimed_at)
                    .is_ok_and(|age| age >= older_than);
                if now >= lease_expires_at || !old_enough {
                    continue;
                }
                if oldest.len() >= limit
                    && oldest
                        .peek()
                        .is_some_and(|top| top.claimed_at <= claimed_at)
                {
                    continue;
                }
                oldest.push(OldClaim {
                    claimed_at,
                    record: entry.in_flight_record(claimed_at, lease_expires_at)?,
                });
                if oldest.len() > limit {
                    oldest.pop();
                }
            }
        }
        Ok(oldest
            .into_sorted_vec()
            .into_iter()
            .map(|claim| claim.record)
            .collect())
    }

    fn counters(&self) -> StoreCounters {
        StoreCounters {
            records: Some(self.len() as u64),
            swept: Some(self.swept.load(Ordering::Relaxed)),
            ..StoreCounters::default()
        }
    }
}

/// An in-flight record ordered by claim time, for [`MemoryStore::in_flight`].
struct OldClaim {
    claimed_at: SystemTime,
    record: InFlightRecord,
}

impl PartialEq for OldClaim {
    fn eq(&self, other: &Self) -> bool {
        self.claimed_at == other.claimed_at
    }
}
impl Eq for OldClaim {}
impl PartialOrd for OldClaim {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OldClaim {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.claimed_at.cmp(&other.claimed_at)
    }
}

/// One record in one allocation. Times are nanoseconds since the Unix epoch (exact for the
/// system clock on Linux), integers little-endian, lengths LEB128:
///
/// ```text
/// in flight: 0 | fingerprint[32] | token u64 | until u64 | lease_end u64 | claimed_at u64 | name
/// completed: 1 | fingerprint[32] | token u64 | until u64 |                                  name | outcome
/// name:      len(scope) scope len(key) key
/// outcome:   the response as Stored::encode writes it, without the version byte (postcard)
/// ```
///
/// `until` is when the store may forget the record: a completed record's retention end, an
/// in-flight record's lease end plus one more lease length.
struct Entry {
    // The key's hash, kept beside the pointer so that a growing table moves its entries
    // without reading (and missing the cache on) each record, or hashing its key again.
    hash: u64,
    bytes: Box<[u8]>,
}

const IN_FLIGHT: u8 = 0;
const COMPLETED: u8 = 1;
const FINGERPRINT_AT: usize = 1;
const TOKEN_AT: usize = FINGERPRINT_AT + 32;
const UNTIL_AT: usize = TOKEN_AT + 8;
const LEASE_END_AT: usize = UNTIL_AT + 8;
const CLAIMED_AT: usize = LEASE_END_AT + 8;
const IN_FLIGHT_HEAD: usize = CLAIMED_AT + 8;
const COMPLETED_HEAD: usize = UNTIL_AT + 8;

impl Entry {
    fn in_flight(
        scope: &[u8],
        key: &[u8],
        record: &Record,
        lease: Duration,
        claimed_at: SystemTime,
    ) -> Self {
        let lease_end = record.expires_at();
        let mut out = Vec::with_capacity(IN_FLIGHT_HEAD + 10 + scope.len() + key.len());
        head(&mut out, IN_FLIGHT, &record.fingerprint, record.token);
        put_time(&mut out, transition::kept_until(lease_end, lease));
        put_time(&mut out, lease_end);
        put_time(&mut out, claimed_at);
        put_name(&mut out, scope, key);
        Self {
            hash: 0,
            bytes: out.into_boxed_slice(),
        }
    }

    fn completed(
        scope: &[u8],
        key: &[u8],
        fingerprint: &Fingerprint,
        token: Token,
        expires_at: SystemTime,
        stored: &Stored,
    ) -> Self {
        let outcome_bound = 16
            + stored.body.as_ref().map_or(0, |body| body.len())
            + stored
                .headers
                .iter()
                .map(|(name, value)| 20 + name.len() + value.len())
                .sum::<usize>();
        let mut out =
            Vec::with_capacity(COMPLETED_HEAD + 10 + scope.len() + key.len() + outcome_bound);
        head(&mut out, COMPLETED, fingerprint, token);
        put_time(&mut out, expires_at);
        put_name(&mut out, scope, key);
        // Serializing strings, bytes and integers into a Vec cannot fail; were it ever to,
        // the outcome would decode as corrupt rather than as a wrong one.
        let out = postcard::to_extend(stored, out).unwrap_or_default();
        Self {
            hash: 0,
            bytes: out.into_boxed_slice(),
        }
    }

    /// The entry, for the key with this hash.
    fn at(self, hash: u64) -> Self {
        Self { hash, ..self }
    }

    fn named(&self, hash: u64, scope: &[u8], key: &[u8]) -> bool {
        self.hash == hash && self.is(scope, key)
    }

    /// What the record counts against the store's byte limit.
    fn charge(&self) -> usize {
        self.bytes.len() + RECORD_OVERHEAD
    }

    fn completed_state(&self) -> bool {
        self.bytes[0] == COMPLETED
    }

    fn u64_at(&self, at: usize) -> u64 {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(&self.bytes[at..at + 8]);
        u64::from_le_bytes(bytes)
    }

    fn time_at(&self, at: usize) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.u64_at(at))
    }

    fn until(&self) -> SystemTime {
        self.time_at(UNTIL_AT)
    }

    fn name_at(&self) -> usize {
        if self.completed_state() {
            COMPLETED_HEAD
        } else {
            IN_FLIGHT_HEAD
        }
    }

    /// Scope and key, and where the outcome starts.
    fn name_and_rest(&self) -> (&[u8], &[u8], usize) {
        let mut at = self.name_at();
        let scope_len = read_len(&self.bytes, &mut at);
        let scope = &self.bytes[at..at + scope_len];
        at += scope_len;
        let key_len = read_len(&self.bytes, &mut at);
        let key = &self.bytes[at..at + key_len];
        (scope, key, at + key_len)
    }

    fn name(&self) -> (&[u8], &[u8]) {
        let (scope, key, _) = self.name_and_rest();
        (scope, key)
    }

    fn is(&self, scope: &[u8], key: &[u8]) -> bool {
        self.name() == (scope, key)
    }

    fn live_at(&self, now: SystemTime) -> bool {
        let end = if self.completed_state() {
            self.until()
        } else {
            self.time_at(LEASE_END_AT)
        };
        now < end
    }

    fn in_flight_times(&self) -> Option<(SystemTime, SystemTime)> {
        (!self.completed_state()).then(|| (self.time_at(CLAIMED_AT), self.time_at(LEASE_END_AT)))
    }

    fn renew(&mut self, lease_end: SystemTime, until: SystemTime) {
        if !self.completed_state() {
            self.bytes[UNTIL_AT..UNTIL_AT + 8].copy_from_slice(&nanos(until).to_le_bytes());
            self.bytes[LEASE_END_AT..LEASE_END_AT + 8]
                .copy_from_slice(&nanos(lease_end).to_le_bytes());
        }
    }

    fn record(&self) -> Result<Record, StoreError> {
        let mut fingerprint = [0; 32];
        fingerprint.copy_from_slice(&self.bytes[FINGERPRINT_AT..TOKEN_AT]);
        let state = if self.completed_state() {
            let (_, _, outcome_at) = self.name_and_rest();
            let stored: Stored =
                postcard::from_bytes(&self.bytes[outcome_at..]).map_err(StoreError::corrupt)?;
            RecordState::Completed {
                stored: Arc::new(stored),
                expires_at: self.until(),
            }
        } else {
            RecordState::InFlight {
                lease_expires_at: self.time_at(LEASE_END_AT),
            }
        };
        Ok(Record {
            fingerprint: Fingerprint::from_bytes(fingerprint),
            token: Token::new(self.u64_at(TOKEN_AT)),
            state,
        })
    }

    fn in_flight_record(
        &self,
        claimed_at: SystemTime,
        lease_expires_at: SystemTime,
    ) -> Result<InFlightRecord, StoreError> {
        let (scope, key) = self.name();
        let scope = std::str::from_utf8(scope).map_err(StoreError::corrupt)?;
        let key = std::str::from_utf8(key).map_err(StoreError::corrupt)?;
        Ok(InFlightRecord {
            key: ScopedKey::new(
                Scope::new(scope),
                Key::from_stored(key).map_err(StoreError::corrupt)?,
            ),
            token: Token::new(self.u64_at(TOKEN_AT)),
            claimed_at,
            lease_expires_at,
        })
    }
}

fn nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
    })
}

fn head(out: &mut Vec<u8>, state: u8, fingerprint: &Fingerprint, token: Token) {
    out.push(state);
    out.extend_from_slice(fingerprint.as_bytes());
    out.extend_from_slice(&token.get().to_le_bytes());
}

fn put_time(out: &mut Vec<u8>, time: SystemTime) {
    out.extend_from_slice(&nanos(time).to_le_bytes());
}

fn put_name(out: &mut Vec<u8>, scope: &[u8], key: &[u8]) {
    put_len(out, scope.len());
    out.extend_from_slice(scope);
    put_len(out, key.len());
    out.extend_from_slice(key);
}

fn put_len(out: &mut Vec<u8>, mut len: usize) {
    while len >= 0x80 {
        out.push((len as u8) | 0x80);
        len >>= 7;
    }
    out.push(len as u8);
}

/// Reads what `put_len` wrote. The store only reads entries it encoded itself.
fn read_len(bytes: &[u8], at: &mut usize) -> usize {
    let mut len = 0;
    let mut shift = 0;
    loop {
        let byte = bytes[*at];
        *at += 1;
        len |= usize::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return len;
        }
        shift += 7;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ManualClock;

    fn key(name: &str) -> ScopedKey {
        ScopedKey::new(Scope::new("tenant"), Key::new(name).unwrap())
    }

    fn fingerprint() -> Fingerprint {
        Fingerprint::builder().part("body", b"{}").finish()
    }

    #[test]
    fn entries_round_trip() {
        let now = UNIX_EPOCH + Duration::from_nanos(1_767_225_600_123_456_789);
        let lease = Duration::from_secs(30);
        let record = Record {
            fingerprint: fingerprint(),
            token: Token::new(7),
            state: RecordState::InFlight {
                lease_expires_at: now + lease,
            },
        };
        let long = "k".repeat(300);
        let entry = Entry::in_flight(b"tenant", long.as_bytes(), &record, lease, now);
        assert_eq!(entry.record().unwrap(), record);
        assert_eq!(entry.name(), (&b"tenant"[..], long.as_bytes()));
        assert_eq!(entry.until(), now + lease * 2);
        assert_eq!(entry.in_flight_times(), Some((now, now + lease)));

        let stored = Stored::new(201)
            .with_header("content-type", "application/json")
            .with_body(vec![0u8, 255, 1]);
        let entry = Entry::completed(b"", b"k", &record.fingerprint, Token::new(7), now, &stored);
        let back = entry.record().unwrap();
        assert_eq!(back.token, Token::new(7));
        assert_eq!(back.fingerprint, record.fingerprint);
        assert_eq!(
            back.state,
            RecordState::Completed {
                stored: Arc::new(stored),
                expires_at: now
            }
        );
        assert!(entry.is(b"", b"k"));
        assert!(!entry.is(b"k", b""));
    }

    #[tokio::test]
    async fn a_small_record_is_small() {
        // The representation's size, so a regression shows here: 9-byte scope, 20-byte key
        // and the bench upstream's 201 with a content type and a 33-byte body.
        let store = MemoryStore::new();
        let key = ScopedKey::new(
            Scope::anonymous(),
            Key::new("n-1764590000-1-12345").unwrap(),
        );
        let lease = Duration::from_secs(30);
        let Begin::Acquired(claim) = store.begin(&key, &fingerprint(), lease).await.unwrap() else {
            panic!("not acquired")
        };
        assert_eq!(store.bytes(), 96 + RECORD_OVERHEAD);
        let stored = Stored::new(201)
            .with_header("content-type", "application/json")
            .with_body(&br#"{"id":"pay_1","status":"created"}"#[..]);
        store
            .complete(&key, claim.token, &stored, Duration::from_secs(86_400))
            .await
            .unwrap();
        assert_eq!(store.bytes(), 148 + RECORD_OVERHEAD);
    }

    #[tokio::test]
    async fn a_full_store_refuses_new_keys_and_keeps_serving_the_old() {
        let clock = ManualClock::new();
        let store = MemoryStore::with_clock_and_limits(
            clock.clone(),
            MemoryLimits::default().max_records(2),
        );
        let lease = Duration::from_secs(30);
        let retain = Duration::from_secs(3_600);
        let fp = fingerprint();
        let Begin::Acquired(a) = store.begin(&key("a"), &fp, lease).await.unwrap() else {
            panic!("a not acquired")
        };
        let Begin::Acquired(b) = store.begin(&key("b"), &fp, lease).await.unwrap() else {
            panic!("b not acquired")
        };
        let refused = store.begin(&key("c"), &fp, lease).await;
        assert!(
            matches!(
                refused,
                Err(StoreError::Full {
                    resource: "records",
                    limit: 2
                })
            ),
            "{refused:?}"
        );
        assert_eq!(store.len(), 2);
        // The records it holds are untouched: both complete, replay and renew as before.
        store
            .complete(&key("a"), a.token, &Stored::new(201), retain)
            .await
            .unwrap();
        assert!(matches!(
            store.begin(&key("a"), &fp, lease).await.unwrap(),
            Begin::Completed { .. }
        ));
        store.renew(&key("b"), b.token, lease).await.unwrap();
        assert!(matches!(
            store.begin(&key("b"), &fp, lease).await.unwrap(),
            Begin::InFlight { .. }
        ));
        // Room comes back when a record goes: released, or expired and swept.
        store.release(&key("b"), b.token).await.unwrap();
        assert!(matches!(
            store.begin(&key("c"), &fp, lease).await.unwrap(),
            Begin::Acquired(_)
        ));
        assert!(store.begin(&key("d"), &fp, lease).await.is_err());
        clock.advance(retain);
        assert_eq!(store.sweep(10).await.unwrap(), 2);
        assert!(store.is_empty());
        assert_eq!(store.bytes(), 0);
        assert!(matches!(
            store.begin(&key("d"), &fp, lease).await.unwrap(),
            Begin::Acquired(_)
        ));
    }

    #[tokio::test]
    async fn the_byte_limit_counts_every_record() {
        let store = MemoryStore::with_limits(MemoryLimits::default().max_bytes(1_000));
        let lease = Duration::from_secs(30);
        let mut claimed = 0;
        for i in 0..100 {
            match store
                .begin(&key(&format!("k{i}")), &fingerprint(), lease)
                .await
            {
                Ok(Begin::Acquired(_)) => claimed += 1,
                Err(StoreError::Full {
                    resource: "bytes",
                    limit: 1_000,
                }) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        // Each record here is 123 bytes as counted: eight fit, the ninth does not.
        assert_eq!(claimed, 8);
        assert!(store.bytes() <= 1_000 && store.bytes() + 123 > 1_000);
    }

    #[tokio::test]
    async fn a_takeover_of_a_full_store_is_not_refused() {
        let clock = ManualClock::new();
        let store = MemoryStore::with_clock_and_limits(
            clock.clone(),
            MemoryLimits::default().max_records(1),
        );
        let lease = Duration::from_secs(30);
        store.begin(&key("a"), &fingerprint(), lease).await.unwrap();
        clock.advance(lease * 3);
        // The record is past its lease and kept time but not swept: claiming the key again
        // replaces it rather than adding one.
        assert!(matches!(
            store.begin(&key("a"), &fingerprint(), lease).await.unwrap(),
            Begin::Acquired(_)
        ));
        assert_eq!(store.len(), 1);
    }

    #[tokio::test]
    async fn sweeps_go_round_the_whole_store_in_bounded_steps() {
        let clock = ManualClock::new();
        let store = MemoryStore::with_clock_and_limits(clock.clone(), MemoryLimits::UNLIMITED);
        let lease = Duration::from_secs(30);
        for i in 0..5_000 {
            store
                .begin(&key(&format!("k{i}")), &fingerprint(), lease)
                .await
                .unwrap();
        }
        let keeper = store
            .begin(&key("keeper"), &fingerprint(), lease * 100)
            .await
            .unwrap();
        clock.advance(lease * 2);
        // Limit 1: each call looks at 64 records or more, never removes more than one.
        let mut calls = 0;
        while store.len() > 1 {
            let removed = store.sweep(1).await.unwrap();
            assert!(removed <= 1);
            calls += 1;
            assert!(calls < 100_000, "sweep does not make progress");
        }
        assert!(matches!(keeper, Begin::Acquired(_)));
        assert!(store.get(&key("keeper")).await.unwrap().is_some());
        assert_eq!(store.len(), 1);
    }
}
