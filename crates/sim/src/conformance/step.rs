//! The operations of a conformance run and the answers compared.

use std::fmt;

use taskpod_core::domain::Command;
use taskpod_core::domain::restart::CrashKind;

/// A pod event, built on each side from the same model state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodEvent {
    Started,
    /// The next phase (or completion from review).
    Advance,
    Stopped,
}

/// One operation. `node` is a node slot; `inc` one of its incarnations (the newest, or
/// an older one whose session died: a zombie acting on stale memory).
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// A new incarnation: a new lock session, a node row, its node key.
    Connect {
        node: usize,
    },
    /// The server ends the slot's current session (a terminated backend).
    KillSession {
        node: usize,
    },
    /// `pg_try_advisory_lock` of a partition key on the slot's current session.
    TryLock {
        node: usize,
        partition: i32,
    },
    Unlock {
        node: usize,
        partition: i32,
    },
    Claim {
        node: usize,
        inc: usize,
        partition: i32,
    },
    Release {
        node: usize,
        inc: usize,
        partition: i32,
        generation: i64,
    },
    Mint {
        node: usize,
        inc: usize,
        task: usize,
        observed_epoch: i64,
        generation: i64,
    },
    Append {
        task: usize,
        epoch: i64,
        version: i64,
        event: PodEvent,
    },
    Crash {
        node: usize,
        inc: usize,
        task: usize,
        epoch: i64,
        generation: i64,
        kind: CrashKind,
        /// Through `record_crashes` (the batch) rather than `record_crash`.
        batch: bool,
    },
    Command {
        task: usize,
        command: Command,
    },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Connect { node } => write!(f, "n{node} connects (new incarnation)"),
            Step::KillSession { node } => write!(f, "server kills n{node}'s lock session"),
            Step::TryLock { node, partition } => write!(f, "n{node} try-locks p{partition}"),
            Step::Unlock { node, partition } => write!(f, "n{node} unlocks p{partition}"),
            Step::Claim {
                node,
                inc,
                partition,
            } => write!(f, "n{node}.{inc} claims p{partition}"),
            Step::Release {
                node,
                inc,
                partition,
                generation,
            } => write!(f, "n{node}.{inc} releases p{partition} at g{generation}"),
            Step::Mint {
                node,
                inc,
                task,
                observed_epoch,
                generation,
            } => write!(
                f,
                "n{node}.{inc} mints t{task} after e{observed_epoch} at g{generation}"
            ),
            Step::Append {
                task,
                epoch,
                version,
                event,
            } => write!(f, "pod of t{task} e{epoch} appends {event:?} at v{version}"),
            Step::Crash {
                node,
                inc,
                task,
                epoch,
                generation,
                kind,
                batch,
            } => write!(
                f,
                "n{node}.{inc} records {} of t{task} e{epoch} at g{generation}{}",
                kind.as_str(),
                if *batch { " (batch)" } else { "" }
            ),
            Step::Command { task, command } => write!(f, "api {} t{task}", command.name()),
        }
    }
}

/// What a side answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Accepted, with what it produced: a generation, an epoch, a version, a lock's
    /// answer, or a crash outcome.
    Accepted(Value),
    /// Refused, and why (not compared: only that it was refused).
    Refused(String),
}

impl Answer {
    pub fn accepted(&self) -> bool {
        matches!(self, Answer::Accepted(_))
    }

    /// Whether two answers agree: both refused, or both accepted with the same value.
    pub fn agrees(&self, other: &Answer) -> bool {
        match (self, other) {
            (Answer::Accepted(a), Answer::Accepted(b)) => a == b,
            (Answer::Refused(_), Answer::Refused(_)) => true,
            _ => false,
        }
    }
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Answer::Accepted(v) => write!(f, "accepted ({v:?})"),
            Answer::Refused(why) => write!(f, "refused ({why})"),
        }
    }
}

/// What an accepted operation produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Done,
    Locked(bool),
    Generation(i64),
    Epoch(i64),
    Version(i64),
    Crash(&'static str),
}
