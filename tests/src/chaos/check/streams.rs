//! Each task's stream, head and listing row agree:
//! - `versions-contiguous`: versions are 1..N, no gap, no repeat;
//! - `head-version`: the head exists and its version is N;
//! - `row-agrees-with-head`: the listing row's status, phase and last_error are the
//!   head's;
//! - `stream-agrees-with-head`: the stream starts with `task_created`; a terminal head
//!   has exactly one terminal event, of its status, with its phase, and after it only
//!   pod acknowledgements (`pod_stopped`, `pod_crashed`); a live head has none;
//! - `stream-without-task`: no events belong to a task that has no row.

use super::oracle::EventRow;
use super::{Input, Violation};

const TERMINAL: [&str; 3] = ["completed", "cancelled", "failed"];

fn terminal_status(event: &EventRow) -> Option<&'static str> {
    match event.kind.as_str() {
        "task_completed" => Some("completed"),
        "task_cancelled" => Some("cancelled"),
        "task_failed" => Some("failed"),
        _ => None,
    }
}

pub fn check(input: &Input<'_>) -> Vec<Violation> {
    let snapshot = input.snapshot;
    let mut out = Vec::new();
    for (id, task) in &snapshot.tasks {
        let events = snapshot.events_of(id);
        let v =
            |invariant, summary: String| Violation::new(invariant, Some(id.to_string()), summary);

        if let Some((i, e)) = events
            .iter()
            .enumerate()
            .find(|(i, e)| e.version != *i as i64 + 1)
        {
            out.push(
                v(
                    "versions-contiguous",
                    format!(
                        "event #{} has version {}, expected {}",
                        i + 1,
                        e.version,
                        i + 1
                    ),
                )
                .with(
                    events
                        .iter()
                        .map(|e| format!("  {}", snapshot.event_line(e))),
                ),
            );
        }
        let last = events.last().map_or(0, |e| e.version);
        let Some(head) = snapshot.heads.get(id) else {
            out.push(v("head-version", "the task has no head row".into()).with(snapshot.rows(id)));
            continue;
        };
        if head.version != last {
            out.push(
                v(
                    "head-version",
                    format!(
                        "head version {} but the stream ends at {last}",
                        head.version
                    ),
                )
                .with(snapshot.rows(id))
                .with(snapshot.tail(id, 4)),
            );
        }
        if (&task.status, &task.phase, &task.last_error)
            != (&head.status, &head.phase, &head.last_error)
        {
            out.push(
                v(
                    "row-agrees-with-head",
                    "the listing row and the head disagree".into(),
                )
                .with(snapshot.rows(id))
                .with(snapshot.tail(id, 4)),
            );
        }

        if events.first().is_none_or(|e| e.kind != "task_created") {
            out.push(
                v(
                    "stream-agrees-with-head",
                    "the stream does not start with task_created".into(),
                )
                .with(snapshot.tail(id, 3)),
            );
        }
        let terminals: Vec<(usize, &EventRow)> = events
            .iter()
            .enumerate()
            .filter(|(_, e)| terminal_status(e).is_some())
            .collect();
        let head_terminal = TERMINAL.contains(&head.status.as_str());
        let problem = match (head_terminal, terminals.as_slice()) {
            (false, []) => None,
            (false, _) => Some(format!(
                "status {} but the stream has a terminal event",
                head.status
            )),
            (true, []) => Some(format!("status {} but no terminal event", head.status)),
            (true, [(at, event)]) => {
                let after: Vec<&str> = events[at + 1..]
                    .iter()
                    .map(|e| e.kind.as_str())
                    .filter(|k| !matches!(*k, "pod_stopped" | "pod_crashed"))
                    .collect();
                if terminal_status(event) != Some(head.status.as_str()) {
                    Some(format!(
                        "status {} but the stream ended with {}",
                        head.status, event.kind
                    ))
                } else if head.phase != head.status {
                    Some(format!("status {} with phase {}", head.status, head.phase))
                } else if !after.is_empty() {
                    Some(format!("{after:?} written after {}", event.kind))
                } else {
                    None
                }
            }
            (true, many) => Some(format!("{} terminal events", many.len())),
        };
        if let Some(problem) = problem {
            out.push(
                v("stream-agrees-with-head", problem)
                    .with(snapshot.rows(id))
                    .with(
                        events
                            .iter()
                            .map(|e| format!("  {}", snapshot.event_line(e))),
                    ),
            );
        }
    }
    for (stream, events) in &snapshot.events {
        if !snapshot.tasks.contains_key(stream) {
            out.push(
                Violation::new(
                    "stream-without-task",
                    Some(stream.to_string()),
                    format!("{} events but no tasks row", events.len()),
                )
                .with(snapshot.tail(stream, 3)),
            );
        }
    }
    out
}
