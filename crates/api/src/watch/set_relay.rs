//! WatchTasks: the matching tasks, then every change to them in commit order.
//!
//! A stream reads the change feed below a watermark (`Store::changed_tasks`), then only
//! the changed rows it shows or follows (the filter runs in SQL), so its cost follows
//! the stream, not the cluster. What it remembers is a [`FollowSet`]: the tasks it
//! showed as matching, with the version shown. A row read above the watermark comes
//! back in the next range; the set skips a version it showed, so no version is sent
//! twice without a resume, and `left` goes only to a task the client holds.

use std::time::Duration;

use taskpod_core::bus::channels;
use taskpod_core::domain::{Event, Task, TaskState};
use taskpod_core::store::{ListQuery, SortDirection, SortField, TaskFilter, TaskOrder, View};
use taskpod_core::telemetry::metrics::metrics;
use taskpod_proto::v1::{self, watch_tasks_response};
use tokio::time::Instant;
use tonic::Status;

use super::follow::{FollowSet, Step};
use super::resume::{Resume, ResumeToken, followed_at};
use super::{Sender, Wake, Watches, at_state, draining, msg};
use crate::errors::{Fields, to_status};
use crate::listing::shown;
use crate::service::now;

/// How long a set watch keeps looking at the poll interval after news.
const NEWS_SETTLE: Duration = Duration::from_secs(2);

/// The most followed tasks a stream names in its change query (16 bytes each, every
/// look); past it, the stream reads the changed ids instead.
const FOLLOWED_IN_QUERY: usize = 4_096;

pub(super) struct SetRelay {
    watches: Watches,
    filter: TaskFilter,
    fingerprint: String,
    follow: FollowSet,
    /// Where a resumed stream starts.
    resume: Option<Resume>,
    view: View,
}

impl SetRelay {
    pub(super) fn new(
        watches: Watches,
        filter: TaskFilter,
        fingerprint: String,
        resume: Option<Resume>,
        view: View,
    ) -> Self {
        Self {
            watches,
            filter,
            fingerprint,
            follow: FollowSet::new(),
            resume,
            view,
        }
    }

    fn token(&self, mark: u64) -> String {
        self.watches.tokens.sign(
            "watch",
            &self.fingerprint,
            &ResumeToken::issue(mark, chrono::Utc::now()),
        )
    }

    pub(super) async fn run(mut self, tx: Sender<v1::WatchTasksResponse>) {
        let _open = metrics().watch_stream("tasks");
        if let Err(status) = self.serve(&tx).await {
            let _ = tx.send(Err(status)).await;
        }
    }

    async fn serve(&mut self, tx: &Sender<v1::WatchTasksResponse>) -> Result<(), Status> {
        let store = self.watches.store.clone();
        let plain = |e| to_status(e, Fields::Plain);
        let mut news = self.watches.hub.follow(channels::TASKS.to_owned());
        let mut mark = match self.resume {
            Some(at) => {
                let _budget = self.expensive_budget().await?;
                self.follow = followed_at(&store, &self.filter, at).await.map_err(plain)?;
                at.mark
            }
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
            let before = *news.news.borrow();
            match self.watches.wait(&mut news, limit, tx).await {
                Wake::Look => {}
                Wake::Gone => return Ok(()),
                Wake::Drain => {
                    let beat = self.heartbeat(mark);
                    if tx.send(Ok(beat)).await.is_ok() {
                        let _ = tx.send(Err(draining())).await;
                    }
                    return Ok(());
                }
            }
            if *news.news.borrow() != before {
                last_news = Instant::now();
            }
            let next = store.watermark().await.map_err(plain)?;
            let rows = self.changed_rows(mark, next).await.map_err(plain)?;
            if !rows.is_empty() {
                let mut out = Vec::new();
                for row in rows {
                    let matches = self.filter.matches(&row);
                    match self.follow.step(row.task_id, row.version, matches) {
                        Step::Show { shown: before } => {
                            for task in self.changes_of(row, before).await.map_err(plain)? {
                                out.push(watch_tasks_response::Kind::Task(shown(&task, self.view)));
                            }
                        }
                        Step::Left => out.push(watch_tasks_response::Kind::Left(v1::TaskLeft {
                            task_id: row.task_id.to_string(),
                            version: row.version,
                        })),
                        Step::Skip => {}
                    }
                }
                let last = out.len().saturating_sub(1);
                for (i, kind) in out.into_iter().enumerate() {
                    // Until the whole batch is out, resuming must replay it: only the
                    // last message moves the token past it.
                    let token = self.token(if i == last { next } else { mark });
                    if tx.send(Ok(msg(kind, token))).await.is_err() {
                        return Ok(());
                    }
                    last_sent = Instant::now();
                }
            }
            mark = next;
            if last_sent.elapsed() >= self.watches.heartbeat() {
                if tx.send(Ok(self.heartbeat(mark))).await.is_err() {
                    return Ok(());
                }
                last_sent = Instant::now();
            }
        }
    }

