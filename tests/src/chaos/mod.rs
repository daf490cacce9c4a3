//! Chaos testing: a client history, seeded fault schedules, and a checker that holds a
//! cluster's store to what its clients were told and to the design's invariants after
//! a crash storm.
//!
//! - [`history`]: every call as invoke, then ok / fail / unknown;
//! - [`load`]: the clients (creates with request ids, retried with the same id, and
//!   some cancels);
//! - [`programs`] and [`overlap`]: the `exec` programs whose process trees log when
//!   they run, and how long two epochs' runs overlapped;
//! - [`schedule`] and [`inject`]: the seeded fault schedule and carrying it out;
//! - [`check`]: the invariants, with Postgres as the oracle;
//! - [`storm`]: one storm end to end, and the plan (seeds, length) from the
//!   environment;
//! - [`partition`]: one real network partition of a worker or a replica (network
//!   namespaces and nftables), its timeline and its checks;
//! - [`rng`]: the seeded generator behind schedules and mixes;
//! - [`watchers`]: WatchTasks clients that resume through the storm, and the checks
//!   of their histories.

pub mod check;
pub mod history;
pub mod inject;
pub mod laps;
pub mod load;
pub mod overlap;
pub mod partition;
pub mod programs;
pub mod rng;
pub mod schedule;
pub mod storm;
pub mod watchers;
