//! The cluster-wide pending-pod gauges: how many tasks are active without a running
//! pod and how long the oldest has waited. A scan of the active tasks, so every few
//! seconds, not every tick.

use std::time::Duration;

use futures::future::BoxFuture;
use taskpod_core::Error;
use taskpod_core::store::Store;
use taskpod_core::telemetry::metrics::metrics;

use super::Service;

#[derive(Debug)]
pub struct PendingGauges {
    pub store: Store,
    pub interval: Duration,
}

impl Service for PendingGauges {
    fn name(&self) -> &'static str {
        "pending_gauges"
    }

    fn interval(&self) -> Duration {
        self.interval
    }

    fn run_once(&mut self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let (pending, oldest) = self.store.pending_pods().await?;
            metrics().pods_pending(pending, oldest);
            Ok(())
        })
    }
}
