//! The one error enum of taskpod's core: the seed's errors and ours.
//!
//! Every layer above maps it exhaustively (the API to gRPC codes), so a new variant
//! forces a decision there. Internal causes stay in the log: messages here are safe to
//! show a client.

use crate::domain::{Phase, TaskId};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid title: {0}")]
    InvalidTitle(String),
    #[error("actor_id is required")]
    MissingActorId,
    #[error("a reason is required")]
    MissingReason,
    /// Any other field outside its documented limits.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// One item of a batch was invalid; the whole batch was refused.
    #[error("item {index}: {source}")]
    InvalidBatchItem { index: usize, source: Box<Error> },
    #[error("task {0} not found")]
    TaskNotFound(TaskId),
    #[error("task {0} already has a pod wanted or running")]
    AlreadyStarted(TaskId),
    #[error("task {0} is already completed")]
    AlreadyCompleted(TaskId),
    #[error("task {0} is already cancelled")]
    AlreadyCancelled(TaskId),
    #[error("task {0} has already failed")]
    AlreadyFailed(TaskId),
    #[error("task {0} has no pod wanted or running")]
    NotRunning(TaskId),
    #[error("invalid phase transition from {from} to {to}")]
    InvalidTransition { from: Phase, to: Phase },
    /// TransitionPhase on an active task whose handler owns the phases.
    #[error("the {kind} handler moves this task's phases while it is active")]
    PhaseOwnedByHandler { kind: String },
    /// An append the state table does not allow (a pod event out of order, or an event
    /// its writer may not append).
    #[error("{event_type} is not allowed here: {reason}")]
    IllegalEvent { event_type: String, reason: String },
    /// Postgres unreachable, timing out or shutting down. Retryable.
    #[error("store unavailable: {0}")]
    StoreUnavailable(String),
    #[error("version conflict: expected {expected}, found {actual}")]
    VersionConflict { expected: i64, actual: i64 },
    #[error("stale pod epoch: held {held}, current {current}")]
    StaleEpoch { held: i64, current: i64 },
    /// A worker append or pod start from a node that no longer owns the partition at
    /// that generation: stop and re-check ownership.
    #[error("stale partition generation: held {held}, current {current}")]
    StaleGeneration { held: i64, current: i64 },
    /// A worker write from a node whose lock session is gone: it holds no partition any
    /// more, whatever the partition rows still say, until it reconnects.
    #[error("node {0} has lost its lock session")]
    NodeFenced(crate::domain::NodeId),
    /// A crashed task's restart backoff has not passed yet.
    #[error("task {task_id} restarts in {wait:?}")]
    BackingOff {
        task_id: TaskId,
        wait: std::time::Duration,
    },
    #[error("request_id {request_id:?} was already used for a different request")]
    IdempotencyKeyReused { request_id: String },
    /// A bug or a broken invariant; details are logged, not shown.
    #[error("internal error")]
    Internal(String),
}

impl Error {
    /// The request field at fault, for `google.rpc.BadRequest` field violations.
    pub fn field(&self) -> Option<&str> {
        match self {
            Error::InvalidTitle(_) => Some("title"),
            Error::MissingActorId => Some("actor_id"),
            Error::MissingReason => Some("reason"),
            Error::InvalidArgument { field, .. } => Some(field),
            Error::InvalidBatchItem { source, .. } => source.field(),
            Error::IdempotencyKeyReused { .. } => Some("request_id"),
            _ => None,
        }
    }

    /// A stable UPPER_SNAKE reason, for `google.rpc.ErrorInfo` and for tests.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidTitle(_) => "INVALID_TITLE",
            Error::MissingActorId => "MISSING_ACTOR_ID",
            Error::MissingReason => "MISSING_REASON",
            Error::InvalidArgument { .. } => "INVALID_ARGUMENT",
            Error::InvalidBatchItem { .. } => "INVALID_BATCH_ITEM",
            Error::TaskNotFound(_) => "TASK_NOT_FOUND",
            Error::AlreadyStarted(_) => "ALREADY_STARTED",
            Error::AlreadyCompleted(_) => "ALREADY_COMPLETED",
            Error::AlreadyCancelled(_) => "ALREADY_CANCELLED",
            Error::AlreadyFailed(_) => "ALREADY_FAILED",
            Error::NotRunning(_) => "NOT_RUNNING",
            Error::InvalidTransition { .. } => "INVALID_TRANSITION",
            Error::PhaseOwnedByHandler { .. } => "PHASE_OWNED_BY_HANDLER",
            Error::IllegalEvent { .. } => "ILLEGAL_EVENT",
            Error::StoreUnavailable(_) => "STORE_UNAVAILABLE",
            Error::VersionConflict { .. } => "VERSION_CONFLICT",
            Error::StaleEpoch { .. } => "STALE_EPOCH",
            Error::StaleGeneration { .. } => "STALE_GENERATION",
            Error::NodeFenced(_) => "NODE_FENCED",
            Error::BackingOff { .. } => "BACKING_OFF",
            Error::IdempotencyKeyReused { .. } => "IDEMPOTENCY_KEY_REUSED",
            Error::Internal(_) => "INTERNAL",
        }
    }

    pub(crate) fn invalid(field: &str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }
}
