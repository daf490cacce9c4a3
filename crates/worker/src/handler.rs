//! The handler trait and what a pod gives its handler.
//!
//! A handler does the work of one task kind. It moves the task along its phases through
//! [`PodContext::advance`], which appends under the pod's epoch; it ends by completing
//! the task (advancing past `review`), or with [`HandlerError::Retry`] (a crash, counted
//! against the restart budget) or [`HandlerError::Fail`] (the task fails, terminal).
//!
//! # Example
//!
//! A handler that waits one second in each phase:
//!
//! ```ignore
//! struct Patient;
//!
//! impl Handler for Patient {
//!     fn run<'a>(&'a self, pod: &'a mut PodContext) -> BoxFuture<'a, Result<(), HandlerError>> {
//!         Box::pin(async move {
//!             while !pod.phase().is_terminal() {
//!                 tokio::select! {
//!                     () = tokio::time::sleep(Duration::from_secs(1)) => pod.advance().await?,
//!                     () = pod.stopped() => return Err(HandlerError::Stopped),
//!                 }
//!             }
//!             Ok(())
//!         })
//!     }
//! }
//! ```

use std::time::Duration;

use futures::future::BoxFuture;
use taskpod_core::Error;
use taskpod_core::domain::{
    Event, EventMetadata, MANUAL_KIND, Phase, PodState, Status, Task, TaskState,
};
use taskpod_core::store::checkpoint::Checkpoint;
use taskpod_core::store::{PodAppend, RecordedEvent, Store};
use taskpod_core::telemetry::context::traceparent_in;
use tokio_util::sync::CancellationToken;

use crate::appender::Appender;
use crate::liveness::Liveness;
use crate::pod::PodIo;
use tracing::{Instrument as _, Span};

/// How a handler run ended, other than by completing the task.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// A crash: restart within the budget.
    #[error("retry: {0}")]
    Retry(String),
    /// Give up: the task becomes `failed`.
    #[error("fail: {0}")]
    Fail(String),
    /// The pod was asked to stop (stop, cancel, restart, drain).
    #[error("stopped")]
    Stopped,
    /// The pod's epoch went stale: another pod owns the task now. Never a crash.
    #[error("fenced")]
    Fenced,
}

/// One kind's work. Implementations must return promptly once [`PodContext::stopped`]
/// resolves, and must not block the thread (spawn_blocking for blocking work).
pub trait Handler: Send + Sync + 'static {
    fn run<'a>(&'a self, pod: &'a mut PodContext) -> BoxFuture<'a, Result<(), HandlerError>>;
}

/// What a pod's handler sees: its task, its epoch, and a fenced way to move it on.
#[derive(Debug)]
pub struct PodContext {
    store: Store,
    appender: Appender,
    task: Task,
    epoch: i64,
    /// The task's state as this pod last wrote or read it: what its next append is
    /// decided from (and written only while the head still is this).
    state: TaskState,
    /// Cancelled by the controller when the pod must stop.
    stop: CancellationToken,
    metadata: EventMetadata,
    /// What an earlier pod of this task saved, and the events written after it.
    restored: Option<(Checkpoint, Vec<RecordedEvent>)>,
    /// The pod's `taskpod.pod` span.
    span: Span,
    /// The span of the phase the handler is in (kinds whose handler walks the phases).
    phase_span: Option<Span>,
    /// The trace context events carry when this process does not trace.
    origin: Option<String>,
    /// Whether the node still holds its claim (see [`crate::liveness`]).
    liveness: Liveness,
    /// `pod_stopped` went out with the handler's last write
    /// ([`PodContext::complete_remaining`]): nothing left to say when the pod ends.
    stop_written: bool,
}

impl PodContext {
    pub(crate) fn new(
        io: PodIo,
        task: Task,
        state: TaskState,
        stop: CancellationToken,
        metadata: EventMetadata,
        span: Span,
        origin: Option<String>,
    ) -> Self {
        let PodIo {
            store,
            appender,
            liveness,
        } = io;
        Self {
            liveness,
            appender,
            stop_written: false,
            restored: None,
            span,
            phase_span: None,
            origin,
            epoch: state.pod_epoch,
            state,
            store,
            task,
            stop,
            metadata,
        }
    }

