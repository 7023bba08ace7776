//! The memory store's latency as records accumulate: concurrent callers each claim a new
//! key and complete it (what `idem serve --store memory:` does per new-key request), with
//! the gateway's sweeper running, until the store holds `--records` records. Prints the
//! latency percentiles of `begin` + `complete` per window of `--window` records, the
//! process' resident memory per record, and the store's own count of bytes.
//!
//! ```sh
//! cargo bench -p idem-core --bench memory_growth -- --store sharded   # this store
//! cargo bench -p idem-core --bench memory_growth -- --store locked    # the old one
//! bash bench/memory_growth.sh                                         # both, interleaved
//! ```
//!
//! Options: `--store sharded|locked|dashmap`, `--records N` (1,000,000), `--window N` (100,000),
//! `--callers N` (64 tasks), `--threads N` (2 runtime workers, as many as the project
//! machine's cores), `--max-records N` (sharded: the store's record limit, which also
//! sets its shard count; default none, the most shards). `locked` is the store as it was before it was sharded (one mutex
//! around one `std` hash map holding whole `Record`s), kept here as the baseline;
//! `dashmap` is the same records in a `DashMap` (a well-kept sharded map, default shard
//! count), to tell what the map does from what the record encoding does.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use idem_core::{
    Begin, Clock, Fingerprint, InFlightRecord, Key, Lease, MemoryLimits, MemoryStore, Record,
    Scope, ScopedKey, Store, StoreError, Stored, SystemClock, Token, spawn_sweeper, transition,
};

const LEASE: Duration = Duration::from_secs(30);
const RETAIN: Duration = Duration::from_secs(86_400);

struct Options {
    store: String,
    records: u64,
    window: u64,
    callers: u64,
    threads: usize,
    max_records: Option<usize>,
}

fn options() -> Options {
    let mut options = Options {
        store: "sharded".to_owned(),
        records: 1_000_000,
        window: 100_000,
        callers: 64,
        threads: 2,
        max_records: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--store" => options.store = value(),
            "--records" => options.records = value().parse().expect("--records N"),
            "--window" => options.window = value().parse().expect("--window N"),
            "--callers" => options.callers = value().parse().expect("--callers N"),
            "--threads" => options.threads = value().parse().expect("--threads N"),
            "--max-records" => {
                options.max_records = Some(value().parse().expect("--max-records N"));
            }
            // What `cargo bench` passes to every bench binary.
            "--bench" => {}
            other => panic!("unknown option {other}"),
        }
    }
    options
}

fn main() {
    let options = options();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.threads)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(options));
}

