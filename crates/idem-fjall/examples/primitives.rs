//! What durable writes cost on this disk, measured before choosing the store's engine.
//!
//! ```text
//! cargo run --release -p idem-fjall --example primitives [DIR]
//! ```
//!
//! DIR (default: a temporary directory under `target/`) must be on the disk the store will
//! use: a tmpfs makes every sync free. Prints one line per primitive:
//!
//! - `fdatasync`: one small write then `fdatasync`, on a file that grows with each write
//!   versus one preallocated (written with zeros and synced beforehand), for a group's
//!   worth of bytes (256 B, 16 KiB): what a journal pays per group commit.
//! - `redb`: one write transaction of a group of 64 new records (a row and two index
//!   entries each, as idem-redb writes them) into a file that already holds many, committed
//!   with `Durability::None` versus `Durability::Immediate`.
//! - `fjall`: the same group as one write batch over three keyspaces, committed and then
//!   `persist(SyncData)`, versus committed only.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use fjall::{Database, KeyspaceCreateOptions, PersistMode};

const GROUP: usize = 64;
const PRELOAD: usize = 200_000;
const ROW: usize = 160;

/// A pseudo-random 32-byte key, as a scoped key's digest is.
fn digest(i: u64) -> [u8; 32] {
    let mut out = [0u8; 32];
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    for chunk in out.chunks_mut(8) {
        x ^= x >> 33;
        x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
        x ^= x >> 29;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    out
}

fn index_entry(time: u64, digest: &[u8; 32]) -> [u8; 40] {
    let mut entry = [0u8; 40];
    entry[..8].copy_from_slice(&time.to_be_bytes());
    entry[8..].copy_from_slice(digest);
    entry
}

fn report(name: &str, runs: usize, elapsed: Duration, per: usize) {
    let each = elapsed / runs as u32;
    println!(
        "{name:<48} {:>9.1} µs/op {:>10.0} op/s {:>10.0} records/s",
        each.as_secs_f64() * 1e6,
        runs as f64 / elapsed.as_secs_f64(),
        (runs * per) as f64 / elapsed.as_secs_f64()
    );
}

fn fdatasync(dir: &Path, size: usize, preallocated: bool) -> std::io::Result<()> {
    let path = dir.join(format!("sync-{size}-{preallocated}"));
    let runs = 2_000;
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    if preallocated {
        // Zeros really written, not a sparse hole: later overwrites change no metadata.
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..(runs * size).div_ceil(zeros.len()) + 1 {
            file.write_all(&zeros)?;
        }
        file.sync_all()?;
        drop(file);
        file = OpenOptions::new().write(true).open(&path)?;
    }
    let chunk = vec![0xA5u8; size];
    let start = Instant::now();
    for _ in 0..runs {
        file.write_all(&chunk)?;
        file.sync_data()?;
    }
    let name = format!(
        "fdatasync {size:>5} B, {}",
        if preallocated {
            "preallocated"
        } else {
            "growing file"
        }
    );
    report(&name, runs, start.elapsed(), 1);
    std::fs::remove_file(path)
}

fn redb(dir: &Path) -> Result<(), redb::Error> {
    use redb::{Durability, TableDefinition};
    const RECORDS: TableDefinition<'static, &[u8], &[u8]> = TableDefinition::new("records");
    const EXPIRY: TableDefinition<'static, &[u8], ()> = TableDefinition::new("expiry");
    const CLAIMS: TableDefinition<'static, &[u8], ()> = TableDefinition::new("claims");
    let path = dir.join("primitives.redb");
    let db = redb::Database::builder()
        .set_cache_size(64 << 20)
        .create(&path)?;
    let row = [7u8; ROW];
    let mut next = 0u64;
    let mut group = |db: &redb::Database, durability: Durability, n: usize| {
        let mut txn = db.begin_write()?;
        txn.set_durability(durability)
            .map_err(|e| redb::Error::Corrupted(e.to_string()))?;
        {
            let mut records = txn.open_table(RECORDS)?;
            let mut expiry = txn.open_table(EXPIRY)?;
            let mut claims = txn.open_table(CLAIMS)?;
            for _ in 0..n {
                let d = digest(next);
                records.insert(d.as_slice(), row.as_slice())?;
                expiry.insert(index_entry(next, &d).as_slice(), ())?;
                claims.insert(index_entry(next, &d).as_slice(), ())?;
                next += 1;
            }
        }
        txn.commit()?;
        Ok::<_, redb::Error>(())
    };
    for _ in 0..PRELOAD / 4096 {
        group(&db, Durability::None, 4096)?;
    }
    group(&db, Durability::Immediate, 1)?;
    for (name, durability, runs) in [
        (
            "redb group of 64, Durability::None",
            Durability::None,
            2_000,
        ),
        (
            "redb group of 64, Durability::Immediate",
            Durability::Immediate,
            500,
        ),
    ] {
        let start = Instant::now();
        for _ in 0..runs {
            group(&db, durability, GROUP)?;
        }
        report(name, runs, start.elapsed(), GROUP);
    }
    drop(db);
    std::fs::remove_file(path).map_err(redb::Error::from)
}

fn fjall(dir: &Path) -> fjall::Result<()> {
    let db = Database::builder(dir.join("primitives.fjall"))
        .cache_size(16 << 20)
        .open()?;
    let records = db.keyspace("records", KeyspaceCreateOptions::default)?;
    let expiry = db.keyspace("expiry", KeyspaceCreateOptions::default)?;
    let claims = db.keyspace("claims", KeyspaceCreateOptions::default)?;
    let row = [7u8; ROW];
    let mut next = 0u64;
    let mut group = |n: usize, sync: bool| {
        let mut batch = db.batch();
        for _ in 0..n {
            let d = digest(next);
            batch.insert(&records, d, row);
            batch.insert(&expiry, index_entry(next, &d), []);
            batch.insert(&claims, index_entry(next, &d), []);
            next += 1;
        }
        batch.commit()?;
        if sync {
            db.persist(PersistMode::SyncData)?;
        }
        Ok::<_, fjall::Error>(())
    };
    for _ in 0..PRELOAD / 4096 {
        group(4096, false)?;
    }
    for (name, sync, runs) in [
        ("fjall group of 64, commit only", false, 2_000),
        ("fjall group of 64, commit + persist(SyncData)", true, 2_000),
    ] {
        let start = Instant::now();
        for _ in 0..runs {
            group(GROUP, sync)?;
        }
        report(name, runs, start.elapsed(), GROUP);
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let scratch;
    let dir = match std::env::args_os().nth(1) {
        Some(dir) => std::path::PathBuf::from(dir),
        None => {
            let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target");
            scratch = tempfile::tempdir_in(target)?;
            scratch.path().to_owned()
        }
    };
    for size in [256, 16 << 10] {
        fdatasync(&dir, size, false)?;
        fdatasync(&dir, size, true)?;
    }
    redb(&dir)?;
    fjall(&dir)?;
    Ok(())
}
