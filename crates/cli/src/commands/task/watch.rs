//! `taskpod task watch` and `taskpod task wait`: long-lived streams that survive a
//! dropped connection.
//!
//! `WatchTask` sends every version of a task exactly once and in order. The client
//! remembers the last version it printed; after a disconnect it asks again from the
//! next one, and drops anything older should the server repeat itself, so the output has
//! neither a gap nor a duplicate. `WatchTasks` resumes from the last resume token the
//! server sent. Retryable failures (the server went away, a replica drains) are retried
//! with backoff for as long as the per-call timeout; refusals (NOT_FOUND, auth, bad
//! filter) end the command at once.

use std::time::Duration;

use clap::ArgGroup;
use serde::Serialize;
use taskpod_proto::v1;
use tokio::time::Instant;
use tonic::{Code, Status};

use super::{is_terminal_event, is_terminal_status, read};
use crate::commands::Context;
use crate::output::{self, EventView, Format, StreamTable, TaskView};
use taskpod_client::config::DEFAULT_TIMEOUT;
use taskpod_client::error::CliError;

/// The first pause before reconnecting; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often in a row the server may skip versions before the watch gives up.
const MAX_GAPS: u32 = 3;

#[derive(Debug, clap::Args)]
#[command(group(ArgGroup::new("target").required(true).args(["id", "filter"])))]
pub struct WatchArgs {
    /// The task to watch (its events until it finishes)
    pub id: Option<String>,
    /// The first version to show [default: the whole history]
    #[arg(long, value_name = "N", conflicts_with = "filter")]
    pub since_version: Option<i64>,
    /// Watches every task an AIP-160 filter matches: the current ones, then each change
    #[arg(long, value_name = "EXPR")]
    pub filter: Option<String>,
    /// With --filter: include each task's payload and description (the FULL view)
    #[arg(long, requires = "filter")]
    pub full: bool,
}

#[derive(Debug, clap::Args)]
pub struct WaitArgs {
    /// The task to wait for
    pub id: String,
}

/// Whether a failed stream is worth resuming: the connection or the server went away,
/// not a refusal.
fn retryable(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable
        | Code::Unknown
        | Code::Cancelled
        | Code::Aborted
        | Code::ResourceExhausted => true,
        // A broken HTTP/2 connection (server killed mid-stream) surfaces as INTERNAL.
        Code::Internal => status.message().starts_with("h2 protocol error"),
        _ => false,
    }
}

/// Whether the server refused a WatchTasks resume token as too old.
fn token_expired(status: &Status) -> bool {
    use tonic_types::StatusExt as _;
    status.code() == Code::FailedPrecondition
        && status
            .get_error_details()
            .error_info()
            .is_some_and(|info| info.reason == "RESUME_TOKEN_EXPIRED")
}

/// Retries with backoff while failures are retryable and the last contact with the
/// server is recent enough.
#[derive(Debug)]
struct Reconnect {
    budget: Duration,
    backoff: Duration,
    failing_since: Option<Instant>,
}

impl Reconnect {
    fn new(budget: Duration) -> Self {
        Self {
            budget,
            backoff: FIRST_BACKOFF,
            failing_since: None,
        }
    }

    /// The server answered: the next failure starts a fresh budget.
    fn contact(&mut self) {
        self.failing_since = None;
        self.backoff = FIRST_BACKOFF;
    }

    /// Waits before the next attempt, or returns the error when it is not retryable or
    /// the budget is spent.
    async fn after_failure(&mut self, status: Status, resume: &str) -> Result<(), CliError> {
        if !retryable(&status) {
            return Err(status.into());
        }
        let what = format!(
            "stream interrupted ({}: {})",
            taskpod_client::error::code_name(status.code()),
            status.message()
        );
        self.pause(status, &what, resume).await
    }

    /// A stream that ended cleanly before its end counts as a failure too (a draining
    /// replica closes its streams).
    async fn after_clean_end(&mut self, resume: &str) -> Result<(), CliError> {
        let status = Status::unavailable("the server kept closing the stream");
        self.pause(status, "the server closed the stream", resume)
            .await
    }

    async fn pause(&mut self, status: Status, what: &str, resume: &str) -> Result<(), CliError> {
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= self.budget {
            return Err(status.into());
        }
        eprintln!("watch: {what}; resuming {resume}");
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        Ok(())
    }
}