async fn run(options: Options) {
    // Per record: its latency (ns) and when it was done (µs from the start), allocated and
    // touched before the first measure of resident memory so that they do not count in it.
    let records = options.records as usize;
    let latency_ns: Arc<Vec<AtomicU64>> =
        Arc::new((0..records).map(|_| AtomicU64::new(0)).collect());
    let done_us: Arc<Vec<AtomicU32>> = Arc::new((0..records).map(|_| AtomicU32::new(0)).collect());
    let rss_before = rss_kib("VmRSS");
    let (store, sharded): (Arc<dyn Store>, Option<Arc<MemoryStore>>) = match options.store.as_str()
    {
        "sharded" => {
            let limits = match options.max_records {
                Some(max) => MemoryLimits::UNLIMITED.max_records(max),
                None => MemoryLimits::UNLIMITED,
            };
            let store = Arc::new(MemoryStore::with_limits(limits));
            (store.clone(), Some(store))
        }
        "locked" => (Arc::new(LockedStore::default()), None),
        "dashmap" => (Arc::new(DashStore::default()), None),
        other => panic!("--store sharded|locked|dashmap, not {other}"),
    };
    // As `idem serve` runs it: every second, batches of 1024.
    let sweeper = spawn_sweeper(Arc::clone(&store), Duration::from_secs(1), 1024);

    let next = Arc::new(AtomicU64::new(0));
    let nonce = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let started = Instant::now();
    let callers: Vec<_> = (0..options.callers)
        .map(|_| {
            let (store, next) = (Arc::clone(&store), Arc::clone(&next));
            let (latency_ns, done_us) = (Arc::clone(&latency_ns), Arc::clone(&done_us));
            tokio::spawn(async move {
                let fingerprint = Fingerprint::builder().part("body", b"{}").finish();
                let stored = Stored::new(201)
                    .with_header("content-type", "application/json")
                    .with_body(&br#"{"id":"pay_1","status":"created"}"#[..]);
                let mut ops = 0u64;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= records {
                        return;
                    }
                    let key = ScopedKey::new(
                        Scope::anonymous(),
                        Key::new(&format!("n-{nonce}-{i}")).expect("key"),
                    );
                    let op = Instant::now();
                    let Ok(Begin::Acquired(lease)) = store.begin(&key, &fingerprint, LEASE).await
                    else {
                        panic!("a new key was not acquired");
                    };
                    store
                        .complete(&key, lease.token, &stored, RETAIN)
                        .await
                        .expect("complete");
                    let latency = op.elapsed();
                    let saturate = |n: u128| u32::try_from(n).unwrap_or(u32::MAX);
                    latency_ns[i].store(latency.as_nanos() as u64, Ordering::Relaxed);
                    done_us[i].store(saturate(started.elapsed().as_micros()), Ordering::Relaxed);
                    ops += 1;
                    // Let the other callers on this worker in, as requests would be.
                    if ops.is_multiple_of(16) {
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.expect("caller");
    }
    let elapsed = started.elapsed();
    sweeper.abort();
    let rss_after = rss_kib("VmRSS");

    println!(
        "store {}: {} records, {} callers on {} threads, {:.2} s, {:.0} new keys/s",
        options.store,
        options.records,
        options.callers,
        options.threads,
        elapsed.as_secs_f64(),
        options.records as f64 / elapsed.as_secs_f64()
    );
    println!("| records | keys/s | p50 µs | p99 µs | p99.9 µs | max µs |");
    println!("|---:|---:|---:|---:|---:|---:|");
    let window = (options.window.max(1) as usize).min(records.max(1));
    for first in (0..records).step_by(window) {
        let end = (first + window).min(records);
        let mut latencies: Vec<u64> = latency_ns[first..end]
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect();
        latencies.sort_unstable();
        let done = || {
            done_us[first..end]
                .iter()
                .map(|d| d.load(Ordering::Relaxed))
        };
        let span_us = done().max().unwrap_or(0) - done().min().unwrap_or(0);
        let at = |q: f64| {
            let index = ((latencies.len() as f64 * q) as usize).min(latencies.len() - 1);
            latencies[index] as f64 / 1e3
        };
        println!(
            "| {}k–{}k | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} |",
            first / 1000,
            end / 1000,
            (end - first) as f64 / (f64::from(span_us.max(1)) / 1e6),
            at(0.50),
            at(0.99),
            at(0.999),
            at(1.0),
        );
    }
    let grown = rss_after.saturating_sub(rss_before) * 1024;
    println!(
        "resident memory: {:.1} MiB before, {:.1} MiB after, {:.0} bytes per record; peak {:.1} MiB",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        grown as f64 / options.records as f64,
        rss_kib("VmHWM") as f64 / 1024.0,
    );
    if let Some(store) = sharded {
        println!(
            "the store counts {} bytes for {} records: {:.0} bytes per record",
            store.bytes(),
            store.len(),
            store.bytes() as f64 / store.len().max(1) as f64
        );
    }
}

/// A line of /proc/self/status, in KiB (0 where there is none).
fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix(field)?
                    .trim_start_matches(':')
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

/// The memory store as it was: one mutex around one map of whole records.
#[derive(Debug, Default)]
struct LockedStore {
    records: Mutex<HashMap<ScopedKey, Kept>>,
    last_token: AtomicU64,
    clock: SystemClock,
}

#[derive(Debug)]
struct Kept {
    record: Record,
    until: SystemTime,
    claimed_at: SystemTime,
}

impl LockedStore {
    fn records(&self) -> MutexGuard<'_, HashMap<ScopedKey, Kept>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }
}

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

#[async_trait]
impl Store for LockedStore {
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
                Token::new(self.last_token.fetch_add(1, Ordering::Relaxed) + 1)
            })?;
        if let Some(record) = write {
            let until = transition::kept_until(record.expires_at(), lease);
            records.insert(
                key.clone(),
                Kept {
                    record,
                    until,
                    claimed_at: now,
                },
            );
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
            let until = record.expires_at();
            records.insert(
                key.clone(),
                Kept {
                    record,
                    until,
                    claimed_at,
                },
            );
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
        let expires_at = record.expires_at();
        let claimed_at = records.get(key).map_or(now, |kept| kept.claimed_at);
        let until = transition::kept_until(expires_at, lease);
        records.insert(
            key.clone(),
            Kept {
                record,
                until,
                claimed_at,
            },
        );
        Ok(Lease { token, expires_at })
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
        Ok(expired.len())
    }

    async fn in_flight(
        &self,
        _older_than: Duration,
        _limit: usize,
    ) -> Result<Vec<InFlightRecord>, StoreError> {
        Ok(Vec::new())
    }
}

/// The old store's records in a `DashMap`: each call holds its key's shard lock for the
/// whole transition, as the contract needs.
#[derive(Debug, Default)]
struct DashStore {
    records: dashmap::DashMap<ScopedKey, Kept>,
    last_token: AtomicU64,
    clock: SystemClock,
}

fn kept_of(kept: Option<&Kept>, now: SystemTime) -> Option<&Record> {
    kept.filter(|kept| now < kept.until)
        .map(|kept| &kept.record)
}

#[async_trait]
impl Store for DashStore {
    async fn begin(
        &self,
        key: &ScopedKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let now = self.clock.now();
        let mint = || Token::new(self.last_token.fetch_add(1, Ordering::Relaxed) + 1);
        let (current, vacant) = match self.records.entry(key.clone()) {
            dashmap::Entry::Occupied(slot) => (Some(slot), None),
            dashmap::Entry::Vacant(slot) => (None, Some(slot)),
        };
        let (answer, write) = transition::begin(
            kept_of(current.as_ref().map(|slot| slot.get()), now),
            fingerprint,
            now,
            lease,
            mint,
        )?;
        if let Some(record) = write {
            let until = transition::kept_until(record.expires_at(), lease);
            let kept = Kept {
                record,
                until,
                claimed_at: now,
            };
            match (current, vacant) {
                (Some(mut slot), _) => {
                    slot.insert(kept);
                }
                (_, Some(slot)) => {
                    slot.insert(kept);
                }
                _ => {}
            }
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
        let mut slot = self.records.get_mut(key);
        let (expires_at, write) =
            transition::complete(kept_of(slot.as_deref(), now), token, stored, now, retain)?;
        if let (Some(record), Some(kept)) = (write, slot.as_mut()) {
            kept.until = record.expires_at();
            kept.record = record;
        }
        Ok(expires_at)
    }

    async fn release(&self, key: &ScopedKey, token: Token) -> Result<(), StoreError> {
        let now = self.clock.now();
        let mut result = Err(StoreError::LeaseLost);
        self.records.remove_if(key, |_, kept| {
            result = transition::held(kept_of(Some(kept), now), token, now).map(|_| ());
            result.is_ok()
        });
        result
    }

    async fn renew(
        &self,
        key: &ScopedKey,
        token: Token,
        lease: Duration,
    ) -> Result<Lease, StoreError> {
        let now = self.clock.now();
        let mut slot = self.records.get_mut(key);
        let record = transition::renew(kept_of(slot.as_deref(), now), token, now, lease)?;
        let expires_at = record.expires_at();
        if let Some(kept) = slot.as_mut() {
            kept.until = transition::kept_until(expires_at, lease);
            kept.record = record;
        }
        Ok(Lease { token, expires_at })
    }

    async fn get(&self, key: &ScopedKey) -> Result<Option<Record>, StoreError> {
        let now = self.clock.now();
        let slot = self.records.get(key);
        Ok(transition::live(kept_of(slot.as_deref(), now), now).cloned())
    }

    async fn delete(&self, key: &ScopedKey) -> Result<bool, StoreError> {
        let now = self.clock.now();
        let removed = self.records.remove(key);
        Ok(transition::live(removed.as_ref().map(|(_, kept)| &kept.record), now).is_some())
    }

    async fn sweep(&self, limit: usize) -> Result<usize, StoreError> {
        let now = self.clock.now();
        let mut removed = 0;
        self.records.retain(|_, kept| {
            let remove = removed < limit && now >= kept.until;
            removed += usize::from(remove);
            !remove
        });
        Ok(removed)
    }
}