    /// The rows changed in `[from, to)` that the stream shows or follows. A stream that
    /// follows few tasks names them in the query, which then returns only its rows; one
    /// that follows many (it shows most of what changes anyway) reads the changed ids
    /// first and names the followed ones among them.
    async fn changed_rows(&self, from: u64, to: u64) -> Result<Vec<Task>, taskpod_core::Error> {
        let store = &self.watches.store;
        if let Some(followed) = self.follow.all_up_to(FOLLOWED_IN_QUERY) {
            return store
                .changed_rows_between(from, to, &self.filter, &followed, self.view)
                .await;
        }
        let changed = store.changed_tasks(from, to).await?;
        if changed.is_empty() {
            return Ok(Vec::new());
        }
        let followed = self.follow.followed_among(&changed);
        store
            .changed_rows(&changed, &self.filter, &followed, self.view)
            .await
    }

    /// A permit of the replica's budget for expensive reads, held while one runs (not
    /// while its rows are sent, so a slow client does not hold it). Waits for one: the
    /// stream's client waits too, and nothing is refused.
    async fn expensive_budget(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        self.watches
            .expensive
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| draining())
    }

    fn heartbeat(&self, mark: u64) -> v1::WatchTasksResponse {
        let token = self.token(mark);
        let beat = watch_tasks_response::Kind::Heartbeat(v1::Heartbeat {
            version: 0,
            resume_token: token.clone(),
            sent_at: Some(now()),
        });
        msg(beat, token)
    }

    /// The task as it stood after each status or phase change since `shown`, the
    /// version this stream last showed, ending with its current state. Only the current
    /// state when the task is new to the stream or nothing was skipped.
    ///
    /// `shown` is 0 for a task a resumed stream follows from its creation on (it first
    /// matched at version 1, after the token's mark): every state from version 1 is new.
    async fn changes_of(
        &self,
        row: Task,
        shown: Option<i64>,
    ) -> Result<Vec<Task>, taskpod_core::Error> {
        let Some(previous) = shown.filter(|p| row.version > p + 1) else {
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
        // The state at version v is history[v - 1]. A stream read short (the task was
        // pruned meanwhile) gives fewer states, never a wrong one.
        let history = TaskState::history(row.task_id, &events)?;
        let previous = usize::try_from(previous).unwrap_or(0);
        let mut held = previous
            .checked_sub(1)
            .and_then(|i| history.get(i))
            .map(|s| (s.status, s.phase));
        let mut out = Vec::new();
        for state in history.iter().skip(previous) {
            if state.version >= row.version {
                break;
            }
            if held != Some((state.status, state.phase)) {
                out.push(at_state(&row, state));
                held = Some((state.status, state.phase));
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
            let budget = self.expensive_budget().await?;
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
                    view: self.view,
                })
                .await
                .map_err(|e| to_status(e, Fields::Plain))?;
            drop(budget);
            for task in &page.tasks {
                self.follow.insert(task.task_id, task.version);
                let kind = watch_tasks_response::Kind::Task(shown(task, self.view));
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
