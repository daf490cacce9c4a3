//! The store probe: whether this node reaches the store through its pool.
//!
//! The lock session and the pool are separate connections, possibly to separate
//! addresses (a pooler or sidecar in front of `store.url`). When the pool is dead and
//! the lock session is not (a gray failure), the node would keep its partitions forever
//! with nothing running. The probe says unhealthy once the pool has failed for
//! `store_fence_after`; the control loop then lets go of the incarnation (closing its
//! lock session frees its partitions for a node that can reach the store) and
//! registers again once the probe succeeds.

use std::time::Duration;

use futures::future::BoxFuture;
use taskpod_core::Error;
use taskpod_core::store::Store;
use tokio::sync::watch;
use tokio::time::Instant;

use super::Service;

#[derive(Debug)]
pub struct StoreProbe {
    pub store: Store,
    pub interval: Duration,
    /// How long the pool may fail before the node lets go.
    pub fence_after: Duration,
    /// Each probe's own bound: a silent connection must not hold the probe.
    pub timeout: Duration,
    pub healthy: watch::Sender<bool>,
    /// When the current run of failures began.
    pub failing_since: Option<Instant>,
}

impl StoreProbe {
    /// The probe and the flag it keeps (healthy at first).
    pub fn new(
        store: Store,
        interval: Duration,
        fence_after: Duration,
    ) -> (Self, watch::Receiver<bool>) {
        let (healthy, rx) = watch::channel(true);
        (Self::keeping(store, interval, fence_after, healthy), rx)
    }

    /// A probe that keeps an existing flag (a restarted probe).
    pub fn keeping(
        store: Store,
        interval: Duration,
        fence_after: Duration,
        healthy: watch::Sender<bool>,
    ) -> Self {
        Self {
            store,
            interval,
            fence_after,
            timeout: interval.max(Duration::from_millis(500)),
            healthy,
            failing_since: None,
        }
    }

    fn answered(&mut self, ok: bool) {
        if ok {
            self.failing_since = None;
            self.healthy
                .send_if_modified(|h| !std::mem::replace(h, true));
            return;
        }
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= self.fence_after {
            self.healthy
                .send_if_modified(|h| std::mem::replace(h, false));
        }
    }
}

impl Service for StoreProbe {
    fn name(&self) -> &'static str {
        "store_probe"
    }

    fn interval(&self) -> Duration {
        self.interval
    }

    fn run_once(&mut self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let answer = tokio::time::timeout(self.timeout, self.store.ping()).await;
            let ok = matches!(answer, Ok(Ok(())));
            self.answered(ok);
            match answer {
                Ok(result) => result,
                Err(_) => Err(Error::StoreUnavailable(format!(
                    "no answer through the pool within {:?}",
                    self.timeout
                ))),
            }
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn probe() -> (StoreProbe, watch::Receiver<bool>) {
        let store = Store::connect_lazy(&taskpod_core::store::StoreSettings::default(), 256)
            .expect("lazy store");
        StoreProbe::new(store, Duration::from_secs(1), Duration::from_secs(5))
    }

    #[tokio::test(start_paused = true)]
    async fn the_pool_is_unhealthy_only_after_failing_for_the_whole_bound() {
        let (mut p, rx) = probe();
        p.answered(false);
        assert!(*rx.borrow());
        tokio::time::advance(Duration::from_secs(4)).await;
        p.answered(false);
        assert!(*rx.borrow(), "4 s of failures");
        tokio::time::advance(Duration::from_secs(1)).await;
        p.answered(false);
        assert!(!*rx.borrow(), "5 s of failures");
        p.answered(true);
        assert!(*rx.borrow(), "one answer heals it");
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_restarts_the_count() {
        let (mut p, rx) = probe();
        p.answered(false);
        tokio::time::advance(Duration::from_secs(4)).await;
        p.answered(true);
        p.answered(false);
        tokio::time::advance(Duration::from_secs(4)).await;
        p.answered(false);
        assert!(*rx.borrow());
    }

    #[tokio::test]
    async fn run_once_against_an_unreachable_store_fails_within_its_bound() {
        let store = Store::connect_lazy(
            &taskpod_core::store::StoreSettings {
                acquire_timeout_ms: 10_000,
                ..taskpod_core::store::StoreSettings::with_url(
                    "postgres://nobody@10.255.255.1:5432/x",
                )
            },
            256,
        )
        .expect("lazy store");
        let (mut p, _rx) =
            StoreProbe::new(store, Duration::from_millis(200), Duration::from_secs(5));
        // Bounded by the probe's own timeout, not the pool's 10 s acquire timeout.
        assert!(p.run_once().await.is_err());
        assert!(p.failing_since.is_some());
    }
}
