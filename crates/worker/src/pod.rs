//! One pod: waits for a handler slot, announces itself under its epoch, runs the
//! handler, and reports how it ended. It never outlives a stop request by more than its
//! handler's reaction time, and it writes nothing once its epoch is stale.

use std::sync::Arc;

use taskpod_core::domain::{EventMetadata, NodeId, Task, TaskState};
use taskpod_core::store::Store;
use taskpod_core::store::checkpoint::Checkpoint;
use tokio_util::sync::CancellationToken;

use taskpod_core::telemetry::context::continue_trace;
use taskpod_core::telemetry::metrics::metrics;
use tracing::Span;

use crate::appender::Appender;
use crate::handler::{Handler, HandlerError, PodContext};
use crate::liveness::Liveness;
use crate::slots::Slots;

/// What the controller starts a pod with: the mint's answer, so the pod starts without
/// reading its task again.
#[derive(Clone, Debug)]
pub(crate) struct PodSpec {
    pub task: Task,
    /// The task's state as minted: where the pod's appends start from.
    pub state: TaskState,
    pub epoch: i64,
    pub checkpoint: Option<Checkpoint>,
    /// The trace this pod continues: its claim's span, or (when this worker does not
    /// trace) the context the request left on the task, passed on unchanged.
    pub trace: Option<String>,
    /// For a pod adopted from a dead node: when that node was found dead, and this
    /// node's name (`taskpod_failover_adoption_seconds` counts until the pod runs).
    pub adopted: Option<(tokio::time::Instant, String)>,
}

/// How a pod ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PodExit {
    /// The handler completed the task.
    Completed,
    /// Stopped on request (stop, cancel, restart, drain); `pod_stopped` written.
    Stopped,
    /// The handler failed the task.
    Failed(String),
    /// A crash for the controller to record (Retry, panic, timeout).
    Crashed(String),
    /// The epoch went stale: another pod owns the task. Not a crash.
    Fenced,
}

impl PodExit {
    /// For the pod span's `taskpod.exit`.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Stopped => "stopped",
            Self::Failed(_) => "failed",
            Self::Crashed(_) => "crashed",
            Self::Fenced => "fenced",
        }
    }
}

/// The `taskpod.pod` span a pod runs in, continuing the trace its spec names.
pub(crate) fn span(spec: &PodSpec, node: NodeId) -> Span {
    let span = tracing::info_span!(
        "taskpod.pod",
        task_id = %spec.task.task_id,
        taskpod.kind = %spec.task.kind,
        taskpod.epoch = spec.epoch,
        taskpod.node = %node,
        taskpod.exit = tracing::field::Empty,
    );
    continue_trace(&span, spec.trace.as_deref());
    span
}

/// What every pod of a worker writes through.
#[derive(Clone, Debug)]
pub(crate) struct PodIo {
    pub store: Store,
    /// Appends, batched with other pods' (see [`crate::appender`]).
    pub appender: Appender,
    /// Whether this node still holds its claim: what `exec` feeds its guards from, so a
    /// node that lost its lock session stops its programs without the control loop.
    pub liveness: Liveness,
}

/// Runs the pod; call it inside its [`span`].
pub(crate) async fn run(
    io: PodIo,
    spec: PodSpec,
    handler: Arc<dyn Handler>,
    slots: Slots,
    node: NodeId,
    stop: CancellationToken,
) -> PodExit {
    let task_id = spec.task.task_id;
    let (priority, created_at) = (spec.task.priority, spec.task.created_at);
    let metadata = EventMetadata {
        actor_id: format!("worker:{node}"),
        correlation_id: format!("pod:{task_id}:{}", spec.epoch),
        ..EventMetadata::default()
    };
    let mut pod = PodContext::new(
        io,
        spec.task,
        spec.state,
        stop.clone(),
        metadata,
        Span::current(),
        spec.trace.clone(),
    );
    if let Err(e) = pod.restore(spec.checkpoint).await {
        return match e {
            HandlerError::Fenced => PodExit::Fenced,
            other => PodExit::Crashed(format!("loading the checkpoint: {other}")),
        };
    }

    let _permit = tokio::select! {
        permit = slots.acquire(priority, created_at) => permit,
        () = stop.cancelled() => {
            pod.stopped_cleanly("stopped while waiting for a slot").await;
            return PodExit::Stopped;
        }
    };
    match pod.started(node).await {
        Ok(()) => {}
        Err(HandlerError::Fenced) => return PodExit::Fenced,
        Err(HandlerError::Retry(e)) => return PodExit::Crashed(e),
        Err(HandlerError::Stopped | HandlerError::Fail(_)) => {
            pod.stopped_cleanly("stopped before it started").await;
            return PodExit::Stopped;
        }
    }
    tracing::debug!(task.id = %task_id, epoch = spec.epoch, "pod running");
    if let Some((found_dead, name)) = &spec.adopted {
        metrics().failover_adoption(name, found_dead.elapsed().as_secs_f64());
    }
    match handler.run(&mut pod).await {
        Ok(()) => {
            pod.stopped_cleanly("completed").await;
            PodExit::Completed
        }
        Err(HandlerError::Stopped) => {
            pod.stopped_cleanly("stopped").await;
            PodExit::Stopped
        }
        Err(HandlerError::Fenced) => PodExit::Fenced,
        Err(HandlerError::Fail(error)) => {
            if let Err(e) = pod.fail(&error).await {
                tracing::debug!(task.id = %task_id, error = %e, "could not fail the task");
            }
            pod.stopped_cleanly("failed").await;
            PodExit::Failed(error)
        }
        Err(HandlerError::Retry(reason)) => PodExit::Crashed(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every idle pod holds its future for as long as it runs: keep it small (store
    /// round trips are boxed, see `PodContext::append_in`). 10,000 idle pods at the
    /// size this caught (5.5 KB) were 55 MB.
    #[tokio::test]
    async fn a_pods_future_stays_small() {
        let store = Store::connect_lazy(&taskpod_core::store::StoreSettings::default(), 256)
            .expect("lazy store");
        let tracker = tokio_util::task::TaskTracker::new();
        let io = PodIo {
            appender: Appender::start(store.clone(), &tracker),
            store,
            liveness: Liveness::always(),
        };
        let now = chrono::Utc::now();
        let task = Task {
            task_id: taskpod_core::domain::TaskId::new(),
            title: "idle".into(),
            description: String::new(),
            kind: "manual".into(),
            payload: serde_json::Value::Null,
            metadata: serde_json::json!({}),
            priority: 0,
            partition: 0,
            status: taskpod_core::domain::Status::Active,
            phase: taskpod_core::domain::Phase::Planning,
            last_error: None,
            created_at: now,
            updated_at: now,
            created_by: "test".into(),
            version: 1,
            pod: None,
        };
        let state = TaskState {
            task_id: task.task_id,
            kind: task.kind.clone(),
            priority: 0,
            status: task.status,
            phase: task.phase,
            version: 1,
            last_error: None,
            pod_epoch: 1,
            pod_state: taskpod_core::domain::PodState::Starting,
            owner_node: None,
            pod_started_at: None,
        };
        let spec = PodSpec {
            task,
            state,
            epoch: 1,
            checkpoint: None,
            trace: None,
            adopted: None,
        };
        let handler: Arc<dyn Handler> = Arc::new(crate::handlers::manual::Manual);
        let pod = run(
            io,
            spec,
            handler,
            Slots::new(1),
            NodeId::new(),
            CancellationToken::new(),
        );
        let size = std::mem::size_of_val(&pod);
        assert!(size < 3 * 1024, "a pod's future is {size} bytes");
    }
}
