//! Rows as Postgres returns them, and their conversion into domain types.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::errors::corrupt;
use crate::domain::{NodeId, PodInfo, PodState, Task, TaskId, TaskState};
use crate::error::Error;

/// The columns [`StateRow`] reads, from `task_heads h JOIN tasks t`. A macro so that
/// statements are `concat!`ed at compile time.
macro_rules! state_columns {
    () => {
        "t.task_id, t.kind, t.priority, h.status, h.phase, h.last_error, h.version, \
         h.pod_epoch, h.pod_state, h.owner_node, h.pod_started_at"
    };
}
pub(crate) use state_columns;

/// The columns [`TaskRow`] reads, from `tasks t JOIN task_heads h`.
macro_rules! task_columns {
    () => {
        "t.task_id, t.title, t.description, t.kind, t.payload, t.metadata, t.priority, \
         t.partition, t.status, t.phase, t.last_error, t.created_at, t.updated_at, \
         t.created_by, h.version, h.pod_epoch, h.pod_state, h.owner_node, h.pod_started_at"
    };
}
pub(crate) use task_columns;

/// [`task_columns!`] without the payload and description (a BASIC view): an empty
/// description and a JSON null in their places, so rows decode the same way.
macro_rules! task_columns_basic {
    () => {
        "t.task_id, t.title, ''::text, t.kind, 'null'::jsonb, t.metadata, t.priority, \
         t.partition, t.status, t.phase, t.last_error, t.created_at, t.updated_at, \
         t.created_by, h.version, h.pod_epoch, h.pod_state, h.owner_node, h.pod_started_at"
    };
}
pub(crate) use task_columns_basic;

#[derive(sqlx::FromRow)]
pub(crate) struct StateRow {
    task_id: Uuid,
    kind: String,
    priority: i32,
    status: String,
    phase: String,
    last_error: Option<String>,
    version: i64,
    pod_epoch: i64,
    pod_state: String,
    owner_node: Option<Uuid>,
    pod_started_at: Option<DateTime<Utc>>,
}

impl TryFrom<StateRow> for TaskState {
    type Error = Error;

    fn try_from(r: StateRow) -> Result<Self, Error> {
        Ok(TaskState {
            task_id: TaskId(r.task_id),
            kind: r.kind,
            priority: r.priority,
            status: r.status.parse().map_err(corrupt)?,
            phase: r.phase.parse().map_err(corrupt)?,
            version: r.version,
            last_error: r.last_error,
            pod_epoch: r.pod_epoch,
            pod_state: r.pod_state.parse().map_err(corrupt)?,
            owner_node: r.owner_node.map(NodeId),
            pod_started_at: r.pod_started_at,
        })
    }
}

/// Decoded by position, not by name: a page of 1000 rows is 19,000 values, and looking
/// each column up by name was the largest single cost of ListTasks in the API (`perf`:
/// sqlx's name index and its checks, about a tenth of the API's CPU). Every statement
/// that reads a `TaskRow` selects [`task_columns!`] first, in this order; the types are
/// still checked.
pub(crate) struct TaskRow {
    task_id: Uuid,
    title: String,
    description: String,
    kind: String,
    payload: serde_json::Value,
    metadata: serde_json::Value,
    priority: i32,
    partition: i32,
    status: String,
    phase: String,
    last_error: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    created_by: String,
    version: i64,
    pod_epoch: i64,
    pod_state: String,
    owner_node: Option<Uuid>,
    pod_started_at: Option<DateTime<Utc>>,
}

impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for TaskRow {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row as _;
        Ok(TaskRow {
            task_id: row.try_get(0)?,
            title: row.try_get(1)?,
            description: row.try_get(2)?,
            kind: row.try_get(3)?,
            payload: row.try_get(4)?,
            metadata: row.try_get(5)?,
            priority: row.try_get(6)?,
            partition: row.try_get(7)?,
            status: row.try_get(8)?,
            phase: row.try_get(9)?,
            last_error: row.try_get(10)?,
            created_at: row.try_get(11)?,
            updated_at: row.try_get(12)?,
            created_by: row.try_get(13)?,
            version: row.try_get(14)?,
            pod_epoch: row.try_get(15)?,
            pod_state: row.try_get(16)?,
            owner_node: row.try_get(17)?,
            pod_started_at: row.try_get(18)?,
        })
    }
}

impl TaskRow {
    /// The state model's view of the same row (the head's fields).
    pub(crate) fn state(&self) -> Result<TaskState, Error> {
        Ok(TaskState {
            task_id: TaskId(self.task_id),
            kind: self.kind.clone(),
            priority: self.priority,
            status: self.status.parse().map_err(corrupt)?,
            phase: self.phase.parse().map_err(corrupt)?,
            version: self.version,
            last_error: self.last_error.clone(),
            pod_epoch: self.pod_epoch,
            pod_state: self.pod_state.parse().map_err(corrupt)?,
            owner_node: self.owner_node.map(NodeId),
            pod_started_at: self.pod_started_at,
        })
    }
}

impl TryFrom<TaskRow> for Task {
    type Error = Error;

    fn try_from(r: TaskRow) -> Result<Self, Error> {
        let pod_state: PodState = r.pod_state.parse().map_err(corrupt)?;
        let pod = (pod_state != PodState::None).then(|| PodInfo {
            state: pod_state,
            epoch: r.pod_epoch,
            node: r.owner_node.map(NodeId),
            started_at: r.pod_started_at,
        });
        Ok(Task {
            task_id: TaskId(r.task_id),
            title: r.title,
            description: r.description,
            kind: r.kind,
            payload: r.payload,
            metadata: r.metadata,
            priority: r.priority,
            partition: r.partition,
            status: r.status.parse().map_err(corrupt)?,
            phase: r.phase.parse().map_err(corrupt)?,
            last_error: r.last_error,
            created_at: r.created_at,
            updated_at: r.updated_at,
            created_by: r.created_by,
            version: r.version,
            pod,
        })
    }
}
