//! How results are printed: `table` (aligned columns), `wide` (more columns), `json`
//! (one pretty document) and `jsonl` (one compact object per task or event per line).
//!
//! The wire types are turned into views first, so JSON field names and the lowercase
//! status and phase spellings (`active`, `spec_clarification`) are defined here once.

use serde::Serialize;
use serde_json::Value;
use taskpod_proto::convert;
use taskpod_proto::v1;

use taskpod_client::error::CliError;
pub use taskpod_client::output::{Format, emit, emit_line};

/// A task as the CLI prints it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TaskView {
    pub task_id: String,
    pub title: String,
    pub description: String,
    pub kind: String,
    pub payload: Value,
    pub metadata: Value,
    pub priority: i32,
    pub status: String,
    pub phase: String,
    pub last_error: String,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
    pub created_by: String,
    pub version: i64,
    pub pod_status: String,
    pub pod_state: String,
    pub pod_node: String,
    pub pod_epoch: i64,
    pub pod_started_at: Option<String>,
    pub partition: i32,
}

/// An event as the CLI prints it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EventView {
    pub task_id: String,
    pub version: i64,
    #[serde(rename = "type")]
    pub kind: String,
    pub data: Value,
    pub actor_id: String,
    pub correlation_id: String,
    pub causation_id: String,
    pub traceparent: String,
    pub epoch: i64,
    pub recorded_at: Option<String>,
}

/// The lowercase name of a status number; `unspecified` for anything else.
pub fn status_name(raw: i32) -> String {
    convert::from_status("status", raw).map_or_else(|_| "unspecified".into(), |s| s.to_string())
}

pub fn phase_name(raw: i32) -> String {
    convert::from_phase("phase", raw).map_or_else(|_| "unspecified".into(), |p| p.to_string())
}

fn pod_status_name(raw: i32) -> String {
    match v1::PodStatus::try_from(raw) {
        Ok(v1::PodStatus::Running) => "running",
        Ok(v1::PodStatus::Stopped) => "stopped",
        _ => "unspecified",
    }
    .into()
}

fn pod_state_name(raw: i32) -> String {
    match v1::PodState::try_from(raw) {
        Ok(v1::PodState::None) => "none",
        Ok(v1::PodState::Starting) => "starting",
        Ok(v1::PodState::Running) => "running",
        Ok(v1::PodState::Stopping) => "stopping",
        _ => "unspecified",
    }
    .into()
}

