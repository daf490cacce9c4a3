//! The heart of taskpod, shared by the API and the worker.
//!
//! The domain ([`domain`]) is pure: the task state model as `decide`/`evolve`
//! functions, validation and the restart policy, with no I/O. The adapters depend on
//! it, never the other way round: [`store`] is the Postgres event store with task heads
//! and listing rows.
//!
//! Layout:
//! - [`domain`]: ids, status and phase, events, commands, the state table, validation,
//!   partition hashing, the restart policy;
//! - [`batch`]: group commit, concurrent callers sharing one flush;
//! - [`bus`]: the Redis status bus (publish after commit, reconnecting subscriptions);
//! - [`config`]: the `TASKPOD_*` environment layer of every binary's settings;
//! - [`error`]: the one error enum every layer above maps from;
//! - [`process`]: the shape of every server's `main`: telemetry, runtime, signals;
//! - [`store`]: Postgres (sqlx): create, execute, append, read, list, count;
//! - [`telemetry`]: logs, OTLP traces and metrics, `/metrics`, span conventions.

pub mod batch;
pub mod bus;
pub mod config;
pub mod domain;
pub mod error;
pub mod process;
pub mod store;
pub mod telemetry;

pub use error::Error;
