//! The events a task's stream is made of, and who may write each.
//!
//! Events are facts: once appended they are never updated. Their data holds only what
//! the state change needs; who caused them and why travels in [`EventMetadata`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::ids::NodeId;
use super::restart::CrashKind;
use super::status::Phase;

/// One fact in a task's stream. Serialised adjacently tagged (`{"type": ..., "data":
/// ...}`): the store keeps `type` and `data` in their own columns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum Event {
    /// Always version 1.
    TaskCreated {
        title: String,
        description: String,
        kind: String,
        payload: serde_json::Value,
        priority: i32,
        metadata: serde_json::Value,
    },
    /// A caller wants a pod: the task becomes active.
    PodRequested {},
    /// A caller wants the pod gone: the task becomes inactive and the pod, if any, is
    /// asked to stop.
    PodStopRequested {
        reason: Option<String>,
    },
    /// A caller wants a fresh pod: the owner stops the current one (if any) and starts
    /// another with a new epoch.
    PodRestartRequested {},
    /// A pod got its handler slot under the epoch minted for it.
    PodStarted {
        epoch: i64,
        node: NodeId,
        started_at: DateTime<Utc>,
    },
    /// The pod of `epoch` stopped cleanly.
    PodStopped {
        epoch: i64,
        reason: String,
    },
    /// The pod of `epoch` failed: a handler's Retry, panic or timeout, or its node died.
    PodCrashed {
        epoch: i64,
        reason: String,
        kind: CrashKind,
    },
    PhaseChanged {
        from: Phase,
        to: Phase,
    },
    TaskCompleted {
        from_phase: Phase,
    },
    TaskCancelled {
        reason: String,
        from_phase: Phase,
    },
    /// Terminal: a handler's Fail, or a spent restart budget.
    TaskFailed {
        error: String,
        from_phase: Phase,
    },
}

/// Who is appending, for the write-rules table in docs/architecture.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writer {
    /// A lifecycle command through the API.
    Api,
    /// The pod that holds the current epoch.
    Pod,
    /// The worker that owns the task's partition at the current generation.
    Worker,
}

impl Event {
    /// The stable name stored in `events.type`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::TaskCreated { .. } => "task_created",
            Event::PodRequested {} => "pod_requested",
            Event::PodStopRequested { .. } => "pod_stop_requested",
            Event::PodRestartRequested {} => "pod_restart_requested",
            Event::PodStarted { .. } => "pod_started",
            Event::PodStopped { .. } => "pod_stopped",
            Event::PodCrashed { .. } => "pod_crashed",
            Event::PhaseChanged { .. } => "phase_changed",
            Event::TaskCompleted { .. } => "task_completed",
            Event::TaskCancelled { .. } => "task_cancelled",
            Event::TaskFailed { .. } => "task_failed",
        }
    }

    /// The pod epoch the event is about, for the events that carry one.
    pub fn pod_epoch(&self) -> Option<i64> {
        match self {
            Event::PodStarted { epoch, .. }
            | Event::PodStopped { epoch, .. }
            | Event::PodCrashed { epoch, .. } => Some(*epoch),
            _ => None,
        }
    }

    /// Whether `writer` may append this event (the brief's "Who may write what").
    pub fn may_be_written_by(&self, writer: Writer) -> bool {
        use Writer::*;
        match self {
            Event::TaskCreated { .. }
            | Event::PodRequested {}
            | Event::PodStopRequested { .. }
            | Event::PodRestartRequested {}
            | Event::TaskCancelled { .. } => writer == Api,
            Event::PhaseChanged { .. } | Event::TaskCompleted { .. } => {
                matches!(writer, Api | Pod)
            }
            Event::PodStarted { .. } | Event::PodStopped { .. } => writer == Pod,
            Event::PodCrashed { .. } => writer == Worker,
            Event::TaskFailed { .. } => matches!(writer, Pod | Worker),
        }
    }

    /// Splits the event into its stored `type` and `data`.
    ///
    /// # Errors
    /// Never in practice: every variant serialises to an object.
    pub fn to_parts(&self) -> Result<(&'static str, serde_json::Value), serde_json::Error> {
        let mut value = serde_json::to_value(self)?;
        let data = value
            .get_mut("data")
            .map(serde_json::Value::take)
            .unwrap_or_else(|| serde_json::Value::Object(Default::default()));
        Ok((self.type_name(), data))
    }

    /// Rebuilds an event from its stored `type` and `data`.
    ///
    /// # Errors
    /// When the type is unknown or the data does not fit it.
    pub fn from_parts(type_name: &str, data: serde_json::Value) -> Result<Self, serde_json::Error> {
        serde_json::from_value(serde_json::json!({ "type": type_name, "data": data }))
    }
}

/// Who caused an event and in answer to what; stored beside it in `events.metadata`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMetadata {
    /// The principal (or the user it acts for) that caused the change. Always set.
    pub actor_id: String,
    /// Ties together every event one client request caused. Always set: the store
    /// mints one when the caller gave none.
    pub correlation_id: String,
    /// The event or request this one answers, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    /// W3C trace context of the span that wrote the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The pod epoch, when a pod or worker wrote the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<i64>,
}
