//! Watch streams opened before a cut, read through it, and held to the store after it
//! (issue 19: "watch streams opened before the cut deliver every change in order after
//! it"):
//! - `watch-task-complete`: a WatchTask stream delivers versions 1..t exactly once and
//!   in order, t the task's terminal event, each with the stored event's type;
//! - `watch-tasks-in-order`: a WatchTasks stream reports each task's versions in
//!   order, and every status or phase change the store recorded after the stream
//!   first showed the task (none folded away), ending at the task's last version. A
//!   version shown twice with the same state is counted ([`TasksWatch::repeats`]),
//!   not a violation: `docs/api.md` promises WatchTasks order and no skipped change,
//!   not once-only delivery (WatchTask does promise exactly once);
//! - `watch-stream-broke`: on a replica the cut did not touch, no stream ends early or
//!   fails (on a cut replica a stream may fail with UNAVAILABLE; the client resumes,
//!   from the next version or the last resume token, and the checks above still hold).
//!
//! The readers resume by themselves, so a broken stream is counted, not fatal.

use std::collections::BTreeMap;
use std::str::FromStr as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use taskpod_core::domain::{TaskId, TaskState};
use taskpod_core::store::Store;
use taskpod_proto::v1::{self, task_service_client::TaskServiceClient};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::chaos::check::Violation;

const TERMINAL: [&str; 3] = ["task_completed", "task_cancelled", "task_failed"];
/// Pause before a reader opens its stream again.
const RESUME_AFTER: Duration = Duration::from_millis(250);

/// What one WatchTask reader got.
#[derive(Clone, Debug, Default)]
pub struct TaskWatch {
    pub task: String,
    /// `(version, type)` in arrival order.
    pub events: Vec<(i64, String)>,
    /// How often the stream failed or ended early and was opened again, and why.
    pub breaks: Vec<String>,
    /// It reached the terminal event.
    pub finished: bool,
}

