//! Publishing that never waits on Redis.
//!
//! Writers publish inside their answer (an API call, a pod's step, a crash record), so
//! [`Publisher::publish`] only queues and returns. One task per process owns the
//! connection: it (re)connects with backoff and sends whatever has queued in one
//! pipelined round trip, each connect and round trip bounded by `bus.timeout_ms`. A
//! slow or black-holed Redis therefore costs watchers latency (they repair from
//! Postgres) and never a writer's time. The queue is bounded ([`Backlog`]): while Redis
//! cannot keep up its oldest updates are dropped, and every update that is never sent
//! is counted in `taskpod_bus_publishes_dropped_total`.
//!
//! The task stops once the last handle is dropped, after sending what it can within
//! `bus.timeout_ms`; the owner waits for it on its `TaskTracker`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, Span};

use super::backlog::Backlog;
use super::{BusError, BusSettings, TaskUpdate, channels, connection};
use crate::domain::TaskId;
use crate::telemetry::metrics::metrics;
use crate::telemetry::spans::{DbSystem, db_call, publish_span};

/// Updates queued at most (about 400 bytes each): a minute of a busy API's writes.
const QUEUE: usize = 16_384;
/// Updates sent in one round trip at most (three PUBLISH commands each).
const ROUND_TRIP: usize = 512;
/// Waits between failed connects: doubling from the first to the last.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Where writers publish; cheap to clone. See the module docs.
#[derive(Clone, Debug)]
pub struct Publisher {
    handle: Option<Arc<Handle>>,
}

/// Shared by every clone of one publisher; its drop tells the task to finish.
#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.closed.cancel();
    }
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Backlog<Queued>>,
    /// Something was queued.
    queued: Notify,
    /// Every handle is gone: flush and stop.
    closed: CancellationToken,
    /// The task runs; once it ended (stopped, or died), publishes are dropped at once.
    running: AtomicBool,
    failures: AtomicU64,
    dropped: AtomicU64,
}

/// One update, serialized, with the PRODUCER span of the publish that queued it.
#[derive(Debug)]
struct Queued {
    task_id: TaskId,
    /// The partition's channel, for an update a worker may act on.
    partition: Option<i32>,
    payload: Vec<u8>,
    span: Span,
}

impl Publisher {
    /// A publisher whose task runs on `tracker`.
    ///
    /// # Errors
    /// [`BusError::InvalidUrl`].
    pub fn start(settings: &BusSettings, tracker: &TaskTracker) -> Result<Self, BusError> {
        if !settings.enabled() || settings.drop_publishes {
            return Ok(Self::disabled());
        }
        let client = connection::client(settings)?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Backlog::new(QUEUE)),
            queued: Notify::new(),
            closed: CancellationToken::new(),
            running: AtomicBool::new(true),
            failures: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        let sender = Sender {
            shared: Arc::clone(&shared),
            client,
            timeout: settings.timeout(),
        };
        tracker.spawn(sender.run());
        Ok(Self {
            handle: Some(Arc::new(Handle { shared })),
        })
    }

    /// Sends what is queued (within `bus.timeout_ms`) and stops, whatever handles are
    /// still held: a process that drains closes its publisher once its writers are
    /// done, since every store clone holds a handle. Later publishes are dropped and
    /// counted.
    pub fn close(&self) {
        if let Some(handle) = &self.handle {
            handle.shared.closed.cancel();
        }
    }

    /// A publisher that publishes nothing (no bus configured).
    pub fn disabled() -> Self {
        Self { handle: None }
    }

    /// Failed attempts to reach Redis so far: connects and round trips.
    pub fn failures(&self) -> u64 {
        self.handle
            .as_ref()
            .map_or(0, |h| h.shared.failures.load(Ordering::Relaxed))
    }

    /// Updates that will never be published, so far.
    pub fn dropped(&self) -> u64 {
        self.handle
            .as_ref()
            .map_or(0, |h| h.shared.dropped.load(Ordering::Relaxed))
    }

    /// Queues each update for its task's channel, its partition's channel (unless no
    /// worker can act on it: [`TaskUpdate::may_concern_a_worker`]) and `tasks`,
    /// inside a PRODUCER span (a child of the writer's span, ended once sent or
    /// dropped). Never waits and never fails: a lost update is repaired by the readers'
    /// paths to Postgres, and counted.
    pub fn publish(&self, updates: &[TaskUpdate]) {
        let Some(handle) = &self.handle else { return };
        if updates.is_empty() {
            return;
        }
        let shared = &handle.shared;
        let span = publish_span(updates.len());
        let queued: Vec<Queued> = updates
            .iter()
            .filter_map(|u| {
                Some(Queued {
                    task_id: u.task_id,
                    partition: u.may_concern_a_worker().then_some(u.partition),
                    payload: serde_json::to_vec(u).ok()?,
                    span: span.clone(),
                })
            })
            .collect();
        if !shared.running.load(Ordering::Acquire) {
            shared.drop_all(queued, "stopped");
            return;
        }
        let full = shared.lock().push(queued);
        shared.queued.notify_one();
        if !full.is_empty() {
            tracing::debug!(dropped = full.len(), "bus publish queue full");
            shared.drop_all(full, "queue_full");
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Backlog<Queued>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts updates that will never be sent, and says so on their spans.
    fn drop_all(&self, updates: Vec<Queued>, reason: &'static str) {
        if updates.is_empty() {
            return;
        }
        let mut last = None;
        for u in &updates {
            // The updates of one publish are adjacent and share its span.
            let id = u.span.id();
            if id.is_none() || id != last {
                u.span.record("error.type", reason);
                last = id;
            }
        }
        let n = updates.len() as u64;
        self.dropped.fetch_add(n, Ordering::Relaxed);
        metrics().bus_publishes_dropped(reason, n);
    }

    fn failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        metrics().bus_publish_failed();
    }
}

