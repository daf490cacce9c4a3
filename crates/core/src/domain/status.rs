//! Status, phase and pod state: the three enums the state table is keyed by.
//!
//! Each has one stable lowercase spelling, used in the database, in events and (mapped
//! to proto enums) on the wire; `as_str`/`FromStr` are the only conversions.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(&self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(UnknownValue { kind: stringify!($name), value: other.to_owned() }),
                }
            }
        }
    };
}

/// A string that names no value of the enum it was parsed as.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?}")]
pub struct UnknownValue {
    pub kind: &'static str,
    pub value: String,
}

string_enum! {
    /// Whether a pod is wanted for the task, or how the task ended.
    Status {
        /// No pod wanted.
        Inactive => "inactive",
        /// A pod is wanted or running.
        Active => "active",
        Completed => "completed",
        Cancelled => "cancelled",
        /// Ended by a handler's `Fail`, or by a spent restart budget.
        Failed => "failed",
    }
}

impl Status {
    /// Terminal statuses never change again.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Status::Completed | Status::Cancelled | Status::Failed)
    }

    /// Whether a task in this status can be in `phase`: a terminal status has the phase
    /// of its name, a live one any working phase. The state table keeps this for every
    /// task (`tests/state_model.rs`), and listings rely on it to skip the statuses a
    /// phase filter rules out.
    pub fn holds_phase(&self, phase: Phase) -> bool {
        match self {
            Status::Completed => phase == Phase::Completed,
            Status::Cancelled => phase == Phase::Cancelled,
            Status::Failed => phase == Phase::Failed,
            Status::Inactive | Status::Active => !phase.is_terminal(),
        }
    }
}

string_enum! {
    /// Where the work stands: `spec_clarification -> planning -> development -> review ->
    /// completed`, with `review -> development` for rework.
    Phase {
        SpecClarification => "spec_clarification",
        Planning => "planning",
        Development => "development",
        Review => "review",
        Completed => "completed",
        Cancelled => "cancelled",
        Failed => "failed",
    }
}

impl Phase {
    pub fn is_terminal(&self) -> bool {
        matches!(self, Phase::Completed | Phase::Cancelled | Phase::Failed)
    }

    /// Whether `self -> to` is an edge of the phase graph that TransitionPhase (or a
    /// handler) may take. Reaching `completed` this way completes the task; `cancelled`
    /// and `failed` are reached only by CancelTask and by failure.
    pub fn can_move_to(&self, to: Phase) -> bool {
        use Phase::*;
        matches!(
            (self, to),
            (SpecClarification, Planning)
                | (Planning, Development)
                | (Development, Review)
                | (Review, Development)
                | (Review, Completed)
        )
    }
}

string_enum! {
    /// The pod's runtime state, kept on the task head.
    PodState {
        None => "none",
        /// An epoch was minted; the handler has not got its slot yet.
        Starting => "starting",
        Running => "running",
        Stopping => "stopping",
    }
}
