//! Keeps the monthly event partitions ahead of the clock. API replicas create them when
//! they start, but a replica up for a year (or a clock far ahead) would otherwise fill
//! `events_default`, which later months cannot be split out of cheaply.

use std::time::Duration;

use futures::future::BoxFuture;
use taskpod_core::Error;
use taskpod_core::store::Store;

use super::Service;

#[derive(Debug)]
pub struct PartitionUpkeep {
    pub store: Store,
    pub interval: Duration,
}

impl Service for PartitionUpkeep {
    fn name(&self) -> &'static str {
        "partition_upkeep"
    }

    fn interval(&self) -> Duration {
        self.interval
    }

    fn run_once(&mut self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let created = self.store.ensure_event_partitions().await?;
            if created > 0 {
                tracing::info!(created, "event partitions created ahead");
            }
            Ok(())
        })
    }
}
