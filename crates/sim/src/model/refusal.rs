//! Why the model refused a call: the conditions of the protocol's conditional
//! statements, one variant each, so a trace says which fence held.

use std::fmt;

/// A refused store call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The caller's own lock session has ended (a lock-session call).
    SessionGone,
    /// A claim by a node whose session does not hold the partition's advisory lock.
    NotLockHolder,
    /// The partition is not owned by the caller at the generation it named.
    StaleGeneration,
    /// The caller's node key is not held: its lock session is gone.
    NodeLockLost,
    /// The epoch is not the task's current one.
    StaleEpoch,
    /// The epoch is current but retired: its pod's end (stop, crash, loss) is recorded.
    EpochRetired,
    /// The task is not active.
    NotRunning,
    /// A mint for a task that already has a pod.
    AlreadyStarted,
    /// A mint during the restart backoff.
    BackingOff,
    VersionConflict,
    /// The state table refuses (an event out of order, a command it does not allow).
    Illegal(String),
    NotFound,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::SessionGone => f.write_str("session gone"),
            Refusal::NotLockHolder => f.write_str("not the lock holder"),
            Refusal::StaleGeneration => f.write_str("stale generation"),
            Refusal::NodeLockLost => f.write_str("node lock lost"),
            Refusal::StaleEpoch => f.write_str("stale epoch"),
            Refusal::EpochRetired => f.write_str("epoch retired"),
            Refusal::NotRunning => f.write_str("not running"),
            Refusal::AlreadyStarted => f.write_str("already started"),
            Refusal::BackingOff => f.write_str("backing off"),
            Refusal::VersionConflict => f.write_str("version conflict"),
            Refusal::Illegal(why) => write!(f, "illegal: {why}"),
            Refusal::NotFound => f.write_str("not found"),
        }
    }
}

impl From<taskpod_core::Error> for Refusal {
    fn from(e: taskpod_core::Error) -> Self {
        use taskpod_core::Error as E;
        match e {
            E::NotRunning(_) => Refusal::NotRunning,
            E::AlreadyStarted(_) => Refusal::AlreadyStarted,
            E::TaskNotFound(_) => Refusal::NotFound,
            E::VersionConflict { .. } => Refusal::VersionConflict,
            E::StaleEpoch { .. } => Refusal::StaleEpoch,
            E::StaleGeneration { .. } => Refusal::StaleGeneration,
            E::NodeFenced(_) => Refusal::NodeLockLost,
            E::BackingOff { .. } => Refusal::BackingOff,
            other => Refusal::Illegal(other.to_string()),
        }
    }
}
