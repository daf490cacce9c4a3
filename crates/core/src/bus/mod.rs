//! The status bus over Redis pub/sub: hints that something changed, never the log.
//!
//! Redis pub/sub is at-most-once (a message is gone on any disconnect, and a slow
//! subscriber is cut off), so every reader also has a path to Postgres: workers run a
//! periodic check and one after every reconnect; watchers backfill from the store. A
//! writer publishes after its commit without waiting on Redis: a lost publish is
//! counted and logged, never an error for the write, and a slow or silent Redis never
//! holds a write (Redis down or stalled: writes keep their pace).
//!
//! Layout:
//! - [`channels`]: channel names;
//! - [`TaskUpdate`]: what is published;
//! - [`publisher`]: queued, pipelined, best-effort publishing by one owned task, over a
//!   bounded queue (`backlog`);
//! - [`subscriber`]: one reconnecting, pinged subscription with a changeable channel
//!   set;
//! - `connection`: the socket settings of every connection.

mod backlog;
mod connection;
pub mod publisher;
pub mod subscriber;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use chrono::{DateTime, Utc};

use crate::domain::{Phase, Status, TaskId};
use crate::store::{Committed, Secret};

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
    /// How long a connect, a publishing round trip, or an answer to a subscription's
    /// ping or (un)subscribe may take before the connection counts as failed.
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
    /// The remaining fields a WatchTasks filter can name, as the writing statement
    /// returned them (optional on the wire, for messages of older writers).
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
    /// Whether a worker may act on this update: all but the creation of an inactive
    /// task, which has no pod and wants none. Workers are the partition channels' only
    /// subscribers, so those creations are not published there: in a bench of batch
    /// creates they were a third of Redis's messages and cost the worker a seventh of a
    /// core to read and drop.
    pub fn may_concern_a_worker(&self) -> bool {
        !(self.status == Status::Inactive && self.event_type == "task_created")
    }

    /// The update announcing what a write committed: the only way one is made.
    pub fn committed(c: &Committed) -> Self {
        let s = &c.state;
        Self {
            task_id: s.task_id,
            version: s.version,
            status: s.status,
            phase: s.phase,
            event_type: c.event_type.to_owned(),
            epoch: s.pod_epoch,
            partition: c.partition,
            kind: s.kind.clone(),
            priority: s.priority,
            created_by: Some(c.created_by.clone()),
            created_at: Some(c.created_at),
            updated_at: Some(c.updated_at),
            traceparent: c.traceparent.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("invalid bus.url: {0}")]
    InvalidUrl(String),
}
