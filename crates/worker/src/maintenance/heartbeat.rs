//! The node row's heartbeat: when it was last known alive, for people reading
//! `nodes`. Liveness itself is the lock probe's business, never this timestamp.

use std::time::Duration;

use futures::future::BoxFuture;
use taskpod_core::Error;
use taskpod_core::domain::NodeId;
use taskpod_core::store::Store;
use tokio::sync::watch;

use super::Service;

#[derive(Debug)]
pub struct Heartbeat {
    pub store: Store,
    /// The current incarnation, when there is one.
    pub node: watch::Receiver<Option<NodeId>>,
    pub interval: Duration,
}

impl Service for Heartbeat {
    fn name(&self) -> &'static str {
        "heartbeat"
    }

    fn interval(&self) -> Duration {
        self.interval
    }

    fn run_once(&mut self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let node = *self.node.borrow();
            match node {
                Some(node) => self.store.heartbeat_node(node).await,
                None => Ok(()),
            }
        })
    }
}
