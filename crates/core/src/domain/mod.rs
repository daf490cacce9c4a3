//! The task domain: no I/O, no sqlx, no tonic.
//!
//! Layout:
//! - [`ids`]: id newtypes;
//! - [`status`]: status, phase and pod state enums;
//! - [`event`]: the event types and their metadata;
//! - [`command`]: what callers ask for;
//! - [`state`]: the status x phase x command table as `decide`/`evolve`;
//! - [`validation`]: input limits, shared by the API and the store;
//! - [`filter`]: AIP-160 filter strings for listing, counting and watching tasks;
//! - [`partition`]: the stable task -> partition hash;
//! - [`restart`]: the crash budget and backoff.

pub mod command;
pub mod event;
pub mod filter;
pub mod ids;
pub mod partition;
pub mod restart;
pub mod state;
pub mod status;
pub mod validation;

pub use command::Command;
pub use event::{Event, EventMetadata, Writer};
pub use ids::{NodeId, TaskId};
pub use state::{KINDS, MANUAL_KIND, TaskState, decide, evolve, mint_pod};
pub use status::{Phase, PodState, Status};
pub mod request;
pub mod task;

pub use request::RequestContext;
pub use task::{NewTask, PodInfo, Task};
