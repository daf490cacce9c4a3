//! The worker's decisions, as pure functions: which partitions to claim and hand back
//! ([`membership`]), and what to do with each task a check reads ([`pods`]).
//!
//! Nothing here does I/O or reads a clock: the controller gathers what the store, the
//! lock session and the pod table say, asks the planner, and carries out its answer.
//! That split is what lets the rules be unit- and property-tested, and lets the
//! ownership simulation (`tests/ownership_sim.rs`) run the very same rules against an
//! in-memory model of the store under thousands of seeded fault schedules.

pub mod membership;
pub mod pods;

pub use membership::{Member, Placement, claimable, hand_backs, placement};
pub use pods::{Loss, LostPod, NodeView, Plan, PodSlot, Start, TaskView, plan};
