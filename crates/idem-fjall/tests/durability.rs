//! What `complete` acknowledged survives the process: a kill, a reopen, a restart.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use idem_core::{Begin, Fingerprint, Key, RecordState, Scope, ScopedKey, Store, Stored};
use idem_fjall::{FjallStore, OpenError};

const CHILD_DB: &str = "IDEM_FJALL_CHILD_DB";
const LEASE: Duration = Duration::from_secs(60);
const RETAIN: Duration = Duration::from_secs(3600);

fn key(i: usize) -> ScopedKey {
    ScopedKey::new(
        Scope::new("durability"),
        Key::new(&format!("k-{i}")).unwrap(),
    )
}

fn fingerprint() -> Fingerprint {
    Fingerprint::builder().part("body", b"charge").finish()
}

/// Runs this test binary again as a child process executing test `name`.
fn child(name: &str, db: &std::path::Path) -> Command {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--exact",
            name,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DB, db)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// The child side of `a_killed_process_loses_no_acknowledged_record`: completes keys as
/// fast as it can and reports each one only after `complete` returned `Ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run as a child process by a_killed_process_loses_no_acknowledged_record"]
async fn child_completes_until_killed() {
    let Ok(path) = std::env::var(CHILD_DB) else {
        return;
    };
    let store = std::sync::Arc::new(FjallStore::open(path).unwrap());
    // Several writers at once, so the kill lands amid group commits.
    let mut writers = Vec::new();
    for writer in 0..8 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            for i in (writer..100_000).step_by(8) {
                let Begin::Acquired(lease) =
                    store.begin(&key(i), &fingerprint(), LEASE).await.unwrap()
                else {
                    panic!("fresh key {i} not acquired")
                };
                let outcome = Stored::new(201).with_body(format!("charge {i}"));
                store
                    .complete(&key(i), lease.token, &outcome, RETAIN)
                    .await
                    .unwrap();
                println!("completed {i}");
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
}

#[tokio::test]
async fn a_killed_process_loses_no_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("killed");
    let mut process = child("child_completes_until_killed", &path)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(process.stdout.take().unwrap()).lines();
    let mut acknowledged = Vec::new();
    while acknowledged.len() < 300 {
        let line = lines.next().expect("child ended early").unwrap();
        if let Some(i) = line.strip_prefix("completed ") {
            acknowledged.push(i.parse::<usize>().unwrap());
        }
    }
    process.kill().unwrap(); // SIGKILL: no destructor, no flush, no goodbye.
    // What the child printed before it died was acknowledged too.
    for line in lines {
        if let Some(i) = line.unwrap().strip_prefix("completed ") {
            acknowledged.push(i.parse().unwrap());
        }
    }
    process.wait().unwrap();

    let store = FjallStore::open(&path).expect("reopen after a kill");
    for i in acknowledged {
        match store.begin(&key(i), &fingerprint(), LEASE).await.unwrap() {
            Begin::Completed { stored, .. } => {
                assert_eq!(
                    stored.body.as_deref(),
                    Some(format!("charge {i}").as_bytes())
                )
            }
            other => panic!("acknowledged key {i} came back as {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_reopened_store_finds_completed_and_in_flight_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reopen");
    let mut tokens = Vec::new();
    {
        let store = FjallStore::open(&path).unwrap();
        for i in 0..50 {
            let Begin::Acquired(lease) = store.begin(&key(i), &fingerprint(), LEASE).await.unwrap()
            else {
                panic!("not acquired")
            };
            tokens.push(lease.token);
            if i % 2 == 0 {
                store
                    .complete(
                        &key(i),
                        lease.token,
                        &Stored::new(200).with_body(i.to_string()),
                        RETAIN,
                    )
                    .await
                    .unwrap();
            }
        }
    } // Dropped: the file is closed.
    let store = FjallStore::open(&path).unwrap();
    for (i, token) in tokens.iter().enumerate() {
        let record = store.get(&key(i)).await.unwrap().expect("record survived");
        assert_eq!(record.token, *token);
        match (i % 2, record.state) {
            (0, RecordState::Completed { stored, .. }) => {
                assert_eq!(stored.body.as_deref(), Some(i.to_string().as_bytes()))
            }
            // A request in flight at shutdown still holds its key: no second execution.
            (1, RecordState::InFlight { .. }) => {}
            (_, state) => panic!("key {i} came back as {state:?}"),
        }
    }
    // Tokens keep growing across the restart.
    store.delete(&key(1)).await.unwrap();
    let Begin::Acquired(lease) = store.begin(&key(1), &fingerprint(), LEASE).await.unwrap() else {
        panic!("not acquired")
    };
    assert!(lease.token > *tokens.iter().max().unwrap());
}

#[test]
fn a_second_store_on_one_file_is_refused_in_process() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("owned");
    let _first = FjallStore::open(&path).unwrap();
    match FjallStore::open(&path) {
        Err(error @ OpenError::AlreadyOpen { .. }) => {
            assert!(error.to_string().contains("already open"), "{error}")
        }
        other => panic!("second open should be refused, got {other:?}"),
    }
}

/// The child side of `a_second_process_on_one_file_is_refused`.
#[test]
#[ignore = "run as a child process by a_second_process_on_one_file_is_refused"]
fn child_opens_the_store() {
    let Ok(path) = std::env::var(CHILD_DB) else {
        return;
    };
    match FjallStore::open(path) {
        Ok(_) => println!("opened"),
        Err(error) => println!("refused: {error}"),
    }
}

#[test]
fn a_second_process_on_one_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("owned");
    let _first = FjallStore::open(&path).unwrap();
    let output = child("child_opens_the_store", &path).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("refused: ") && stdout.contains("already open"),
        "child said: {stdout}"
    );
}
