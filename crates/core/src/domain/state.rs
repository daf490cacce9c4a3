//! The state table: `decide(state, command) -> events` and `evolve(state, event) ->
//! state`, shared by the API and the worker.
//!
//! `decide` answers callers' commands; `evolve` is the only way state changes, and it
//! checks every event against the table, so a pod or worker append that the table does
//! not allow is refused the same way a command is. Replaying a stream with `evolve`
//! gives the state the store holds in the head and listing rows.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::command::Command;
use super::event::Event;
use super::ids::{NodeId, TaskId};
use super::status::{Phase, PodState, Status};
use crate::error::Error;

/// The kind whose phases move only by TransitionPhase, even while active: the seed's
/// human-in-the-loop flow.
pub const MANUAL_KIND: &str = "manual";

/// Every kind a worker has a handler for: the whole label set of a metric's `kind`.
pub const KINDS: &[&str] = &[MANUAL_KIND, "sleep", "exec"];

/// Everything the state table decides on: the task's lifecycle and its pod.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskState {
    pub task_id: TaskId,
    pub kind: String,
    pub priority: i32,
    pub status: Status,
    pub phase: Phase,
    /// The version of the last event applied (1 after creation).
    pub version: i64,
    pub last_error: Option<String>,
    /// The epoch of the newest pod minted for the task (0: never). Minted by the worker's
    /// fenced start statement, not by an event.
    pub pod_epoch: i64,
    pub pod_state: PodState,
    pub owner_node: Option<NodeId>,
    pub pod_started_at: Option<DateTime<Utc>>,
}

impl TaskState {
    /// The state a `task_created` event (version 1) gives.
    ///
    /// # Errors
    /// [`Error::IllegalEvent`] for any other event.
    pub fn genesis(task_id: TaskId, event: &Event) -> Result<Self, Error> {
        match event {
            Event::TaskCreated { kind, priority, .. } => Ok(Self {
                task_id,
                kind: kind.clone(),
                priority: *priority,
                status: Status::Inactive,
                phase: Phase::SpecClarification,
                version: 1,
                last_error: None,
                pod_epoch: 0,
                pod_state: PodState::None,
                owner_node: None,
                pod_started_at: None,
            }),
            other => Err(illegal(other, "a stream must start with task_created")),
        }
    }

    /// Replays a whole stream from its first event.
    ///
    /// # Errors
    /// When the stream is empty or breaks the state table.
    pub fn replay<'a>(
        task_id: TaskId,
        events: impl IntoIterator<Item = &'a Event>,
    ) -> Result<Self, Error> {
        let mut events = events.into_iter();
        let first = events
            .next()
            .ok_or_else(|| Error::Internal(format!("stream {task_id} is empty")))?;
        events.try_fold(Self::genesis(task_id, first)?, |state, e| state.then(e))
    }

    /// The state after each event of a stream (from its first), in order: one pass
    /// where replaying every prefix would be quadratic. Empty for an empty stream.
    ///
    /// # Errors
    /// When the stream breaks the state table.
    pub fn history<'a>(
        task_id: TaskId,
        events: impl IntoIterator<Item = &'a Event>,
    ) -> Result<Vec<Self>, Error> {
        let mut out: Vec<Self> = Vec::new();
        for e in events {
            let next = match out.last() {
                None => Self::genesis(task_id, e)?,
                Some(state) => state.clone().then(e)?,
            };
            out.push(next);
        }
        Ok(out)
    }

    /// Applies the event that follows this state in its stream.
    fn then(self, e: &Event) -> Result<Self, Error> {
        // Minting an epoch writes no event: the first event that carries a newer
        // epoch shows that a mint happened just before it.
        let state = match e.pod_epoch() {
            Some(epoch) if epoch > self.pod_epoch && !self.has_pod() => TaskState {
                pod_epoch: epoch,
                pod_state: PodState::Starting,
                ..self
            },
            _ => self,
        };
        evolve(&state, e)
    }

    /// Whether a pod is minted and has not yet reported stopping or crashing.
    pub fn has_pod(&self) -> bool {
        self.pod_state != PodState::None
    }

    fn ensure_not_terminal(&self) -> Result<(), Error> {
        match self.status {
            Status::Completed => Err(Error::AlreadyCompleted(self.task_id)),
            Status::Cancelled => Err(Error::AlreadyCancelled(self.task_id)),
            Status::Failed => Err(Error::AlreadyFailed(self.task_id)),
            Status::Inactive | Status::Active => Ok(()),
        }
    }
}

/// Mints the next pod epoch: what the worker's fenced start statement does to the head
/// (the store's SQL mirrors it). No event is written until the pod gets its slot.
///
/// # Errors
/// [`Error::NotRunning`] when no pod is wanted; [`Error::AlreadyStarted`] when one is
/// already minted.
pub fn mint_pod(state: &TaskState, node: NodeId) -> Result<TaskState, Error> {
    if state.status != Status::Active {
        return Err(Error::NotRunning(state.task_id));
    }
    if state.has_pod() {
        return Err(Error::AlreadyStarted(state.task_id));
    }
    let mut next = state.clone();
    next.pod_epoch += 1;
    next.pod_state = PodState::Starting;
    next.owner_node = Some(node);
    Ok(next)
}

