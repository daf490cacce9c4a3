//! WatchTask and WatchTasks, served from Postgres, woken by the replica's [`Hub`].
//!
//! Each stream is a relay task owned by the server's tracker: it stops when the client
//! goes away or the server drains, and writes into a bounded channel, so a slow client
//! slows its own relay (which reads Postgres at its own pace) and never grows server
//! memory. WatchTask sends every version once, in order, from the stream itself;
//! WatchTasks lists, then follows the commit-order-safe change feed
//! (`Store::changed_tasks` below a watermark), and its resume token is a watermark.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use taskpod_core::domain::{Event, PodInfo, Task, TaskId, TaskState};
use taskpod_core::store::{ListQuery, SortDirection, SortField, Store, TaskFilter, TaskOrder};
use taskpod_proto::convert;
use taskpod_proto::v1::{self, watch_task_response, watch_tasks_response};
use tokio::sync::mpsc;
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
/// How long a set watch keeps looking at the poll interval after news.
const NEWS_SETTLE: Duration = Duration::from_secs(2);

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
}

impl Watches {
    pub fn new(
        store: Store,
        tokens: PageTokens,
        settings: WatchSettings,
        shutdown: CancellationToken,
        tracker: TaskTracker,
        hub: Hub,
    ) -> Self {
        Self {
            hub,
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
        resume: Option<u64>,
    ) -> ReceiverStream<Result<v1::WatchTasksResponse, Status>> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let relay = SetRelay {
            watches: self.clone(),
            filter,
            fingerprint,
            // After a resume the client's set is unknown: every non-matching change is
            // reported as `left`.
            known: resume.is_none().then(HashSet::new),
            versions: HashMap::new(),
            mark: resume,
        };
        self.tracker
            .spawn(relay.run(tx).instrument(tracing::Span::current()));
        ReceiverStream::new(rx)
    }

    fn poll(&self) -> Duration {
        Duration::from_millis(self.settings.poll_interval_ms)
    }

    fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.settings.heartbeat_interval_ms)
    }

    /// Waits for news on `follow`, or at most `limit`; false when the stream should end
    /// instead (the client left, or the server drains).
    async fn wait<T>(&self, follow: &mut Follow, limit: Duration, tx: &Sender<T>) -> bool {
        tokio::select! {
            changed = follow.news.changed() => changed.is_ok(),
            () = tokio::time::sleep(limit) => true,
            () = self.shutdown.cancelled() => false,
            () = tx.closed() => false,
        }
    }
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
            if idle && !self.watches.wait(&mut follow, until_beat, &tx).await {
                return;
            }
        }
    }
}

struct SetRelay {
    watches: Watches,
    filter: TaskFilter,
    fingerprint: String,
    /// Tasks this stream has shown as matching; `None` after a resume.
    known: Option<HashSet<TaskId>>,
    /// The version this stream last accounted for, per task it has seen.
    versions: HashMap<TaskId, i64>,
    mark: Option<u64>,
}

impl SetRelay {
    fn token(&self, mark: u64) -> String {
        self.watches.tokens.sign("watch", &self.fingerprint, &mark)
    }

    async fn run(mut self, tx: Sender<v1::WatchTasksResponse>) {
        let _open = metrics().watch_stream("tasks");
        if let Err(status) = self.serve(&tx).await {
            let _ = tx.send(Err(status)).await;
        }
    }