/// How a followed task stream ended.
#[derive(Debug)]
pub enum Ended {
    /// After the terminal event (`task_completed`, `task_cancelled`, `task_failed`).
    Terminal,
    /// The task had already finished before the first version asked for.
    AlreadyFinished(Box<v1::Task>),
}

/// Where a task stream stands: the next version to print, so none is printed twice
/// and none is skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    next: i64,
}

/// What to do with one event of the stream.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Already printed (a resumed stream repeated it): skip.
    Duplicate,
    /// Versions are missing before it: resume from the cursor.
    Gap,
    /// The next version: print it.
    Next,
}

impl Cursor {
    fn new(from_version: i64) -> Self {
        Self {
            next: from_version.max(1),
        }
    }

    fn step(&self, version: i64) -> Step {
        match version.cmp(&self.next) {
            std::cmp::Ordering::Less => Step::Duplicate,
            std::cmp::Ordering::Greater => Step::Gap,
            std::cmp::Ordering::Equal => Step::Next,
        }
    }

    fn advance(&mut self, version: i64) {
        self.next = version + 1;
    }
}

/// Follows one task's events from `from_version`, passing each to `on_event` exactly
/// once and in order, across reconnects, until its terminal event.
///
/// # Errors
/// A refusal, a retryable failure that outlasted `budget`, or `on_event`'s error.
pub async fn follow_task(
    ctx: &Context,
    task_id: &str,
    from_version: i64,
    budget: Duration,
    mut on_event: impl FnMut(&v1::Event) -> Result<(), CliError>,
) -> Result<Ended, CliError> {
    let client = &ctx.client;
    let mut cursor = Cursor::new(from_version);
    let mut reconnect = Reconnect::new(budget);
    let mut gaps = 0u32;
    loop {
        let request = client.stream_request(v1::WatchTaskRequest {
            task_id: task_id.to_owned(),
            from_version: cursor.next,
        });
        let mut stream = match client.grpc().watch_task(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                let resume = format!("from version {}", cursor.next);
                reconnect.after_failure(status, &resume).await?;
                continue;
            }
        };
        loop {
            let resume = format!("from version {}", cursor.next);
            match stream.message().await {
                Ok(Some(message)) => {
                    reconnect.contact();
                    let Some(v1::watch_task_response::Kind::Event(event)) = message.kind else {
                        continue;
                    };
                    match cursor.step(event.version) {
                        Step::Duplicate => continue,
                        Step::Gap => {
                            gaps += 1;
                            if gaps > MAX_GAPS {
                                return Err(Status::internal(format!(
                                    "the server skipped from version {} to {} repeatedly",
                                    cursor.next, event.version
                                ))
                                .into());
                            }
                            tracing::warn!(
                                expected = cursor.next,
                                got = event.version,
                                "gap in the stream; resuming"
                            );
                            break;
                        }
                        Step::Next => {
                            gaps = 0;
                            on_event(&event)?;
                            cursor.advance(event.version);
                            if is_terminal_event(&event.r#type) {
                                return Ok(Ended::Terminal);
                            }
                        }
                    }
                }
                Ok(None) => {
                    // The stream ends after the terminal event; ending earlier means the
                    // task finished before our first version, or the server is leaving.
                    let task = read::get_task(ctx, task_id).await;
                    if let Ok(task) = &task
                        && is_terminal_status(task.status)
                        && task.version < cursor.next
                    {
                        return Ok(Ended::AlreadyFinished(Box::new(task.clone())));
                    }
                    // A replica that is going away may answer this read with anything a
                    // dying connection says (UNAVAILABLE, CANCELLED, ...): retry those.
                    if let Err(CliError::Rpc(err)) = &task
                        && !matches!(
                            err.code,
                            Code::Unavailable
                                | Code::DeadlineExceeded
                                | Code::Cancelled
                                | Code::Unknown
                                | Code::Aborted
                                | Code::Internal
                        )
                    {
                        return Err(CliError::Rpc(err.clone()));
                    }
                    reconnect.after_clean_end(&resume).await?;
                    break;
                }
                Err(status) => {
                    reconnect.after_failure(status, &resume).await?;
                    break;
                }
            }
        }
    }
}

/// Runs `task watch`.
///
/// # Errors
/// A refusal (NOT_FOUND, bad filter) or a connection that could not be resumed.
pub async fn watch(ctx: &Context, args: WatchArgs) -> Result<(), CliError> {
    match (args.id, args.filter) {
        (Some(id), _) => watch_one(ctx, &id, args.since_version.unwrap_or(1)).await,
        (None, Some(filter)) => watch_many(ctx, filter, args.full).await,
        (None, None) => Err(CliError::Usage("give a task id or --filter".into())),
    }
}