/// The task's side: the connection and what it needs to make one.
struct Sender {
    shared: Arc<Shared>,
    client: redis::Client,
    timeout: Duration,
}

/// Marks the task ended however it ends (a panic included), and drops what is left.
struct Ended(Arc<Shared>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::Release);
        let left = self.0.lock().take_all();
        if !left.is_empty() {
            tracing::debug!(
                dropped = left.len(),
                "bus publisher stopped with updates queued"
            );
        }
        self.0.drop_all(left, "stopped");
    }
}

impl Sender {
    async fn run(self) {
        let _ended = Ended(Arc::clone(&self.shared));
        let mut conn: Option<MultiplexedConnection> = None;
        let mut backoff = BACKOFF_MIN;
        // Once every handle is gone: the end of the last flush.
        let mut deadline: Option<Instant> = None;
        loop {
            if deadline.is_none() && self.shared.closed.is_cancelled() {
                deadline = Some(Instant::now() + self.timeout);
            }
            let bound = match deadline {
                Some(d) if d <= Instant::now() => return,
                Some(d) => self.timeout.min(d - Instant::now()),
                None => self.timeout,
            };
            if self.shared.lock().is_empty() {
                if deadline.is_some() {
                    return;
                }
                tokio::select! {
                    () = self.shared.queued.notified() => {}
                    () = self.shared.closed.cancelled() => {}
                }
                continue;
            }
            let Some(live) = &mut conn else {
                match self.connect(bound).await {
                    Ok(c) => {
                        conn = Some(c);
                        backoff = BACKOFF_MIN;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "bus unavailable");
                        self.shared.failed();
                        // What queues meanwhile waits, within the queue's bound.
                        tokio::select! {
                            () = tokio::time::sleep(backoff.min(bound)) => {}
                            () = self.shared.closed.cancelled(), if deadline.is_none() => {}
                        }
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
                continue;
            };
            let batch = self.shared.lock().take(ROUND_TRIP);
            if let Err(e) = self.send(live, &batch, bound).await {
                tracing::debug!(error = %e, "bus publish failed; readers repair from the store");
                conn = None;
                self.shared.failed();
                self.shared.drop_all(batch, "failed");
            }
        }
    }

    async fn connect(&self, bound: Duration) -> Result<MultiplexedConnection, String> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(bound))
            .set_response_timeout(Some(self.timeout));
        let connect = self
            .client
            .get_multiplexed_async_connection_with_config(&config);
        match tokio::time::timeout(bound, connect).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err("connect timed out".to_owned()),
        }
    }

    /// One pipelined round trip for `batch`, in the span of its first publish.
    async fn send(
        &self,
        conn: &mut MultiplexedConnection,
        batch: &[Queued],
        bound: Duration,
    ) -> Result<(), String> {
        let Some(first) = batch.first() else {
            return Ok(());
        };
        let mut pipe = redis::pipe();
        for u in batch {
            pipe.publish(channels::task(u.task_id), &u.payload).ignore();
            if let Some(partition) = u.partition {
                pipe.publish(channels::partition(partition), &u.payload)
                    .ignore();
            }
            pipe.publish(channels::TASKS, &u.payload).ignore();
        }
        db_call(
            DbSystem::Redis,
            "PUBLISH",
            async {
                match tokio::time::timeout(bound, pipe.query_async::<()>(conn)).await {
                    Ok(result) => result.map_err(|e| e.to_string()),
                    Err(_) => Err("timeout".to_owned()),
                }
            },
            |e: &String| (e.clone(), None),
        )
        .instrument(first.span.clone())
        .await
    }
}
