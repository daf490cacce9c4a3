//! WatchTask and WatchTasks, served from Postgres, woken by the replica's [`Hub`].
//!
//! Each stream is a relay task owned by the server's tracker: it stops when the client
//! goes away or the server drains, and writes into a bounded channel, so a slow client
//! slows its own relay (which reads Postgres at its own pace) and never grows server
//! memory. WatchTask sends every version once, in order, from the stream itself;
//! WatchTasks lists, then follows the commit-order-safe change feed
//! (`Store::changed_tasks` below a watermark), and its resume token is a watermark
//! ([`set_relay`]).
//!
//! When the server drains, every stream gets a last resume point (a heartbeat), then
//! UNAVAILABLE: a client resumes on another replica without a gap.

mod follow;
mod resume;
mod set_relay;

use std::sync::Arc;
use std::time::Duration;

pub use resume::{Resume, ResumeToken};
use taskpod_core::domain::{Event, PodInfo, Task, TaskId, TaskState};
use taskpod_core::store::{Store, TaskFilter, View};
use taskpod_proto::convert;
use taskpod_proto::v1::{self, watch_task_response, watch_tasks_response};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;

use taskpod_core::bus::channels;
use taskpod_core::telemetry::metrics::metrics;
use taskpod_core::telemetry::spans::{Destination, process_span};
use tracing::Instrument as _;

use crate::errors::{Fields, to_status};
use crate::hub::{Follow, Hub};
use crate::page_token::PageTokens;
use crate::service::now;
use crate::settings::WatchSettings;

/// Messages a relay may queue for a slow client before it waits.
const STREAM_BUFFER: usize = 64;
/// Events read from the store per round trip.
const READ_BATCH: usize = 256;

type Sender<T> = mpsc::Sender<Result<T, Status>>;

/// Starts watch relays.
#[derive(Clone, Debug)]
pub struct Watches {
    store: Store,
    tokens: PageTokens,
    settings: WatchSettings,
    /// Cancelled when the server starts draining: every relay ends its stream.
    shutdown: CancellationToken,
    /// Owns every relay task; the server waits on it at shutdown.
    tracker: TaskTracker,
    /// Says when to look again.
    hub: Hub,
    /// The replica's budget for expensive reads: snapshots and resume rebuilds take a
    /// permit, so many streams opening at once cannot take the whole store pool.
    expensive: Arc<Semaphore>,
}

impl Watches {
    pub fn new(
        store: Store,
        tokens: PageTokens,
        settings: WatchSettings,
        shutdown: CancellationToken,
        tracker: TaskTracker,
        hub: Hub,
        expensive: Arc<Semaphore>,
    ) -> Self {
        Self {
            hub,
            expensive,
            store,
            tokens,
            settings,
            shutdown,
            tracker,
        }
    }

    pub fn watch_task(
        &self,
        id: TaskId,
        from_version: i64,
    ) -> ReceiverStream<Result<v1::WatchTaskResponse, Status>> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let relay = TaskRelay {
            watches: self.clone(),
            id,
            next: from_version.max(1),
        };
        // The relay outlives the handler: it carries the call's span itself.
        self.tracker
            .spawn(relay.run(tx).instrument(tracing::Span::current()));
        ReceiverStream::new(rx)
    }

    pub fn watch_tasks(
        &self,
        filter: TaskFilter,
        fingerprint: String,
        resume: Option<Resume>,
        view: View,
    ) -> ReceiverStream<Result<v1::WatchTasksResponse, Status>> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let relay = set_relay::SetRelay::new(self.clone(), filter, fingerprint, resume, view);
        self.tracker
            .spawn(relay.run(tx).instrument(tracing::Span::current()));
        ReceiverStream::new(rx)
    }

    /// Where a stream resumed with `token` starts.
    ///
    /// # Errors
    /// FAILED_PRECONDITION when the token is older than the configured lifetime.
    pub fn resume_point(&self, token: ResumeToken) -> Result<Resume, Status> {
        let ttl = Duration::from_secs(self.settings.resume_token_ttl_secs);
        token
            .mark(chrono::Utc::now(), ttl)
            .map_err(|age| crate::errors::resume_token_expired(age, ttl))
    }

    fn poll(&self) -> Duration {
        Duration::from_millis(self.settings.poll_interval_ms)
    }

    fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.settings.heartbeat_interval_ms)
    }

    /// Waits for news on `follow`, or at most `limit`.
    async fn wait<T>(&self, follow: &mut Follow, limit: Duration, tx: &Sender<T>) -> Wake {
        tokio::select! {
            changed = follow.news.changed() => if changed.is_ok() { Wake::Look } else { Wake::Drain },
            () = tokio::time::sleep(limit) => Wake::Look,
            () = self.shutdown.cancelled() => Wake::Drain,
            () = tx.closed() => Wake::Gone,
        }
    }
}