    /// The store, for handlers that write beside the event stream (output chunks).
    pub(crate) fn store_handle(&self) -> Store {
        self.store.clone()
    }

    /// Takes the last checkpoint (read with the mint) and loads the events after it.
    pub(crate) async fn restore(
        &mut self,
        checkpoint: Option<Checkpoint>,
    ) -> Result<(), HandlerError> {
        let Some(cp) = checkpoint else {
            return Ok(());
        };
        let since = Box::pin(
            self.store
                .read_stream(self.task.task_id, cp.version + 1, usize::MAX),
        )
        .await
        .map_err(store_error)?;
        self.restored = Some((cp, since));
        Ok(())
    }

    /// The state an earlier pod of this task saved with [`PodContext::save_checkpoint`],
    /// and the events written since: where to resume instead of starting over.
    pub fn checkpoint(&self) -> Option<(&serde_json::Value, &[RecordedEvent])> {
        self.restored
            .as_ref()
            .map(|(cp, since)| (&cp.state, since.as_slice()))
    }

    /// Saves the handler's state as of the pod's current version, so a later pod of this
    /// task resumes from it.
    ///
    /// # Errors
    /// [`HandlerError::Fenced`] when another pod owns the task now.
    pub async fn save_checkpoint(&self, state: &serde_json::Value) -> Result<(), HandlerError> {
        self.store
            .save_checkpoint(self.task.task_id, self.epoch, self.state.version, state)
            .await
            .map_err(store_error)
    }

    /// The task as it was when the pod started.
    pub fn task(&self) -> &Task {
        &self.task
    }

    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    /// The phase as far as this pod knows.
    pub fn phase(&self) -> Phase {
        self.state.phase
    }

    /// Whether this node still holds its claim on the task's partition, as the lock
    /// session's pinger last saw it: side effects outside the store (an `exec` program)
    /// must stop as soon as it is not, without waiting for a stop request.
    pub fn liveness(&self) -> &Liveness {
        &self.liveness
    }

    /// Resolves when the pod must stop.
    pub async fn stopped(&self) {
        self.stop.cancelled().await;
    }

