//! The in-memory store the simulation runs against, and the oracle that re-checks its
//! accepted writes against their history.
//!
//! Layout:
//! - [`locks`]: advisory locks per session, released when the session ends;
//! - [`refusal`]: why a conditional statement refused;
//! - [`store`]: partitions, heads, crash records, nodes: the intended fences;
//! - [`history`]: the oracle, which replays the log of accepted writes and flags any
//!   accepted under a stale epoch or generation, or from a node whose lock was gone.

pub mod history;
pub mod locks;
pub mod refusal;
pub mod store;

pub use history::{History, Stale};
pub use locks::{Key, Locks, SessionGone, SessionId};
pub use refusal::Refusal;
pub use store::{CrashAnswer, Model, NodeRow, PartitionRow, TaskRow, Write};