async fn watch_one(ctx: &Context, id: &str, since: i64) -> Result<(), CliError> {
    let format = ctx.format;
    let wide = format == Format::Wide;
    let (table, header) = StreamTable::events(wide);
    // The header waits for the first row, so a refusal prints nothing on stdout.
    let mut header = Some(header);
    let ended = follow_task(ctx, id, since, ctx.global.call_timeout(), |event| {
        let view = EventView::from(event);
        if let Some(header) = header.take().filter(|_| !format.is_json()) {
            output::emit_line(&header)?;
        }
        match format {
            Format::Table | Format::Wide => output::emit_line(&table.event(&view, wide)),
            Format::Json => output::emit_line(&output::pretty(&view)),
            Format::Jsonl => output::emit_line(&output::compact(&view)),
        }
    })
    .await?;
    if let Ended::AlreadyFinished(task) = ended {
        eprintln!(
            "task {id} had finished ({}) at version {}",
            output::status_name(task.status),
            task.version
        );
    }
    Ok(())
}

/// A WatchTasks message as `jsonl`/`json` prints it: a task as itself, the other
/// kinds under their name.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum ManyLine {
    Task(Box<TaskView>),
    Left { left: Left },
    SnapshotDone { snapshot_done: bool },
}

#[derive(Debug, Serialize)]
struct Left {
    task_id: String,
    version: i64,
}

fn print_row(table: &StreamTable, line: ManyLine, wide: bool) -> Result<(), CliError> {
    match line {
        ManyLine::Task(view) => output::emit_line(&table.task(&view, wide)),
        ManyLine::Left { left } => output::emit_line(&format!(
            "{}   (left the filter at version {})",
            left.task_id, left.version
        )),
        ManyLine::SnapshotDone { .. } => {
            eprintln!("watch: the current tasks are listed; changes follow");
            Ok(())
        }
    }
}

async fn watch_many(ctx: &Context, filter: String, full: bool) -> Result<(), CliError> {
    use v1::watch_tasks_response::Kind;

    let client = &ctx.client;
    let format = ctx.format;
    let wide = format == Format::Wide;
    let (table, header) = StreamTable::tasks(wide);
    let mut header = Some(header);
    let mut print = |line: ManyLine| match format {
        Format::Json => output::emit_line(&output::pretty(&line)),
        Format::Jsonl => output::emit_line(&output::compact(&line)),
        Format::Table | Format::Wide => match line {
            ManyLine::Task(_) | ManyLine::Left { .. } if header.is_some() => {
                if let Some(header) = header.take() {
                    output::emit_line(&header)?;
                }
                print_row(&table, line, wide)
            }
            line => print_row(&table, line, wide),
        },
    };
    let mut reconnect = Reconnect::new(ctx.global.call_timeout());
    let mut resume_token = String::new();
    loop {
        let request = client.stream_request(v1::WatchTasksRequest {
            filter: filter.clone(),
            criteria: None,
            resume_token: resume_token.clone(),
            view: crate::commands::view(full),
        });
        let resume = if resume_token.is_empty() {
            "from the start"
        } else {
            "from the last resume token"
        };
        let mut stream = match client.grpc().watch_tasks(request).await {
            Ok(response) => response.into_inner(),
            Err(status) if !resume_token.is_empty() && token_expired(&status) => {
                // Away longer than a token lives: start over; the new snapshot replaces
                // what was shown.
                eprintln!("taskpod: the resume token expired; watching again from the start");
                resume_token.clear();
                continue;
            }
            Err(status) => {
                reconnect.after_failure(status, resume).await?;
                continue;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(message)) => {
                    reconnect.contact();
                    let mut token = message.resume_token;
                    match message.kind {
                        Some(Kind::Task(task)) => {
                            print(ManyLine::Task(Box::new(TaskView::from(&task))))?
                        }
                        Some(Kind::Left(left)) => print(ManyLine::Left {
                            left: Left {
                                task_id: left.task_id,
                                version: left.version,
                            },
                        })?,
                        Some(Kind::SnapshotDone(_)) => print(ManyLine::SnapshotDone {
                            snapshot_done: true,
                        })?,
                        Some(Kind::Heartbeat(beat)) if token.is_empty() => {
                            token = beat.resume_token;
                        }
                        Some(Kind::Heartbeat(_)) | None => {}
                    }
                    // Saved only after the message was printed: resuming from it never
                    // skips what was not shown.
                    if !token.is_empty() {
                        resume_token = token;
                    }
                }
                Ok(None) => {
                    reconnect.after_clean_end(resume).await?;
                    break;
                }
                Err(status) => {
                    reconnect.after_failure(status, resume).await?;
                    break;
                }
            }
        }
    }
}