    async fn serve(&mut self, tx: &Sender<v1::WatchTasksResponse>) -> Result<(), Status> {
        let store = self.watches.store.clone();
        let plain = |e| to_status(e, Fields::Plain);
        let mut follow = self.watches.hub.follow(channels::TASKS.to_owned());
        let mut mark = match self.mark {
            Some(mark) => mark,
            None => {
                // The watermark first: anything committed after it is also in the feed.
                let mark = store.watermark().await.map_err(plain)?;
                if !self.snapshot(tx, mark).await? {
                    return Ok(());
                }
                mark
            }
        };
        let mut last_sent = Instant::now();
        let mut last_news = Instant::now();
        loop {
            // A change announced now may still sit above the watermark (an older
            // transaction is open): keep looking briefly after news, then rest until the
            // next news or heartbeat.
            let limit = if last_news.elapsed() < NEWS_SETTLE {
                self.watches.poll()
            } else {
                self.watches.heartbeat().saturating_sub(last_sent.elapsed())
            };
            let before = *follow.news.borrow();
            if !self.watches.wait(&mut follow, limit, tx).await {
                return Ok(());
            }
            if *follow.news.borrow() != before {
                last_news = Instant::now();
            }
            let next = store.watermark().await.map_err(plain)?;
            let changed = store.changed_tasks(mark, next).await.map_err(plain)?;
            if !changed.is_empty() {
                let rows = store.get_tasks(&changed).await.map_err(plain)?;
                let mut tasks = Vec::with_capacity(rows.len());
                for row in rows {
                    tasks.extend(self.changes_of(row).await.map_err(plain)?);
                }
                let last = tasks.len().saturating_sub(1);
                for (i, task) in tasks.iter().enumerate() {
                    // Until the whole batch is out, resuming must replay it: only the
                    // last message moves the token past it.
                    let token = self.token(if i == last { next } else { mark });
                    let kind = if self.filter.matches(task) {
                        if let Some(known) = &mut self.known {
                            known.insert(task.task_id);
                        }
                        watch_tasks_response::Kind::Task(convert::task(task))
                    } else if self.known.as_mut().is_none_or(|k| k.remove(&task.task_id)) {
                        watch_tasks_response::Kind::Left(v1::TaskLeft {
                            task_id: task.task_id.to_string(),
                            version: task.version,
                        })
                    } else {
                        continue;
                    };
                    if tx.send(Ok(msg(kind, token))).await.is_err() {
                        return Ok(());
                    }
                    last_sent = Instant::now();
                }
            }
            mark = next;
            if last_sent.elapsed() >= self.watches.heartbeat() {
                let beat = watch_tasks_response::Kind::Heartbeat(v1::Heartbeat {
                    version: 0,
                    resume_token: self.token(mark),
                    sent_at: Some(now()),
                });
                if tx.send(Ok(msg(beat, self.token(mark)))).await.is_err() {
                    return Ok(());
                }
                last_sent = Instant::now();
            }
        }
    }

    /// The task as it stood after each status or phase change since the version this
    /// stream last showed, ending with its current state. Without an earlier version
    /// (after a resume) only the current state.
    async fn changes_of(&mut self, row: Task) -> Result<Vec<Task>, taskpod_core::Error> {
        let previous = self.versions.insert(row.task_id, row.version);
        let Some(previous) = previous.filter(|p| row.version > p + 1) else {
            return Ok(vec![row]);
        };
        let events: Vec<Event> = self
            .watches
            .store
            .read_stream(row.task_id, 1, row.version as usize)
            .await?
            .into_iter()
            .map(|e| e.event)
            .collect();
        let mut out = Vec::new();
        let mut shown = TaskState::replay(row.task_id, &events[..previous as usize])?;
        for v in previous + 1..row.version {
            let state = TaskState::replay(row.task_id, &events[..v as usize])?;
            if (state.status, state.phase) != (shown.status, shown.phase) {
                out.push(at_state(&row, &state));
                shown = state;
            }
        }
        out.push(row);
        Ok(out)
    }

    /// Sends every matching task, then `snapshot_done`. False when the client left.
    async fn snapshot(
        &mut self,
        tx: &Sender<v1::WatchTasksResponse>,
        mark: u64,
    ) -> Result<bool, Status> {
        let token = self.token(mark);
        let mut after = None;
        loop {
            let page = self
                .watches
                .store
                .list_tasks(&ListQuery {
                    filter: self.filter.clone(),
                    order: TaskOrder {
                        field: SortField::CreatedAt,
                        direction: SortDirection::Asc,
                    },
                    page_size: 1000,
                    after,
                })
                .await
                .map_err(|e| to_status(e, Fields::Plain))?;
            for task in &page.tasks {
                if let Some(known) = &mut self.known {
                    known.insert(task.task_id);
                }
                self.versions.insert(task.task_id, task.version);
                let kind = watch_tasks_response::Kind::Task(convert::task(task));
                if tx.send(Ok(msg(kind, token.clone()))).await.is_err() {
                    return Ok(false);
                }
            }
            match page.next {
                Some(c) => after = Some(c),
                None => break,
            }
        }
        let done = watch_tasks_response::Kind::SnapshotDone(v1::SnapshotDone {});
        Ok(tx.send(Ok(msg(done, token))).await.is_ok())
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