    pub fn is_stopped(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Moves the task to the next phase of the walk; past `review` it completes the task.
    ///
    /// On a version conflict it catches up from the store and, if the task still stands
    /// where this step started, appends again; the handler's step is never re-run.
    ///
    /// # Errors
    /// [`HandlerError::Stopped`] when the task is no longer active,
    /// [`HandlerError::Fenced`] when the epoch went stale, [`HandlerError::Retry`] when
    /// the store is unavailable.
    pub async fn advance(&mut self) -> Result<Phase, HandlerError> {
        let Some(event) = step_from(self.state.phase) else {
            return Err(HandlerError::Stopped);
        };
        let within = self.phase_span.clone().unwrap_or_else(|| self.span.clone());
        let span = if matches!(event, Event::TaskCompleted { .. }) {
            tracing::info_span!(parent: &within, "taskpod.task.complete", task_id = %self.task.task_id)
        } else {
            within
        };
        self.append_in(event, &span).await?;
        drop(span);
        self.enter_phase();
        Ok(self.state.phase)
    }

    /// Walks every remaining phase, completes the task and stops the pod in one write,
    /// for a handler with no work between its phases nor after the last (`sleep`
    /// without a delay): the events of one [`PodContext::advance`] per phase and the
    /// pod's `pod_stopped`, in order, durable together before this returns, for one
    /// head and one listing update instead of one per phase. As `advance`, a task moved
    /// on by someone else meanwhile is taken where it stands (the phase may then not be
    /// terminal: call again). The handler must return right after the task completes.
    ///
    /// # Errors
    /// As [`PodContext::advance`].
    pub async fn complete_remaining(&mut self) -> Result<(), HandlerError> {
        let mut events = Vec::new();
        let mut phase = self.state.phase;
        while let Some(event) = step_from(phase) {
            phase = match &event {
                Event::PhaseChanged { to, .. } => *to,
                _ => Phase::Completed,
            };
            events.push(event);
        }
        if events.is_empty() {
            return Err(HandlerError::Stopped);
        }
        events.push(Event::PodStopped {
            epoch: self.epoch,
            reason: "completed".to_owned(),
        });
        let within = self.phase_span.take().unwrap_or_else(|| self.span.clone());
        let span = tracing::info_span!(parent: &within, "taskpod.task.complete", task_id = %self.task.task_id);
        drop(within);
        self.append_all_in(events, &span).await?;
        drop(span);
        if self.state.pod_state == PodState::None {
            // Ours landed (only this pod's own stop ends its epoch without fencing it).
            self.stop_written = true;
            drop(
                tracing::info_span!(parent: &self.span, "taskpod.pod.stop", task_id = %self.task.task_id, taskpod.reason = "completed"),
            );
        }
        self.enter_phase();
        Ok(())
    }

    /// Ends the current phase's span and, for a handler that walks the phases, starts
    /// the next one's, so a trace shows how long each phase took.
    fn enter_phase(&mut self) {
        self.phase_span = None;
        if self.task.kind == MANUAL_KIND || self.state.phase.is_terminal() {
            return;
        }
        let span = tracing::info_span!(
            parent: &self.span,
            "phase",
            otel.name = phase_span_name(self.state.phase),
            task_id = %self.task.task_id,
            taskpod.phase = self.state.phase.as_str(),
            taskpod.kind = %self.task.kind,
            taskpod.epoch = self.epoch,
        );
        self.phase_span = Some(span);
    }

    fn pod_append(&self, events: &[Event], metadata: &EventMetadata) -> PodAppend {
        PodAppend {
            before: self.state.clone(),
            events: events.to_vec(),
            metadata: metadata.clone(),
        }
    }

    /// The metadata of an event written in `span`: its trace context (see
    /// [`traceparent_in`]), else the one this pod was handed.
    fn metadata_in(&self, span: &Span) -> EventMetadata {
        EventMetadata {
            traceparent: traceparent_in(span, self.origin.as_deref()),
            ..self.metadata.clone()
        }
    }

    /// Ends the task as failed.
    ///
    /// # Errors
    /// As [`PodContext::advance`].
    pub(crate) async fn fail(&mut self, error: &str) -> Result<(), HandlerError> {
        let event = Event::TaskFailed {
            error: error.to_owned(),
            from_phase: self.state.phase,
        };
        let within = self.phase_span.take().unwrap_or_else(|| self.span.clone());
        let span = tracing::info_span!(
            parent: &within,
            "taskpod.task.fail",
            task_id = %self.task.task_id,
            taskpod.reason = error,
            otel.status_code = "ERROR",
        );
        self.append_in(event, &span).await
    }

    /// Tells the store the pod stopped; best effort (a fenced pod has nothing to say).
    pub(crate) fn stopped_cleanly<'a>(&'a mut self, reason: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(self.stop_now(reason))
    }

    async fn stop_now(&mut self, reason: &str) {
        if self.stop_written {
            return;
        }
        let event = Event::PodStopped {
            epoch: self.epoch,
            reason: reason.to_owned(),
        };
        self.phase_span = None;
        let span = tracing::info_span!(parent: &self.span, "taskpod.pod.stop", task_id = %self.task.task_id, taskpod.reason = reason);
        let metadata = self.metadata_in(&span);
        for _ in 0..3 {
            match self
                .appender
                .append(self.pod_append(std::slice::from_ref(&event), &metadata))
                .instrument(span.clone())
                .await
            {
                Ok(a) => {
                    self.state = a.state;
                    return;
                }
                // Stopped by a command: say so at the version it left.
                Err(Error::VersionConflict { .. }) => match self
                    .store
                    .state(self.task.task_id)
                    .instrument(span.clone())
                    .await
                {
                    Ok(state) => self.state = state,
                    Err(_) => return,
                },
                Err(e) => {
                    tracing::debug!(task.id = %self.task.task_id, error = %e, "pod_stopped not written");
                    return;
                }
            }
        }
    }

