//! The client side of taskpod's command line, shared by the `taskpod` binary and the
//! bench (`taskpod bench`, the `taskpod-bench` library): everything a command needs to
//! reach a cluster and to answer a script, and nothing about any one command.
//!
//! - [`config`]: the global flags and where their values come from (flags, `TASKPOD_*`,
//!   profiles of the config file, defaults);
//! - [`client`]: the connection: one lazily connected channel, the bearer token, the
//!   actor and the per-call deadline;
//! - [`error`]: the one error enum of the client commands and its exit codes, a
//!   contract for scripts (`docs/cli.md`);
//! - [`duration`]: durations on the command line (`500ms`, `5m`, `1h30m`);
//! - [`output`]: the output format flag and writing to stdout.

pub mod client;
pub mod config;
pub mod duration;
pub mod error;
pub mod output;

pub use client::Client;
pub use error::CliError;
