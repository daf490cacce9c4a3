//! A task as callers create it and as they read it back.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::ids::{NodeId, TaskId};
use super::status::{Phase, PodState, Status};

/// What CreateTask asks for. Validated by [`super::validation::validate_new_task`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewTask {
    pub title: String,
    pub description: String,
    /// Which handler runs the task's pod (`manual`, `sleep`, `exec`, ...).
    pub kind: String,
    /// Input for the handler, opaque to taskpod.
    pub payload: serde_json::Value,
    /// Higher runs first when handler slots are scarce.
    pub priority: i32,
    /// Caller-defined labels; a JSON object.
    pub metadata: serde_json::Value,
    /// Request a pod in the same transaction as the creation.
    pub auto_start: bool,
}

impl NewTask {
    /// A task with the given title and kind and every other field at its default.
    pub fn new(title: impl Into<String>, kind: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            description: String::new(),
            kind: kind.into(),
            payload: serde_json::Value::Null,
            priority: 0,
            metadata: serde_json::Value::Object(Default::default()),
            auto_start: false,
        }
    }
}

/// The pod fields of a task, present while a pod is minted or running.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PodInfo {
    pub state: PodState,
    pub epoch: i64,
    pub node: Option<NodeId>,
    pub started_at: Option<DateTime<Utc>>,
}

/// A task as GetTask and ListTasks return it: the listing row plus the head.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub task_id: TaskId,
    pub title: String,
    pub description: String,
    pub kind: String,
    pub payload: serde_json::Value,
    pub metadata: serde_json::Value,
    pub priority: i32,
    pub partition: i32,
    pub status: Status,
    pub phase: Phase,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    /// The last lifecycle change (status, phase or last_error), not the last event.
    pub updated_at: DateTime<Utc>,
    pub created_by: String,
    pub version: i64,
    /// `None` when no pod is minted or running.
    pub pod: Option<PodInfo>,
}