    /// Appends the pod's first event once it has its handler slot.
    pub(crate) async fn started(
        &mut self,
        node: taskpod_core::domain::NodeId,
    ) -> Result<(), HandlerError> {
        let event = Event::PodStarted {
            epoch: self.epoch,
            node,
            started_at: chrono::Utc::now(),
        };
        // A span of its own that ends with the write: the pod's span ends only with the
        // pod (never, if its worker is killed), and a stored context must name a span
        // that gets exported.
        let span = tracing::info_span!(
            parent: &self.span,
            "taskpod.pod.start",
            task_id = %self.task.task_id,
            taskpod.epoch = self.epoch,
        );
        self.append_in(event, &span).await?;
        drop(span);
        self.enter_phase();
        Ok(())
    }

    /// Appends `event` (the store announces it) inside `span`, whose trace context the event
    /// records.
    ///
    /// Boxed, like every store round trip of a pod: a pod's future is held for its
    /// whole life, and sized for its largest await point, so an inline append (with
    /// its publish and its catch-up read) would cost every idle pod kilobytes.
    fn append_in<'a>(
        &'a mut self,
        event: Event,
        span: &'a Span,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        self.append_all_in(vec![event], span)
    }

    /// As [`PodContext::append_in`], for several events written together.
    fn append_all_in<'a>(
        &'a mut self,
        events: Vec<Event>,
        span: &'a Span,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(self.append_now(events, span))
    }

    async fn append_now(&mut self, events: Vec<Event>, span: &Span) -> Result<(), HandlerError> {
        let metadata = self.metadata_in(span);
        // A store outage hits every pod at once and is nobody's fault: wait it out
        // (until stopped) instead of crashing, so it is charged to no task.
        let mut backoff = Duration::from_millis(100);
        loop {
            let res = self
                .appender
                .append(self.pod_append(&events, &metadata))
                .instrument(span.clone())
                .await;
            match res {
                Ok(appended) => {
                    self.state = appended.state;
                    return Ok(());
                }
                Err(Error::VersionConflict { .. }) => {
                    let state = self
                        .store
                        .state(self.task.task_id)
                        .instrument(span.clone())
                        .await
                        .map_err(store_error)?;
                    if state.pod_epoch != self.epoch {
                        return Err(HandlerError::Fenced);
                    }
                    if state.status != Status::Active {
                        self.state = state;
                        return Err(HandlerError::Stopped);
                    }
                    let moved = state.phase != self.state.phase;
                    self.state = state;
                    if moved {
                        // Someone else moved the task on (a manual transition): take it.
                        return Ok(());
                    }
                }
                Err(Error::StoreUnavailable(cause)) => {
                    tracing::debug!(task.id = %self.task.task_id, %cause, "store unavailable, waiting");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = self.stop.cancelled() => return Err(HandlerError::Stopped),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(store_error(e)),
            }
        }
    }
}

/// The event that moves a task on from `from` along the walk (completing it past
/// `review`); none from a terminal phase.
fn step_from(from: Phase) -> Option<Event> {
    let to = match from {
        Phase::SpecClarification => Phase::Planning,
        Phase::Planning => Phase::Development,
        Phase::Development => Phase::Review,
        Phase::Review => return Some(Event::TaskCompleted { from_phase: from }),
        Phase::Completed | Phase::Cancelled | Phase::Failed => return None,
    };
    Some(Event::PhaseChanged { from, to })
}

/// Span names must be literals to stay low-cardinality; a phase names its own.
fn phase_span_name(phase: Phase) -> &'static str {
    match phase {
        Phase::SpecClarification => "phase spec_clarification",
        Phase::Planning => "phase planning",
        Phase::Development => "phase development",
        Phase::Review => "phase review",
        Phase::Completed => "phase completed",
        Phase::Cancelled => "phase cancelled",
        Phase::Failed => "phase failed",
    }
}

fn store_error(e: Error) -> HandlerError {
    match e {
        Error::StaleEpoch { .. } | Error::StaleGeneration { .. } | Error::NodeFenced(_) => {
            HandlerError::Fenced
        }
        Error::NotRunning(_) | Error::IllegalEvent { .. } | Error::TaskNotFound(_) => {
            HandlerError::Stopped
        }
        other => HandlerError::Retry(format!("store: {other}")),
    }
}
