//! The lock keeper against a real Postgres: its session stays confirmed however busy
//! the worker's own runtime is.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use taskpod_worker::liveness::LivenessFeed;
use taskpod_worker::lock::{Key, PARTITION_NAMESPACE};
use taskpod_worker::ownership::keeper::{self, KeeperEnd};
use taskpod_worker::settings::LockSettings;

/// Found by the soak: with a hundred `exec` pods on two cores, the keeper (a task on the
/// worker's runtime) waited behind the pods' work past the detection bound, so healthy
/// nodes fenced themselves and up to 60% of the runs were repeated under new epochs.
/// Here the runtime that starts the keeper is blocked outright for longer than the
/// bound: the session must still be confirmed when it wakes.
#[tokio::test(flavor = "current_thread")]
async fn regression_a_starved_runtime_does_not_starve_the_lock_session() {
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL names the test Postgres");
    let settings = LockSettings {
        ping_interval_ms: 100,
        ping_timeout_ms: 1_000,
        ..LockSettings::default()
    };
    let bound = Duration::from_millis(settings.ping_interval_ms + settings.ping_timeout_ms);
    let (feed, liveness) = LivenessFeed::new(bound);
    let (lock, mut keeper) = keeper::start(url, settings, feed, Duration::from_millis(100))
        .await
        .unwrap();
    assert!(liveness.is_alive());

    // Every task of this runtime is stuck for three detection bounds.
    std::thread::sleep(bound * 3);
    assert!(
        liveness.is_alive(),
        "the session went unconfirmed while the worker's runtime was busy"
    );

    // The session still serves the worker's requests, and closes when let go.
    let key: Key = (PARTITION_NAMESPACE, 1_000_001);
    assert!(lock.try_lock(key).await.unwrap());
    lock.unlock(key).await.unwrap();
    drop(lock);
    assert!(matches!(keeper.ended().await, KeeperEnd::Closed));
    assert!(!liveness.is_alive());
}
