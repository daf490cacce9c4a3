//! Group commit for a worker's pods: their appends share transactions.
//!
//! Every pod appends a handful of events in its life; thousands of pods doing it one
//! transaction each exhaust the connection pool and pay the per-transaction work
//! (BEGIN, lock, write, COMMIT: four round trips) thousands of times. Pods hand their
//! appends to a [`Batcher`] instead, which writes what queued together with
//! `Store::append_pods`, where every item keeps the outcome it would have had alone.

use taskpod_core::Error;
use taskpod_core::batch::{Batcher, Shape};
use taskpod_core::store::{Appended, PodAppend, Store};
use tokio_util::task::TaskTracker;

/// Up to 256 appends a transaction, two transactions in flight; one stuck for a
/// second (a silent store connection) no longer holds the appends behind it.
const SHAPE: Shape = Shape {
    max_batch: 256,
    flushers: 2,
    stall: std::time::Duration::from_secs(1),
};

/// Where pods send their appends; cheap to clone.
#[derive(Clone, Debug)]
pub struct Appender {
    batcher: Batcher<PodAppend, Result<Appended, Error>>,
}

impl Appender {
    /// Starts the flushers on `tracker`; they stop once every clone is dropped.
    pub fn start(store: Store, tracker: &TaskTracker) -> Self {
        let batcher = Batcher::start(SHAPE, tracker, move |batch: Vec<PodAppend>| {
            let store = store.clone();
            async move { store.append_pods(&batch).await }
        });
        Self { batcher }
    }

    /// Appends as `Store::append` with a pod fence would, possibly in a transaction
    /// shared with other pods.
    ///
    /// # Errors
    /// As `Store::append`; [`Error::StoreUnavailable`] once the worker stops.
    pub async fn append(&self, append: PodAppend) -> Result<Appended, Error> {
        self.batcher
            .call(append)
            .await
            .unwrap_or_else(|e| Err(Error::StoreUnavailable(e.to_string())))
    }
}
