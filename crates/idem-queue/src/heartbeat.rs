//! Running a future while something else happens on a timer beside it.

use std::future::Future;
use std::time::Duration;

use tokio::time::{Instant, sleep_until};

/// Drives `work` to its end; every `every` (if set) also runs `beat()` to completion, polled
/// together with `work` so a slow beat never stalls the work. Returns the work's output.
pub(crate) async fn with_heartbeat<W, B, BF>(
    work: W,
    every: Option<Duration>,
    mut beat: B,
) -> W::Output
where
    W: Future,
    B: FnMut() -> BF,
    BF: Future<Output = ()>,
{
    let Some(every) = every.filter(|every| !every.is_zero()) else {
        return work.await;
    };
    tokio::pin!(work);
    loop {
        let next = Instant::now() + every;
        tokio::select! {
            biased;
            out = &mut work => return out,
            () = sleep_until(next) => {}
        }
        let beating = beat();
        tokio::pin!(beating);
        tokio::select! {
            biased;
            out = &mut work => return out,
            () = &mut beating => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[tokio::test(start_paused = true)]
    async fn beats_while_the_work_runs_and_stops_with_it() {
        let beats = Cell::new(0);
        let out = with_heartbeat(
            async {
                tokio::time::sleep(Duration::from_millis(1_050)).await;
                7
            },
            Some(Duration::from_millis(100)),
            || async { beats.set(beats.get() + 1) },
        )
        .await;
        assert_eq!(out, 7);
        assert_eq!(beats.get(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_beat_does_not_hold_the_work_back() {
        let started = Instant::now();
        with_heartbeat(
            tokio::time::sleep(Duration::from_millis(150)),
            Some(Duration::from_millis(100)),
            || tokio::time::sleep(Duration::from_secs(60)),
        )
        .await;
        assert_eq!(started.elapsed(), Duration::from_millis(150));
    }

    #[tokio::test]
    async fn no_interval_means_no_beats() {
        let beats = Cell::new(0);
        with_heartbeat(async {}, None, || async { beats.set(1) }).await;
        with_heartbeat(async {}, Some(Duration::ZERO), || async { beats.set(1) }).await;
        assert_eq!(beats.get(), 0);
    }
}
