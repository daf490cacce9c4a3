//! A seeded, deterministic simulation of taskpod's ownership protocol, and the pieces
//! of its conformance test against the real store.
//!
//! The simulation runs the worker's own planner (`taskpod_worker::planner`: placement,
//! claims, hand-backs, the per-task plan) on simulated nodes against an in-memory model
//! of the store's conditional statements and of Postgres's advisory locks, under
//! seeded faults: crashes, pauses outlasting `idle_session_timeout`, terminated
//! sessions, skewed clocks, lost wake-ups. No tokio, no real time: a logical clock and
//! one seeded generator, so a failing seed replays exactly. Invariants are checked
//! after every step (see [`invariants`]).
//!
//! The conformance test (`tests/conformance.rs`) runs generated sequences of claims,
//! mints, fenced appends, crash records and releases against the model and against
//! Postgres through `taskpod_core::store::Store`, and compares the answers step by
//! step (see [`conformance`]).
//!
//! Layout:
//! - [`time`]: logical time and skewed local clocks;
//! - [`model`]: the model store, its advisory locks, and the history oracle;
//! - [`node`]: simulated workers and their pods;
//! - [`world`]: the scheduler, the API caller, the bus, fault injection;
//! - [`faults`]: which faults, how often;
//! - [`invariants`]: what must hold after every step, and once faults stop;
//! - [`run`]: running seeds, in parallel;
//! - [`config`], [`stats`], [`trace`]: a run's shape, counters and readable account;
//! - [`conformance`]: generated operation sequences and the model's side of the
//!   comparison.

pub mod config;
pub mod conformance;
pub mod faults;
pub mod invariants;
pub mod model;
pub mod node;
pub mod run;
pub mod stats;
pub mod time;
pub mod trace;
pub mod world;

pub use run::{Failure, run_many, run_seed};
