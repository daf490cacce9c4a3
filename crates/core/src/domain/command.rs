//! What API callers ask of a task. Pods and workers append events directly (fenced by
//! epoch and generation); callers go through [`Command`] and `decide`.

use serde::{Deserialize, Serialize};

use super::status::Phase;

/// A lifecycle command, decided against the task's current state under its row lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    Cancel { reason: String },
    Complete,
    TransitionPhase { to: Phase },
    RequestStart,
    RequestStop { reason: Option<String> },
    RequestRestart,
}

impl Command {
    /// The name idempotency records store as the method.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Cancel { .. } => "cancel",
            Command::Complete => "complete",
            Command::TransitionPhase { .. } => "transition_phase",
            Command::RequestStart => "start_pod",
            Command::RequestStop { .. } => "stop_pod",
            Command::RequestRestart => "restart_pod",
        }
    }
}