/// Runs `task wait`.
///
/// # Errors
/// [`CliError::TaskFailed`] (10), [`CliError::TaskCancelled`] (11),
/// [`CliError::WaitTimedOut`] (12), or the server's refusal.
pub async fn wait(ctx: &Context, args: WaitArgs) -> Result<(), CliError> {
    let id = args.id;
    let waited = async {
        let task = read::get_task(ctx, &id).await?;
        if is_terminal_status(task.status) {
            return Ok(task);
        }
        // Only the ending matters; the versions before it are followed so the wait
        // resumes without a gap after a disconnect.
        let ended = follow_task(ctx, &id, task.version + 1, DEFAULT_TIMEOUT, |_| Ok(())).await?;
        match ended {
            Ended::AlreadyFinished(task) => Ok(*task),
            // The finished task, for its last_error and final fields.
            Ended::Terminal => read::get_task(ctx, &id).await,
        }
    };
    let task = match ctx.global.timeout {
        None => waited.await?,
        Some(limit) => match tokio::time::timeout(limit, waited).await {
            Ok(task) => task?,
            Err(_) => {
                let (status, phase) = match read::get_task(ctx, &id).await {
                    Ok(t) => (output::status_name(t.status), output::phase_name(t.phase)),
                    Err(_) => ("unknown".into(), "unknown".into()),
                };
                return Err(CliError::WaitTimedOut {
                    task_id: id,
                    after: taskpod_client::duration::format(limit),
                    status,
                    phase,
                });
            }
        },
    };
    output::print_task(ctx.format, &task)?;
    match output::status_name(task.status).as_str() {
        "completed" => Ok(()),
        "cancelled" => Err(CliError::TaskCancelled { task_id: id }),
        _ => Err(CliError::TaskFailed {
            task_id: id,
            last_error: if task.last_error.is_empty() {
                "no error recorded".into()
            } else {
                task.last_error
            },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cursor_skips_repeats_and_spots_gaps() {
        let mut c = Cursor::new(0);
        assert_eq!(c.next, 1);
        assert_eq!(c.step(1), Step::Next);
        c.advance(1);
        assert_eq!(c.step(1), Step::Duplicate);
        assert_eq!(c.step(3), Step::Gap);
        assert_eq!(c.step(2), Step::Next);
        c.advance(2);
        assert_eq!(Cursor::new(7).step(7), Step::Next);
    }

    /// A resumed stream that starts over from an older version (a server that ignored
    /// from_version) still prints every version once.
    #[test]
    fn replayed_versions_print_once() {
        let mut c = Cursor::new(1);
        let mut printed = Vec::new();
        for v in [1, 2, 3, /* reconnect */ 2, 3, 4, 5] {
            if c.step(v) == Step::Next {
                printed.push(v);
                c.advance(v);
            }
        }
        assert_eq!(printed, [1, 2, 3, 4, 5]);
    }

    #[test]
    fn only_transport_failures_are_retried() {
        assert!(retryable(&Status::unavailable("gone")));
        assert!(retryable(&Status::unknown("error reading a body")));
        assert!(retryable(&Status::internal(
            "h2 protocol error: stream reset"
        )));
        assert!(!retryable(&Status::internal("boom")));
        assert!(!retryable(&Status::not_found("no such task")));
        assert!(!retryable(&Status::unauthenticated("no token")));
        assert!(!retryable(&Status::invalid_argument("bad filter")));
    }

    #[tokio::test(start_paused = true)]
    async fn reconnects_give_up_after_the_budget() {
        let mut r = Reconnect::new(Duration::from_secs(1));
        let mut attempts = 0;
        let err = loop {
            match r.after_failure(Status::unavailable("down"), "x").await {
                Ok(()) => attempts += 1,
                Err(err) => break err,
            }
        };
        assert_eq!(err.exit_code(), 7);
        // 100 + 200 + 400 + 800 ms: the fifth failure is past one second.
        assert_eq!(attempts, 4);
        r.contact();
        assert!(
            r.after_failure(Status::unavailable("down"), "x")
                .await
                .is_ok()
        );
        assert!(r.after_failure(Status::not_found("t"), "x").await.is_err());
    }
}
