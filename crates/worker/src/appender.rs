//! Group commit for a worker's pods: their appends share transactions.
//!
//! Every pod appends a handful of events in its life; thousands of pods doing it one
//! transaction each exhaust the connection pool and pay the per-transaction work
//! (BEGIN, lock, write, COMMIT, four round trips) thousands of times. Pods hand their
//! appends to a few flushers instead: each takes whatever has queued, up to a batch,
//! and writes it with `Store::append_pods`, in which every item keeps the outcome it
//! would have had alone. A lone append goes out at once, so an idle worker adds no
//! latency; under load, appends that arrive while a flush is in flight share the next
//! one.

use taskpod_core::Error;
use taskpod_core::store::{Appended, PodAppend, Store};
use taskpod_core::telemetry::context::{link, traceparent_of};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, Span};

/// The most appends one transaction takes.
const BATCH: usize = 256;
/// Flushes in flight at once: one can wait on a row another pod's caller holds
/// while the next proceeds.
const FLUSHERS: usize = 2;

struct Request {
    append: PodAppend,
    /// The pod's span: a flush runs in the first item's and links the rest.
    span: Span,
    reply: oneshot::Sender<Result<Appended, Error>>,
}

/// Where pods send their appends; cheap to clone. The flushers stop once every clone
/// is dropped and the queue is empty.
#[derive(Clone, Debug)]
pub struct Appender {
    tx: mpsc::Sender<Request>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("task_id", &self.append.task_id)
            .finish_non_exhaustive()
    }
}

impl Appender {
    /// Starts the flushers on `tracker`.
    pub fn start(store: Store, tracker: &TaskTracker) -> Self {
        let (tx, rx) = mpsc::channel::<Request>(BATCH * FLUSHERS * 4);
        let rx = std::sync::Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..FLUSHERS {
            tracker.spawn(flush(store.clone(), rx.clone()));
        }
        Self { tx }
    }

    /// Appends as [`Store::append`] with a pod fence would, possibly in a transaction
    /// shared with other pods.
    ///
    /// # Errors
    /// As [`Store::append`]; [`Error::StoreUnavailable`] once the flushers stopped.
    pub async fn append(&self, append: PodAppend) -> Result<Appended, Error> {
        let (reply, answer) = oneshot::channel();
        let request = Request {
            append,
            span: Span::current(),
            reply,
        };
        if self.tx.send(request).await.is_err() {
            return Err(Error::StoreUnavailable("the worker is stopping".into()));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(Error::StoreUnavailable("the append was dropped".into())))
    }
}

async fn flush(store: Store, rx: std::sync::Arc<tokio::sync::Mutex<mpsc::Receiver<Request>>>) {
    loop {
        let mut batch = Vec::with_capacity(BATCH);
        {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else {
                return;
            };
            batch.push(first);
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
        }
        // The statements run in the first pod's trace; the others are linked.
        let span = if batch.len() == 1 {
            batch[0].span.clone()
        } else {
            let span = tracing::info_span!(
                parent: &batch[0].span,
                "taskpod.append.batch",
                taskpod.batch = batch.len(),
            );
            for other in &batch[1..] {
                link(&span, traceparent_of(&other.span).as_deref());
            }
            span
        };
        let (appends, rest): (Vec<PodAppend>, Vec<_>) = batch
            .into_iter()
            .map(|r| (r.append, (r.span, r.reply)))
            .unzip();
        let results = store.append_pods(&appends).instrument(span).await;
        for ((_, reply), result) in rest.into_iter().zip(results) {
            // A pod that stopped waiting no longer needs the answer.
            let _ = reply.send(result);
        }
    }
}