/// Reads WatchTask of `task` from version 1 until its terminal event, resuming after
/// a break from the next version, until `stop`.
pub fn watch_task(
    client: TaskServiceClient<Channel>,
    task: String,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<TaskWatch> {
    tokio::spawn(async move {
        let mut out = TaskWatch {
            task: task.clone(),
            ..TaskWatch::default()
        };
        let mut next = 1;
        while !stop.is_cancelled() {
            let mut client = client.clone();
            let request = v1::WatchTaskRequest {
                task_id: task.clone(),
                from_version: next,
            };
            let mut stream = tokio::select! {
                () = stop.cancelled() => break,
                opened = client.watch_task(request) => match opened {
                    Ok(s) => s.into_inner(),
                    Err(status) => {
                        out.breaks.push(format!("open: {:?} {}", status.code(), status.message()));
                        tokio::time::sleep(RESUME_AFTER).await;
                        continue;
                    }
                },
            };
            loop {
                let message = tokio::select! {
                    () = stop.cancelled() => return out,
                    m = stream.message() => m,
                };
                match message {
                    Ok(Some(v1::WatchTaskResponse {
                        kind: Some(v1::watch_task_response::Kind::Event(e)),
                    })) => {
                        next = e.version + 1;
                        let terminal = TERMINAL.contains(&e.r#type.as_str());
                        out.events.push((e.version, e.r#type));
                        if terminal {
                            out.finished = true;
                            return out;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        out.breaks.push("ended before the terminal event".into());
                        break;
                    }
                    Err(status) => {
                        out.breaks
                            .push(format!("{:?} {}", status.code(), status.message()));
                        break;
                    }
                }
            }
            tokio::time::sleep(RESUME_AFTER).await;
        }
        out
    })
}

/// One WatchTasks message about a task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub task: Uuid,
    pub version: i64,
    pub status: i32,
    pub phase: i32,
    /// Part of the initial listing.
    pub listed: bool,
    /// The first message after the stream was opened again (it may skip changes).
    pub after_resume: bool,
}

/// What one WatchTasks reader got.
#[derive(Clone, Debug, Default)]
pub struct TasksWatch {
    pub seen: Vec<Seen>,
    pub breaks: Vec<String>,
}

impl TasksWatch {
    /// How many messages repeated the version the stream had just shown of that task.
    pub fn repeats(&self) -> usize {
        let mut last: BTreeMap<Uuid, i64> = BTreeMap::new();
        self.seen
            .iter()
            .filter(|s| last.insert(s.task, s.version) == Some(s.version))
            .count()
    }

    /// The last version shown of each task.
    pub fn last_versions(&self) -> BTreeMap<Uuid, i64> {
        self.seen.iter().map(|s| (s.task, s.version)).collect()
    }
}

/// A WatchTasks reader (no filter) running until told to stop, resuming after a break
/// from the last resume token.
#[derive(Debug)]
pub struct TasksReader {
    listed: CancellationToken,
    progress: Arc<Mutex<BTreeMap<Uuid, i64>>>,
    task: tokio::task::JoinHandle<TasksWatch>,
}

impl TasksReader {
    pub fn start(client: TaskServiceClient<Channel>, stop: CancellationToken) -> Self {
        let listed = CancellationToken::new();
        let progress = Arc::new(Mutex::new(BTreeMap::new()));
        let task = tokio::spawn(read_tasks(
            client,
            listed.clone(),
            Arc::clone(&progress),
            stop,
        ));
        Self {
            listed,
            progress,
            task,
        }
    }

    /// Resolves once the initial listing is done.
    pub async fn listed(&self) {
        self.listed.cancelled().await;
    }

    /// The last version shown of each task so far.
    pub fn progress(&self) -> BTreeMap<Uuid, i64> {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Everything it read (stop it first, with its token).
    pub async fn finish(self) -> TasksWatch {
        self.task.await.unwrap_or_default()
    }
}

async fn read_tasks(
    client: TaskServiceClient<Channel>,
    ready: CancellationToken,
    progress: Arc<Mutex<BTreeMap<Uuid, i64>>>,
    stop: CancellationToken,
) -> TasksWatch {
    let mut out = TasksWatch::default();
    let mut token = String::new();
    let mut resumed: std::collections::BTreeSet<Uuid> = Default::default();
    let mut opened_once = false;
    while !stop.is_cancelled() {
        let mut client = client.clone();
        let request = v1::WatchTasksRequest {
            resume_token: token.clone(),
            ..Default::default()
        };
        let mut stream = tokio::select! {
            () = stop.cancelled() => break,
            opened = client.watch_tasks(request) => match opened {
                Ok(s) => s.into_inner(),
                Err(status) => {
                    out.breaks.push(format!("open: {:?} {}", status.code(), status.message()));
                    tokio::time::sleep(RESUME_AFTER).await;
                    continue;
                }
            },
        };
        let after_resume = opened_once;
        opened_once = true;
        resumed.clear();
        let mut listing = !after_resume;
        loop {
            let message = tokio::select! {
                () = stop.cancelled() => return out,
                m = stream.message() => m,
            };
            match message {
                Ok(Some(m)) => {
                    if !m.resume_token.is_empty() {
                        token = m.resume_token.clone();
                    }
                    match m.kind {
                        Some(v1::watch_tasks_response::Kind::Task(t)) => {
                            let Ok(task) = Uuid::parse_str(&t.task_id) else {
                                continue;
                            };
                            progress
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(task, t.version);
                            out.seen.push(Seen {
                                task,
                                version: t.version,
                                status: t.status,
                                phase: t.phase,
                                listed: listing,
                                after_resume: after_resume && resumed.insert(task),
                            });
                        }
                        Some(v1::watch_tasks_response::Kind::SnapshotDone(_)) => {
                            listing = false;
                            ready.cancel();
                        }
                        _ => {}
                    }
                }
                Ok(None) => {
                    out.breaks.push("ended".into());
                    break;
                }
                Err(status) => {
                    out.breaks
                        .push(format!("{:?} {}", status.code(), status.message()));
                    break;
                }
            }
        }
        if token.is_empty() {
            // Broken before its first token: start over with a fresh listing.
            opened_once = false;
        }
        tokio::time::sleep(RESUME_AFTER).await;
    }
    out
}

/// Each task's `(status, phase)` after every version, as the proto enums, from its
/// stored stream.
///
/// # Errors
/// When the store cannot be read or a stream does not replay.
pub async fn stored_states(
    store: &Store,
    tasks: impl IntoIterator<Item = Uuid>,
) -> anyhow::Result<BTreeMap<Uuid, Vec<(i64, i32, i32, String)>>> {
    let mut out = BTreeMap::new();
    for task in tasks {
        let id = TaskId::from_str(&task.to_string())?;
        let recorded = store.read_stream(id, 1, 100_000).await?;
        let events: Vec<_> = recorded.iter().map(|r| r.event.clone()).collect();
        let mut states = Vec::with_capacity(events.len());
        for (i, r) in recorded.iter().enumerate() {
            let state = TaskState::replay(id, &events[..=i])?;
            states.push((
                r.version,
                taskpod_proto::convert::status(state.status) as i32,
                taskpod_proto::convert::phase(state.phase) as i32,
                r.event.type_name().to_owned(),
            ));
        }
        out.insert(task, states);
    }
    Ok(out)
}

/// `watch-task-complete` for one reader; `strict`: a break is itself a violation.
pub fn check_task_watch(
    watch: &TaskWatch,
    stored: Option<&Vec<(i64, i32, i32, String)>>,
    replica: &str,
    strict: bool,
) -> Vec<Violation> {
    let mut out = Vec::new();
    let v =
        |invariant, summary: String| Violation::new(invariant, Some(watch.task.clone()), summary);
    let got: Vec<String> = watch
        .events
        .iter()
        .map(|(v, t)| format!("v{v} {t}"))
        .collect();
    let stored = stored.cloned().unwrap_or_default();
    let terminal_at = stored
        .iter()
        .find(|(_, _, _, kind)| TERMINAL.contains(&kind.as_str()))
        .map(|(v, ..)| *v);
    let expected: Vec<String> = stored
        .iter()
        .take_while(|(v, ..)| terminal_at.is_none_or(|t| *v <= t))
        .map(|(v, _, _, t)| format!("v{v} {t}"))
        .collect();
    if !watch.finished || got != expected {
        out.push(
            v(
                "watch-task-complete",
                format!(
                    "WatchTask on {replica} delivered {} event(s){}, the store has {} up to the terminal one",
                    got.len(),
                    if watch.finished { "" } else { " and never the terminal one" },
                    expected.len()
                ),
            )
            .with([format!("  got:      {}", got.join(", "))])
            .with([format!("  expected: {}", expected.join(", "))])
            .with(watch.breaks.iter().map(|b| format!("  break: {b}"))),
        );
    }
    if strict && !watch.breaks.is_empty() {
        out.push(
            v(
                "watch-stream-broke",
                format!(
                    "WatchTask on {replica} (not cut) broke {} time(s)",
                    watch.breaks.len()
                ),
            )
            .with(watch.breaks.iter().map(|b| format!("  {b}"))),
        );
    }
    out
}

/// `watch-tasks-in-order` for one reader, over every task it showed; `strict`: a break
/// is itself a violation.
pub fn check_tasks_watch(
    watch: &TasksWatch,
    stored: &BTreeMap<Uuid, Vec<(i64, i32, i32, String)>>,
    replica: &str,
    strict: bool,
) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut by_task: BTreeMap<Uuid, Vec<&Seen>> = BTreeMap::new();
    for seen in &watch.seen {
        by_task.entry(seen.task).or_default().push(seen);
    }
    for (task, seen) in by_task {
        let states = stored.get(&task).cloned().unwrap_or_default();
        let v = |summary: String| {
            Violation::new("watch-tasks-in-order", Some(task.to_string()), summary)
                .with([format!(
                    "  seen: {}",
                    seen.iter()
                        .map(|s| format!(
                            "v{}{} {}/{}",
                            s.version,
                            if s.after_resume { "(resumed)" } else { "" },
                            s.status,
                            s.phase
                        ))
                        .collect::<Vec<_>>()
                        .join(", ")
                )])
                .with([format!(
                    "  stored: {}",
                    states
                        .iter()
                        .map(|(v, s, p, t)| format!("v{v} {t} {s}/{p}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )])
        };
        // The same version again (the same state) is a repeat, not a step back: the
        // contract promises order and no missing change, not once-only delivery.
        if let Some(w) = seen.windows(2).find(|w| {
            w[1].version < w[0].version
                || (w[1].version == w[0].version
                    && (w[1].status, w[1].phase) != (w[0].status, w[0].phase))
        }) {
            out.push(v(format!(
                "on {replica}: v{} after v{}",
                w[1].version, w[0].version
            )));
            continue;
        }
        // Each message as the store had the task at that version.
        if let Some(s) = seen.iter().find(|s| {
            !states
                .iter()
                .any(|(v, st, ph, _)| *v == s.version && *st == s.status && *ph == s.phase)
        }) {
            out.push(v(format!(
                "on {replica}: v{} shown as {}/{}, not as stored",
                s.version, s.status, s.phase
            )));
            continue;
        }
        // Every change after the first version shown, each segment since a resume on
        // its own (a resumed stream starts from the current state).
        let mut segments: Vec<Vec<&Seen>> = Vec::new();
        for s in &seen {
            if s.after_resume || segments.is_empty() {
                segments.push(Vec::new());
            }
            if let Some(last) = segments.last_mut() {
                last.push(s);
            }
        }
        for (i, segment) in segments.iter().enumerate() {
            let (Some(first), Some(last)) = (segment.first(), segment.last()) else {
                continue;
            };
            // Up to the last version it showed: a break may lose the changes after it
            // (the resumed stream starts from the current state).
            let shown: Vec<(i32, i32)> = collapse(segment.iter().map(|s| (s.status, s.phase)));
            let expected: Vec<(i32, i32)> = collapse(
                states
                    .iter()
                    .filter(|(v, ..)| *v >= first.version && *v <= last.version)
                    .map(|(_, s, p, _)| (*s, *p)),
            );
            let ends_at_last =
                i + 1 < segments.len() || states.last().is_none_or(|(v, ..)| *v == last.version);
            if shown != expected || !ends_at_last {
                out.push(v(format!(
                    "on {replica}: status/phase changes {shown:?} from v{} but the store has {expected:?}{}",
                    first.version,
                    if ends_at_last {
                        String::new()
                    } else {
                        format!(
                            "; the stream stopped at v{} of {}",
                            last.version,
                            states.last().map_or(0, |(v, ..)| *v)
                        )
                    }
                )));
            }
        }
    }
    if strict && !watch.breaks.is_empty() {
        out.push(
            Violation::new(
                "watch-stream-broke",
                None,
                format!(
                    "WatchTasks on {replica} (not cut) broke {} time(s)",
                    watch.breaks.len()
                ),
            )
            .with(watch.breaks.iter().map(|b| format!("  {b}"))),
        );
    }
    out
}

/// Consecutive repeats folded.
fn collapse(items: impl Iterator<Item = (i32, i32)>) -> Vec<(i32, i32)> {
    let mut out: Vec<(i32, i32)> = Vec::new();
    for item in items {
        if out.last() != Some(&item) {
            out.push(item);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(task: Uuid, version: i64, status: i32, phase: i32) -> Seen {
        Seen {
            task,
            version,
            status,
            phase,
            listed: false,
            after_resume: false,
        }
    }

    fn stored(task: Uuid) -> BTreeMap<Uuid, Vec<(i64, i32, i32, String)>> {
        let rows = vec![
            (1, 2, 1, "task_created".to_owned()),
            (2, 2, 1, "pod_started".to_owned()),
            (3, 2, 2, "phase_changed".to_owned()),
            (4, 2, 3, "phase_changed".to_owned()),
            (5, 3, 5, "task_completed".to_owned()),
            (6, 3, 5, "pod_stopped".to_owned()),
        ];
        [(task, rows)].into()
    }

    #[test]
    fn every_change_in_order_passes_and_a_folded_one_does_not() {
        let t = Uuid::new_v4();
        let ok = TasksWatch {
            seen: vec![
                seen(t, 1, 2, 1),
                seen(t, 3, 2, 2),
                seen(t, 4, 2, 3),
                seen(t, 5, 3, 5),
                seen(t, 6, 3, 5),
            ],
            breaks: vec![],
        };
        assert!(check_tasks_watch(&ok, &stored(t), "api1", true).is_empty());
        let folded = TasksWatch {
            seen: vec![seen(t, 1, 2, 1), seen(t, 4, 2, 3), seen(t, 6, 3, 5)],
            breaks: vec![],
        };
        let found = check_tasks_watch(&folded, &stored(t), "api1", true);
        assert_eq!(found.len(), 1, "{found:?}");
        let backwards = TasksWatch {
            seen: vec![seen(t, 3, 2, 2), seen(t, 2, 2, 1)],
            breaks: vec!["x".into()],
        };
        let found = check_tasks_watch(&backwards, &stored(t), "api1", true);
        assert_eq!(
            found.iter().map(|v| v.invariant).collect::<Vec<_>>(),
            ["watch-tasks-in-order", "watch-stream-broke"]
        );
    }

    #[test]
    fn a_resumed_stream_may_start_from_the_current_state() {
        let t = Uuid::new_v4();
        let mut resumed = seen(t, 5, 3, 5);
        resumed.after_resume = true;
        let watch = TasksWatch {
            seen: vec![
                seen(t, 1, 2, 1),
                seen(t, 3, 2, 2),
                resumed,
                seen(t, 6, 3, 5),
            ],
            breaks: vec!["Unavailable".into()],
        };
        assert!(check_tasks_watch(&watch, &stored(t), "api2", false).is_empty());
    }

    #[test]
    fn a_task_watch_must_reach_the_terminal_event_without_gaps() {
        let t = Uuid::new_v4();
        let rows = stored(t).remove(&t);
        let all = TaskWatch {
            task: t.to_string(),
            events: rows
                .iter()
                .flatten()
                .take(5)
                .map(|(v, _, _, k)| (*v, k.clone()))
                .collect(),
            breaks: vec![],
            finished: true,
        };
        assert!(check_task_watch(&all, rows.as_ref(), "api1", true).is_empty());
        let mut gap = all.clone();
        gap.events.remove(2);
        assert_eq!(check_task_watch(&gap, rows.as_ref(), "api1", true).len(), 1);
    }
}