/// RFC 3339 in UTC with second precision, e.g. `2025-11-25T17:33:00Z`.
pub fn time(t: Option<&prost_types::Timestamp>) -> Option<String> {
    let t = convert::from_timestamp("time", t?).ok()?;
    Some(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

impl From<&v1::Task> for TaskView {
    fn from(t: &v1::Task) -> Self {
        Self {
            task_id: t.task_id.clone(),
            title: t.title.clone(),
            description: t.description.clone(),
            kind: t.kind.clone(),
            payload: t
                .payload
                .as_ref()
                .map_or(Value::Null, convert::value_to_json),
            metadata: t.metadata.as_ref().map_or_else(
                || Value::Object(Default::default()),
                convert::struct_to_json,
            ),
            priority: t.priority,
            status: status_name(t.status),
            phase: phase_name(t.phase),
            last_error: t.last_error.clone(),
            created_at: time(t.created_at.as_ref()),
            updated_at: time(t.updated_at.as_ref()),
            created_by: t.created_by.clone(),
            version: t.version,
            pod_status: pod_status_name(t.pod_status),
            pod_state: pod_state_name(t.pod_state),
            pod_node: t.pod_node.clone(),
            pod_epoch: t.pod_epoch,
            pod_started_at: time(t.pod_started_at.as_ref()),
            partition: t.partition,
        }
    }
}

impl From<&v1::Event> for EventView {
    fn from(e: &v1::Event) -> Self {
        Self {
            task_id: e.task_id.clone(),
            version: e.version,
            kind: e.r#type.clone(),
            data: e.data.as_ref().map_or_else(
                || Value::Object(Default::default()),
                convert::struct_to_json,
            ),
            actor_id: e.actor_id.clone(),
            correlation_id: e.correlation_id.clone(),
            causation_id: e.causation_id.clone(),
            traceparent: e.traceparent.clone(),
            epoch: e.epoch,
            recorded_at: time(e.recorded_at.as_ref()),
        }
    }
}

/// An empty cell reads as `-`, and a cell never breaks a row.
fn cell(text: &str) -> String {
    if text.is_empty() {
        return "-".into();
    }
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Cuts long free text in `table` mode; `wide` and JSON show it whole.
fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

/// Columns padded to their widest cell, three spaces apart, like kubectl.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (c, w)) in row.iter().zip(&widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(c);
            } else {
                line.push_str(c);
                line.push_str(&" ".repeat(w - c.chars().count() + 3));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

const TASK_COLUMNS: [&str; 8] = [
    "ID", "TITLE", "KIND", "STATUS", "PHASE", "POD", "VERSION", "UPDATED",
];
const WIDE_COLUMNS: [&str; 5] = ["PRIORITY", "CREATED_BY", "NODE", "EPOCH", "LAST_ERROR"];

fn task_row(t: &TaskView, wide: bool) -> Vec<String> {
    let mut row = vec![
        t.task_id.clone(),
        cell(&if wide {
            t.title.clone()
        } else {
            clip(&t.title, 40)
        }),
        cell(&t.kind),
        t.status.clone(),
        t.phase.clone(),
        t.pod_state.clone(),
        t.version.to_string(),
        cell(t.updated_at.as_deref().unwrap_or("")),
    ];
    if wide {
        row.extend([
            t.priority.to_string(),
            cell(&t.created_by),
            cell(&t.pod_node),
            t.pod_epoch.to_string(),
            cell(&t.last_error),
        ]);
    }
    row
}

/// Tasks as a table (`table` or `wide`).
pub fn task_table(tasks: &[TaskView], wide: bool) -> String {
    let mut headers: Vec<&str> = TASK_COLUMNS.to_vec();
    if wide {
        headers.extend(WIDE_COLUMNS);
    }
    let rows: Vec<Vec<String>> = tasks.iter().map(|t| task_row(t, wide)).collect();
    table(&headers, &rows)
}

const EVENT_COLUMNS: [&str; 5] = ["VERSION", "TYPE", "ACTOR", "RECORDED", "DATA"];
const WIDE_EVENT_COLUMNS: [&str; 8] = [
    "VERSION",
    "TYPE",
    "ACTOR",
    "RECORDED",
    "EPOCH",
    "CORRELATION",
    "CAUSATION",
    "DATA",
];

fn event_row(e: &EventView, wide: bool) -> Vec<String> {
    let data = if e.data.as_object().is_some_and(|o| o.is_empty()) {
        String::new()
    } else {
        e.data.to_string()
    };
    let mut row = vec![
        e.version.to_string(),
        e.kind.clone(),
        cell(&e.actor_id),
        cell(e.recorded_at.as_deref().unwrap_or("")),
    ];
    if wide {
        row.extend([
            e.epoch.to_string(),
            cell(&e.correlation_id),
            cell(&e.causation_id),
        ]);
    }
    row.push(cell(&data));
    row
}

pub fn event_table(events: &[EventView], wide: bool) -> String {
    let headers: &[&str] = if wide {
        &WIDE_EVENT_COLUMNS
    } else {
        &EVENT_COLUMNS
    };
    let rows: Vec<Vec<String>> = events.iter().map(|e| event_row(e, wide)).collect();
    table(headers, &rows)
}

/// Streams (`task watch`) cannot measure their rows in advance; they use fixed widths
/// wide enough for the usual values.
pub struct StreamTable {
    widths: Vec<usize>,
}

impl StreamTable {
    pub fn events(wide: bool) -> (Self, String) {
        let widths = if wide {
            vec![7, 22, 16, 20, 5, 36, 36]
        } else {
            vec![7, 22, 16, 20]
        };
        let table = Self { widths };
        let headers: &[&str] = if wide {
            &WIDE_EVENT_COLUMNS
        } else {
            &EVENT_COLUMNS
        };
        let header = table.line(&headers.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>());
        (table, header)
    }

    pub fn tasks(wide: bool) -> (Self, String) {
        let mut widths = vec![36, 40, 10, 10, 18, 8, 7, 20];
        let mut headers: Vec<&str> = TASK_COLUMNS.to_vec();
        if wide {
            widths.extend([8, 16, 16, 5]);
            headers.extend(WIDE_COLUMNS);
        }
        let table = Self { widths };
        let header = table.line(&headers.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>());
        (table, header)
    }

    /// One row: every column but the last padded to its width (or one space past a
    /// longer value).
    pub fn line(&self, row: &[String]) -> String {
        let mut line = String::new();
        for (i, c) in row.iter().enumerate() {
            line.push_str(c);
            if i + 1 < row.len() {
                let w = self.widths.get(i).copied().unwrap_or(0);
                let pad = w.saturating_sub(c.chars().count()) + 3;
                line.push_str(&" ".repeat(pad));
            }
        }
        line.trim_end().to_owned()
    }

    pub fn event(&self, e: &EventView, wide: bool) -> String {
        self.line(&event_row(e, wide))
    }

    pub fn task(&self, t: &TaskView, wide: bool) -> String {
        self.line(&task_row(t, wide))
    }
}

/// Pretty JSON (`json`).
pub fn pretty(value: &impl Serialize) -> String {
    // Serialising views (strings, numbers, JSON values) cannot fail.
    serde_json::to_string_pretty(value)
        .unwrap_or_else(|e| format!("{{\"error\": {:?}}}", e.to_string()))
}

/// Compact JSON on one line (`jsonl`).
pub fn compact(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\": {:?}}}", e.to_string()))
}

/// Prints one task in the chosen format.
///
/// # Errors
/// As [`emit`].
pub fn print_task(format: Format, task: &v1::Task) -> Result<(), CliError> {
    let view = TaskView::from(task);
    match format {
        Format::Table => emit(&task_table(&[view], false)),
        Format::Wide => emit(&task_table(&[view], true)),
        Format::Json => emit_line(&pretty(&view)),
        Format::Jsonl => emit_line(&compact(&view)),
    }
}

/// A page of tasks in JSON: `{"tasks": [...], "next_page_token": "..."}`.
#[derive(Debug, Serialize)]
pub struct TaskList {
    pub tasks: Vec<TaskView>,
    pub next_page_token: String,
}

/// Prints a list of tasks in the chosen format.
///
/// # Errors
/// As [`emit`].
pub fn print_tasks(
    format: Format,
    tasks: &[v1::Task],
    next_page_token: &str,
) -> Result<(), CliError> {
    let views: Vec<TaskView> = tasks.iter().map(TaskView::from).collect();
    match format {
        Format::Table => emit(&task_table(&views, false)),
        Format::Wide => emit(&task_table(&views, true)),
        Format::Json => emit_line(&pretty(&TaskList {
            tasks: views,
            next_page_token: next_page_token.to_owned(),
        })),
        Format::Jsonl => {
            let lines: String = views.iter().map(|v| compact(v) + "\n").collect();
            emit(&lines)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskpod_proto::convert::json_to_value;

    pub(crate) fn sample_task() -> v1::Task {
        v1::Task {
            task_id: "0193a5d0-0000-7000-8000-000000000001".into(),
            title: "Write the docs".into(),
            description: "all of them".into(),
            kind: "manual".into(),
            payload: Some(json_to_value(&serde_json::json!({"n": 3}))),
            metadata: None,
            priority: 5,
            status: v1::TaskStatus::Active as i32,
            phase: v1::TaskPhase::SpecClarification as i32,
            last_error: String::new(),
            created_at: Some(prost_types::Timestamp {
                seconds: 1_764_091_980,
                nanos: 5,
            }),
            updated_at: Some(prost_types::Timestamp {
                seconds: 1_764_091_981,
                nanos: 0,
            }),
            created_by: "alice".into(),
            version: 2,
            pod_status: v1::PodStatus::Stopped as i32,
            pod_state: v1::PodState::None as i32,
            pod_node: String::new(),
            pod_epoch: 0,
            pod_started_at: None,
            partition: 17,
        }
    }

    #[test]
    fn statuses_and_phases_print_lowercase() {
        let v = TaskView::from(&sample_task());
        assert_eq!(
            (v.status.as_str(), v.phase.as_str()),
            ("active", "spec_clarification")
        );
        assert_eq!(
            (v.pod_status.as_str(), v.pod_state.as_str()),
            ("stopped", "none")
        );
        assert_eq!(status_name(0), "unspecified");
        assert_eq!(v.updated_at.as_deref(), Some("2025-11-25T17:33:01Z"));
    }

    #[test]
    fn tables_align_their_columns() {
        let task = TaskView::from(&sample_task());
        let mut other = task.clone();
        other.task_id = "x".into();
        other.title = "t".into();
        let text = task_table(&[task, other], false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].starts_with("ID                                     TITLE            KIND")
        );
        let col = |line: &str, word: &str| line.find(word);
        assert_eq!(col(lines[0], "STATUS"), col(lines[1], "active"));
        assert_eq!(col(lines[0], "STATUS"), col(lines[2], "active"));
        assert_eq!(
            col(lines[0], "UPDATED"),
            col(lines[1], "2025-11-25T17:33:01Z")
        );
        assert!(!text.contains("PRIORITY"));
    }

    #[test]
    fn wide_adds_the_pod_and_audit_columns_with_dashes_for_empty() {
        let text = task_table(&[TaskView::from(&sample_task())], true);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].ends_with("PRIORITY   CREATED_BY   NODE   EPOCH   LAST_ERROR"),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].ends_with("5          alice        -      0       -"),
            "{}",
            lines[1]
        );
    }

    #[test]
    fn control_characters_never_break_a_row() {
        let mut t = sample_task();
        t.title = "two\nlines".into();
        let text = task_table(&[TaskView::from(&t)], false);
        assert_eq!(text.lines().count(), 2);
        assert!(text.contains("two lines"));
    }

    #[test]
    fn json_views_use_names_and_lowercase_enums() {
        let v = TaskView::from(&sample_task());
        let json: Value = serde_json::from_str(&compact(&v)).unwrap();
        assert_eq!(json["status"], "active");
        assert_eq!(json["payload"], serde_json::json!({"n": 3}));
        assert_eq!(json["metadata"], serde_json::json!({}));
        let list = TaskList {
            tasks: vec![v],
            next_page_token: "abc".into(),
        };
        let json: Value = serde_json::from_str(&pretty(&list)).unwrap();
        assert_eq!(json["next_page_token"], "abc");
        assert_eq!(json["tasks"][0]["phase"], "spec_clarification");
    }

    #[test]
    fn events_show_their_data_compactly() {
        let e = v1::Event {
            task_id: "t".into(),
            version: 3,
            r#type: "task_cancelled".into(),
            data: taskpod_proto::convert::json_to_struct(&serde_json::json!({"reason": "done"})),
            actor_id: "bob".into(),
            ..Default::default()
        };
        let view = EventView::from(&e);
        let text = event_table(std::slice::from_ref(&view), false);
        assert!(
            text.lines()
                .nth(1)
                .unwrap()
                .ends_with(r#"{"reason":"done"}"#),
            "{text}"
        );
        let json: Value = serde_json::from_str(&compact(&view)).unwrap();
        assert_eq!(json["type"], "task_cancelled");
        let (stream, header) = StreamTable::events(false);
        assert!(header.starts_with("VERSION   TYPE"));
        assert!(
            stream
                .event(&view, false)
                .starts_with("3         task_cancelled       ")
        );
    }
}
