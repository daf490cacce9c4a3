//! The status bus over Redis pub/sub: hints that something changed, never the log.
//!
//! Redis pub/sub is at-most-once (a message is gone on any disconnect, and a slow
//! subscriber is cut off), so every reader also has a path to Postgres: workers run a
//! periodic check and one after every reconnect; watchers backfill from the store. A
//! writer publishes after its commit; a failed publish is counted and logged, never an
//! error for the write (Redis down: writes keep working).
//!
//! Layout:
//! - [`channels`]: channel names;
//! - [`TaskUpdate`]: what is published;
//! - [`publisher`]: pipelined, best-effort publishing;
//! - [`subscriber`]: one reconnecting subscription with a changeable channel set.

pub mod publisher;
pub mod subscriber;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::domain::partition::partition_of;
use chrono::{DateTime, Utc};

use crate::domain::{NewTask, Phase, Status, Task, TaskId, TaskState};
use crate::store::Secret;

pub use publisher::Publisher;
pub use subscriber::{BusEvent, Subscription};

/// Channel names.
pub mod channels {
    use crate::domain::TaskId;

    /// Every change, for WatchTasks.
    pub const TASKS: &str = "tasks";

    /// One task's changes, for WatchTask.
    pub fn task(id: TaskId) -> String {
        format!("task:{id}")
    }

    /// The changes of a partition's tasks: the owner's wake-up.
    pub fn partition(partition: i32) -> String {
        format!("partition:{partition}")
    }
}

/// Where Redis is. Without a URL there is no bus: readers fall back to polling.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct BusSettings {
    /// `redis://host:port`; empty disables the bus.
    pub url: Secret,
    /// How long a connect or a publish may take before it counts as failed.
    pub timeout_ms: u64,
    /// Test hook: publish nothing, as if Redis dropped every message (readers must
    /// repair from the store). Never set it in production.
    pub drop_publishes: bool,
}

impl BusSettings {
    pub fn with_url(url: impl Into<String>) -> Self {
        Self {
            url: Secret::new(url),
            timeout_ms: 1_000,
            drop_publishes: false,
        }
    }

    pub fn enabled(&self) -> bool {
        !self.url.expose().is_empty()
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(if self.timeout_ms == 0 {
            1_000
        } else {
            self.timeout_ms
        })
    }
}

/// A committed change, as published: every field a WatchTasks filter can name, plus
/// the version and epoch a reader needs to tell what it missed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskUpdate {
    pub task_id: TaskId,
    pub version: i64,
    pub status: Status,
    pub phase: Phase,
    /// The type of the last event of the change.
    pub event_type: String,
    pub epoch: i64,
    pub partition: i32,
    pub kind: String,
    pub priority: i32,
    /// The remaining fields a WatchTasks filter can name, where the writer knows them
    /// (a pod does not know the new `updated_at`; readers take rows from the store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime<Utc>>,
    /// W3C trace context of the writer, so consumers can link their spans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl TaskUpdate {
    /// The update for a change that left the task in `state`.
    pub fn of(
        state: &TaskState,
        partition_count: u32,
        event_type: &str,
        traceparent: Option<String>,
    ) -> Self {
        Self {
            task_id: state.task_id,
            version: state.version,
            status: state.status,
            phase: state.phase,
            event_type: event_type.to_owned(),
            epoch: state.pod_epoch,
            partition: partition_of(state.task_id, partition_count) as i32,
            kind: state.kind.clone(),
            priority: state.priority,
            created_by: None,
            created_at: None,
            updated_at: None,
            traceparent,
        }
    }

    /// The update for a change whose committed row the writer has read back: every
    /// field filled.
    pub fn from_task(task: &Task, event_type: &str, traceparent: Option<String>) -> Self {
        Self {
            task_id: task.task_id,
            version: task.version,
            status: task.status,
            phase: task.phase,
            event_type: event_type.to_owned(),
            epoch: task.pod.as_ref().map_or(0, |p| p.epoch),
            partition: task.partition,
            kind: task.kind.clone(),
            priority: task.priority,
            created_by: Some(task.created_by.clone()),
            created_at: Some(task.created_at),
            updated_at: Some(task.updated_at),
            traceparent,
        }
    }

    /// The update for a task just created by `created_by` in a transaction that began
    /// at `created_at` (its rows' `created_at` and `updated_at`).
    pub fn created(
        task_id: TaskId,
        task: &NewTask,
        partition_count: u32,
        created_by: &str,
        created_at: Option<DateTime<Utc>>,
        traceparent: Option<String>,
    ) -> Self {
        let (status, version, event_type) = if task.auto_start {
            (Status::Active, 2, "pod_requested")
        } else {
            (Status::Inactive, 1, "task_created")
        };
        Self {
            task_id,
            version,
            status,
            phase: Phase::SpecClarification,
            event_type: event_type.to_owned(),
            epoch: 0,
            partition: partition_of(task_id, partition_count) as i32,
            kind: task.kind.clone(),
            priority: task.priority,
            created_by: Some(created_by.to_owned()),
            created_at,
            updated_at: created_at,
            traceparent,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("invalid bus.url: {0}")]
    InvalidUrl(String),
}
