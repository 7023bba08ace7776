//! Expired records leave the file by themselves, in bounded steps that let writes through.

use std::time::Duration;

use idem_core::{Begin, Fingerprint, Key, ManualClock, Scope, ScopedKey, Store, Stored};
use idem_fjall::{FjallOptions, FjallStore};

fn key(i: usize) -> ScopedKey {
    ScopedKey::new(Scope::new("sweep"), Key::new(&format!("k-{i}")).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_records_are_swept_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new();
    let options = FjallOptions {
        sweep_interval: Duration::from_millis(20),
        sweep_batch: 100,
        ..FjallOptions::default()
    };
    let store = FjallStore::open_with(dir.path().join("sweep"), clock.clone(), options).unwrap();
    let fp = Fingerprint::builder().part("body", b"x").finish();
    for i in 0..1_000 {
        let Begin::Acquired(lease) = store
            .begin(&key(i), &fp, Duration::from_secs(5))
            .await
            .unwrap()
        else {
            panic!("not acquired")
        };
        if i % 2 == 0 {
            store
                .complete(
                    &key(i),
                    lease.token,
                    &Stored::new(200),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
        }
    }
    let survivor = key(1_000_000);
    store
        .begin(&survivor, &fp, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(store.record_count().unwrap(), 1_001);

    clock.advance(Duration::from_secs(11));
    // While the backlog of 1,000 is swept 100 at a time, new claims keep being served.
    let mut rounds = 0;
    while store.record_count().unwrap() > 1 + rounds {
        let fresh = key(2_000_000 + rounds as usize);
        assert!(matches!(
            store
                .begin(&fresh, &fp, Duration::from_secs(3600))
                .await
                .unwrap(),
            Begin::Acquired(_)
        ));
        rounds += 1;
        assert!(rounds < 500, "the sweeper did not empty the backlog");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        store.get(&survivor).await.unwrap().is_some(),
        "a live record was swept"
    );
    assert_eq!(store.record_count().unwrap(), 1 + rounds);
}