/// Decides which events a command produces from the current state. Never changes the
/// state: the store appends the events and folds them with [`evolve`].
///
/// # Errors
/// The table's refusals: already completed/cancelled/failed, already started, not
/// running, invalid transition, phase owned by the handler.
pub fn decide(state: &TaskState, command: &Command) -> Result<Vec<Event>, Error> {
    state.ensure_not_terminal()?;
    let from_phase = state.phase;
    let event = match command {
        Command::Cancel { reason } => Event::TaskCancelled {
            reason: reason.clone(),
            from_phase,
        },
        Command::Complete => Event::TaskCompleted { from_phase },
        Command::TransitionPhase { to } => {
            if state.status == Status::Active && state.kind != MANUAL_KIND {
                return Err(Error::PhaseOwnedByHandler {
                    kind: state.kind.clone(),
                });
            }
            if !from_phase.can_move_to(*to) {
                return Err(Error::InvalidTransition {
                    from: from_phase,
                    to: *to,
                });
            }
            if *to == Phase::Completed {
                Event::TaskCompleted { from_phase }
            } else {
                Event::PhaseChanged {
                    from: from_phase,
                    to: *to,
                }
            }
        }
        Command::RequestStart => match state.status {
            Status::Active => return Err(Error::AlreadyStarted(state.task_id)),
            _ => Event::PodRequested {},
        },
        Command::RequestStop { reason } => match state.status {
            Status::Inactive => return Err(Error::NotRunning(state.task_id)),
            _ => Event::PodStopRequested {
                reason: reason.clone(),
            },
        },
        Command::RequestRestart => Event::PodRestartRequested {},
    };
    Ok(vec![event])
}

/// Applies one event, checking it against the state table.
///
/// # Errors
/// [`Error::IllegalEvent`] when the event cannot follow this state (wrong epoch, wrong
/// phase edge, a change after a terminal status, a second `task_created`).
pub fn evolve(state: &TaskState, event: &Event) -> Result<TaskState, Error> {
    let mut next = state.clone();
    next.version += 1;
    let terminal = state.status.is_terminal();
    match event {
        Event::TaskCreated { .. } => return Err(illegal(event, "the task already exists")),
        Event::PodRequested {} => {
            if state.status != Status::Inactive {
                return Err(illegal(event, "the task is not inactive"));
            }
            next.status = Status::Active;
        }
        Event::PodStopRequested { .. } => {
            if state.status != Status::Active {
                return Err(illegal(event, "the task is not active"));
            }
            next.status = Status::Inactive;
            if state.has_pod() {
                next.pod_state = PodState::Stopping;
            }
        }
        Event::PodRestartRequested {} => {
            if terminal {
                return Err(illegal(event, "the task has ended"));
            }
            next.status = Status::Active;
            // The owner sees a stopping pod on an active task: it stops it, then starts a
            // new one with a new epoch.
            if state.has_pod() {
                next.pod_state = PodState::Stopping;
            }
        }
        Event::PodStarted {
            epoch,
            node,
            started_at,
        } => {
            // The epoch must be the one `mint_pod` just minted (replay reconstructs the
            // mint, which writes no event): an epoch whose pod already stopped or crashed
            // never starts again.
            if state.pod_state != PodState::Starting || *epoch != state.pod_epoch {
                return Err(illegal(
                    event,
                    &format!(
                        "epoch {epoch} is spent or was not minted (current {}, pod {})",
                        state.pod_epoch, state.pod_state
                    ),
                ));
            }
            if state.status != Status::Active {
                return Err(illegal(event, "the task is not active"));
            }
            next.pod_epoch = *epoch;
            next.pod_state = PodState::Running;
            next.owner_node = Some(*node);
            next.pod_started_at = Some(*started_at);
        }
        Event::PodStopped { epoch, .. } | Event::PodCrashed { epoch, .. } => {
            check_epoch(state, event, *epoch)?;
            if !state.has_pod() {
                return Err(illegal(event, "no pod is running"));
            }
            next.pod_state = PodState::None;
            next.owner_node = None;
            next.pod_started_at = None;
            // A pod still stopping after the task ended may crash (its node dies): that
            // releases the pod but must not replace the outcome's error.
            if let Event::PodCrashed { reason, .. } = event
                && !terminal
            {
                next.last_error = Some(reason.clone());
            }
        }
        Event::PhaseChanged { from, to } => {
            if terminal {
                return Err(illegal(event, "the task has ended"));
            }
            if *from != state.phase || !from.can_move_to(*to) || to.is_terminal() {
                return Err(illegal(
                    event,
                    &format!("{from} -> {to} from phase {}", state.phase),
                ));
            }
            next.phase = *to;
        }
        Event::TaskCompleted { from_phase }
        | Event::TaskCancelled { from_phase, .. }
        | Event::TaskFailed { from_phase, .. } => {
            if terminal {
                return Err(illegal(event, "the task has ended"));
            }
            if *from_phase != state.phase {
                return Err(illegal(
                    event,
                    &format!("from_phase {from_phase} is not {}", state.phase),
                ));
            }
            let (status, phase) = match event {
                Event::TaskCompleted { .. } => (Status::Completed, Phase::Completed),
                Event::TaskCancelled { .. } => (Status::Cancelled, Phase::Cancelled),
                _ => (Status::Failed, Phase::Failed),
            };
            next.status = status;
            next.phase = phase;
            if let Event::TaskFailed { error, .. } = event {
                next.last_error = Some(error.clone());
            }
            // A running pod sees the terminal status and reports `pod_stopped`.
            if state.has_pod() {
                next.pod_state = PodState::Stopping;
            }
        }
    }
    Ok(next)
}

fn check_epoch(state: &TaskState, event: &Event, epoch: i64) -> Result<(), Error> {
    if epoch != state.pod_epoch {
        return Err(illegal(
            event,
            &format!("epoch {epoch} is not the current epoch {}", state.pod_epoch),
        ));
    }
    Ok(())
}

fn illegal(event: &Event, reason: &str) -> Error {
    Error::IllegalEvent {
        event_type: event.type_name().to_owned(),
        reason: reason.to_owned(),
    }
}