/// Why a relay woke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wake {
    /// News, or time to look anyway.
    Look,
    /// The server drains: send a last resume point, then UNAVAILABLE.
    Drain,
    /// The client went away.
    Gone,
}

/// What a draining server ends every stream with, after its last resume point.
fn draining() -> Status {
    Status::unavailable("the server is shutting down: resume the stream on another replica")
}

struct TaskRelay {
    watches: Watches,
    id: TaskId,
    next: i64,
}

impl TaskRelay {
    async fn run(mut self, tx: Sender<v1::WatchTaskResponse>) {
        let _open = metrics().watch_stream("task");
        let store = self.watches.store.clone();
        // Follow first, then read: a change committed in between still wakes us.
        let mut follow = self.watches.hub.follow(channels::task(self.id));
        let mut last_sent = Instant::now();
        loop {
            let events = match store.read_stream(self.id, self.next, READ_BATCH).await {
                Ok(events) => events,
                Err(e) => {
                    let _ = tx.send(Err(to_status(e, Fields::Plain))).await;
                    return;
                }
            };
            let idle = events.is_empty();
            for e in events {
                self.next = e.version + 1;
                let terminal = matches!(
                    e.event,
                    Event::TaskCompleted { .. }
                        | Event::TaskCancelled { .. }
                        | Event::TaskFailed { .. }
                );
                let msg = v1::WatchTaskResponse {
                    kind: Some(watch_task_response::Kind::Event(convert::event(&e))),
                };
                // Delivering the event is consuming the writer's update: its span
                // continues the writer's trace (from the event, so it holds even when
                // Redis dropped the announcement).
                let task_id = e.task_id.to_string();
                let delivery = process_span(
                    Destination::Task,
                    &task_id,
                    e.metadata.traceparent.as_deref(),
                );
                let sent = tx.send(Ok(msg)).instrument(delivery.clone()).await;
                let lag = (chrono::Utc::now() - e.recorded_at).as_seconds_f64();
                delivery.in_scope(|| metrics().watch_lag(lag));
                if sent.is_err() || terminal {
                    return;
                }
                last_sent = Instant::now();
            }
            if idle && last_sent.elapsed() >= self.watches.heartbeat() {
                // Also how a stream that started past the terminal event ends.
                match store.state(self.id).await {
                    // Started past the terminal event: nothing more will come.
                    Ok(state) if state.status.is_terminal() && state.version < self.next => return,
                    // It ended since the read above: read the rest, ending at its end.
                    Ok(state) if state.status.is_terminal() => continue,
                    Ok(state) => {
                        let beat = v1::WatchTaskResponse {
                            kind: Some(watch_task_response::Kind::Heartbeat(v1::Heartbeat {
                                version: state.version,
                                resume_token: String::new(),
                                sent_at: Some(now()),
                            })),
                        };
                        if tx.send(Ok(beat)).await.is_err() {
                            return;
                        }
                        last_sent = Instant::now();
                    }
                    Err(e) => {
                        let _ = tx.send(Err(to_status(e, Fields::Plain))).await;
                        return;
                    }
                }
            }
            let until_beat = self.watches.heartbeat().saturating_sub(last_sent.elapsed());
            if idle {
                match self.watches.wait(&mut follow, until_beat, &tx).await {
                    Wake::Look => {}
                    Wake::Gone => return,
                    Wake::Drain => {
                        // The last version sent is where the client resumes.
                        let beat = v1::WatchTaskResponse {
                            kind: Some(watch_task_response::Kind::Heartbeat(v1::Heartbeat {
                                version: self.next - 1,
                                resume_token: String::new(),
                                sent_at: Some(now()),
                            })),
                        };
                        if tx.send(Ok(beat)).await.is_ok() {
                            let _ = tx.send(Err(draining())).await;
                        }
                        return;
                    }
                }
            }
        }
    }
}

/// `row` as it stood at `state` (an earlier version): the lifecycle and pod fields from
/// the replayed state, the rest from the row.
fn at_state(row: &Task, state: &TaskState) -> Task {
    Task {
        status: state.status,
        phase: state.phase,
        version: state.version,
        last_error: state.last_error.clone(),
        pod: state.has_pod().then_some(PodInfo {
            state: state.pod_state,
            epoch: state.pod_epoch,
            node: state.owner_node,
            started_at: state.pod_started_at,
        }),
        ..row.clone()
    }
}

fn msg(kind: watch_tasks_response::Kind, resume_token: String) -> v1::WatchTasksResponse {
    v1::WatchTasksResponse {
        kind: Some(kind),
        resume_token,
    }
}
