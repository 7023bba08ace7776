//! Bounded waiting: [`PATIENCE`], [`eventually`] and [`wait_until`].

use std::future::Future;
use std::time::{Duration, Instant};

/// How long any single wait in a test may take before it counts as a failure.
pub const PATIENCE: Duration = Duration::from_secs(5);

/// Polls `f` every 20 ms until it returns `Some`, for at most [`PATIENCE`]; panics naming
/// `what` when it never does.
///
/// ```
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use idem_testkit::eventually;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let polls = AtomicU32::new(0);
/// let n = eventually("the third poll", || {
///     let n = polls.fetch_add(1, Ordering::SeqCst) + 1;
///     async move { (n == 3).then_some(n) }
/// })
/// .await;
/// assert_eq!(n, 3);
/// # }
/// ```
pub async fn eventually<T, F, Fut>(what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(what, PATIENCE, f).await
}

/// [`eventually`], for at most `patience`: for what heals on a backoff of its own, such as
/// a client reconnecting to a store that came back.
pub async fn eventually_within<T, F, Fut>(what: &str, patience: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + patience;
    loop {
        if let Some(value) = f().await {
            return value;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `condition` holds, checking every 5 ms, for at most [`PATIENCE`]; panics
/// naming `what` when it never does.
///
/// ```
/// use std::time::{Duration, Instant};
/// use idem_testkit::wait_until;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let start = Instant::now();
/// wait_until("30 ms to pass", || start.elapsed() >= Duration::from_millis(30)).await;
/// # }
/// ```
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
