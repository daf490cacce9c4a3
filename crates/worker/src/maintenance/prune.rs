//! Crash rows past their retention go, in small batches (`Store::prune_crashes`), so a
//! prune never holds a transaction long enough to stall the change feed.

use std::time::Duration;

use futures::future::BoxFuture;
use taskpod_core::Error;
use taskpod_core::store::Store;

use super::Service;

#[derive(Debug)]
pub struct CrashPrune {
    pub store: Store,
    /// Longer than any restart window (checked when settings load).
    pub retention: Duration,
    pub interval: Duration,
}

impl Service for CrashPrune {
    fn name(&self) -> &'static str {
        "crash_prune"
    }

    fn interval(&self) -> Duration {
        self.interval
    }

    fn run_once(&mut self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let pruned = self.store.prune_crashes(self.retention).await?;
            if pruned > 0 {
                tracing::info!(pruned, "crash history pruned");
            }
            Ok(())
        })
    }
}
