//! The durability suite for embedded stores kept at a path on disk: what `complete`
//! acknowledged survives a SIGKILL, a reopen finds every record, and a path has one owner,
//! in this process and across processes.
//!
//! A store crate runs it with one macro call, [`durability_suite!`](crate::durability_suite),
//! in an integration test (a file in `tests/`), fed a function that returns a [`Durable`]:
//! how to open the store at a path, and how to tell its "already open" refusal.
//!
//! Two of the tests run the test binary again as a child process (`--exact <test> --ignored`),
//! so the macro must be called in a test harness binary, not a doc test or a custom `main`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::{Begin, Fingerprint, Key, RecordState, Scope, ScopedKey, Store, Stored};

const CHILD_DB: &str = "IDEM_DURABILITY_CHILD_DB";
const LEASE: Duration = Duration::from_secs(60);
const RETAIN: Duration = Duration::from_secs(3600);

/// How the durability suite opens one embedded store; see the [module](self) for a use.
///
/// ```
/// use idem_core::testing::durability::Durable;
/// use idem_core::MemoryStore;
///
/// let memory: Durable<MemoryStore, std::io::Error> = Durable {
///     name: "memory",
///     open: |_path| Ok(MemoryStore::new()),
///     is_already_open: |error| error.kind() == std::io::ErrorKind::ResourceBusy,
/// };
/// assert!((memory.open)(std::path::Path::new("unused")).is_ok());
/// ```
pub struct Durable<S, E> {
    /// The store's name, such as `"fjall"`: the extension of the paths the suite opens.
    pub name: &'static str,
    /// Opens (or creates) the store at a path, with the system clock and default options.
    pub open: fn(&Path) -> Result<S, E>,
    /// Whether an error from `open` is the store's refusal to open a path that another
    /// store, in this process or another, has open.
    pub is_already_open: fn(&E) -> bool,
}

impl<S, E> std::fmt::Debug for Durable<S, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durable")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<S, E: std::fmt::Debug> Durable<S, E> {
    fn path(&self, dir: &Path, stem: &str) -> std::path::PathBuf {
        dir.join(format!("{stem}.{}", self.name))
    }

    fn open_ok(&self, path: &Path) -> S {
        (self.open)(path).unwrap_or_else(|error| panic!("open {}: {error:?}", path.display()))
    }
}

/// Runs the durability suite: one `#[test]` a case, in a module `durability`, each given
/// the [`Durable`] that `$make` (a function) returns.
///
/// ```no_run
/// use idem_core::testing::durability::Durable;
/// use idem_core::MemoryStore;
///
/// // An example only: a memory store is not durable and fails the suite.
/// fn memory() -> Durable<MemoryStore, std::io::Error> {
///     Durable {
///         name: "memory",
///         open: |_path| Ok(MemoryStore::new()),
///         is_already_open: |_error| false,
///     }
/// }
///
/// idem_core::durability_suite!(memory);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! durability_suite {
    ($make:ident) => {
        mod durability {
            use $crate::testing::durability as suite;

            /// The child side of `a_killed_process_loses_no_acknowledged_record`.
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            #[ignore = "run as a child process by a_killed_process_loses_no_acknowledged_record"]
            async fn child_completes_until_killed() {
                suite::child_completes_until_killed(super::$make()).await;
            }

            #[tokio::test]
            async fn a_killed_process_loses_no_acknowledged_record() {
                let child = concat!(module_path!(), "::child_completes_until_killed");
                suite::a_killed_process_loses_no_acknowledged_record(super::$make(), child).await;
            }

            #[tokio::test]
            async fn a_reopened_store_finds_completed_and_in_flight_records() {
                let durable = super::$make();
                suite::a_reopened_store_finds_completed_and_in_flight_records(durable).await;
            }

            #[test]
            fn a_second_store_on_one_file_is_refused_in_process() {
                suite::a_second_store_on_one_file_is_refused_in_process(super::$make());
            }

            /// The child side of `a_second_process_on_one_file_is_refused`.
            #[test]
            #[ignore = "run as a child process by a_second_process_on_one_file_is_refused"]
            fn child_opens_the_store() {
                suite::child_opens_the_store(super::$make());
            }

            #[test]
            fn a_second_process_on_one_file_is_refused() {
                let child = concat!(module_path!(), "::child_opens_the_store");
                suite::a_second_process_on_one_file_is_refused(super::$make(), child);
            }
        }
    };
}

fn key(i: usize) -> ScopedKey {
    ScopedKey::new(
        Scope::new("durability"),
        Key::new(&format!("k-{i}")).unwrap(),
    )
}

fn fingerprint() -> Fingerprint {
    Fingerprint::builder().part("body", b"charge").finish()
}

fn temporary_directory() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary directory")
}

/// Runs this test binary again as a child process executing the test at `module_path`
/// (`module_path!()` of the test, which starts with the test crate's name: libtest names a
/// test by its path inside the crate).
fn child(module_path: &str, db: &Path) -> Command {
    let name = module_path
        .split_once("::")
        .map_or(module_path, |(_crate, inside)| inside);
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

/// The child side of [`a_killed_process_loses_no_acknowledged_record`]: completes keys as
/// fast as it can and reports each one only after `complete` returned `Ok`. Returns at once
/// unless run as that child.
#[doc(hidden)]
pub async fn child_completes_until_killed<S, E>(durable: Durable<S, E>)
where
    S: Store + 'static,
    E: std::fmt::Debug,
{
    let Ok(path) = std::env::var(CHILD_DB) else {
        return;
    };
    let store = Arc::new(durable.open_ok(Path::new(&path)));
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

/// A child process completes keys until it is killed with SIGKILL; every key it reported
/// completed is found completed, with its outcome, when the store is reopened.
#[doc(hidden)]
pub async fn a_killed_process_loses_no_acknowledged_record<S, E>(
    durable: Durable<S, E>,
    child_test: &str,
) where
    S: Store,
    E: std::fmt::Debug,
{
    let dir = temporary_directory();
    let path = durable.path(dir.path(), "killed");
    let mut process = child(child_test, &path).spawn().unwrap();
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

    let store = (durable.open)(&path).expect("reopen after a kill");
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

/// A store closed with completed and in-flight records finds them all when reopened, and
/// its tokens keep growing across the restart.
#[doc(hidden)]
pub async fn a_reopened_store_finds_completed_and_in_flight_records<S, E>(durable: Durable<S, E>)
where
    S: Store,
    E: std::fmt::Debug,
{
    let dir = temporary_directory();
    let path = durable.path(dir.path(), "reopen");
    let mut tokens = Vec::new();
    {
        let store = durable.open_ok(&path);
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
    let store = durable.open_ok(&path);
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

/// A second store on a path that a store in this process has open is refused, with an
/// error that says so.
#[doc(hidden)]
pub fn a_second_store_on_one_file_is_refused_in_process<S, E>(durable: Durable<S, E>)
where
    S: std::fmt::Debug,
    E: std::fmt::Debug + std::fmt::Display,
{
    let dir = temporary_directory();
    let path = durable.path(dir.path(), "owned");
    let _first = durable.open_ok(&path);
    match (durable.open)(&path) {
        Err(error) if (durable.is_already_open)(&error) => {
            assert!(error.to_string().contains("already open"), "{error}")
        }
        other => panic!("second open should be refused, got {other:?}"),
    }
}

/// The child side of [`a_second_process_on_one_file_is_refused`]: opens the store and says
/// how that went. Returns at once unless run as that child.
#[doc(hidden)]
pub fn child_opens_the_store<S, E: std::fmt::Display>(durable: Durable<S, E>) {
    let Ok(path) = std::env::var(CHILD_DB) else {
        return;
    };
    match (durable.open)(Path::new(&path)) {
        Ok(_) => println!("opened"),
        Err(error) => println!("refused: {error}"),
    }
}

/// A child process cannot open a path that this process has open: it is refused, with an
/// error that says so.
#[doc(hidden)]
pub fn a_second_process_on_one_file_is_refused<S, E>(durable: Durable<S, E>, child_test: &str)
where
    E: std::fmt::Debug,
{
    let dir = temporary_directory();
    let path = durable.path(dir.path(), "owned");
    let _first = durable.open_ok(&path);
    let output = child(child_test, &path).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("refused: ") && stdout.contains("already open"),
        "child said: {stdout}"
    );
}
