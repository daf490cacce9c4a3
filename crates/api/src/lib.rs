//! taskpod's API server (`taskpod-api`): authenticates callers, executes lifecycle
//! commands through the store's `execute` path, reads tasks for get/list/count and
//! streams status. It holds no task state of its own.
//!
//! Layout:
//! - [`settings`]: the typed, layered configuration;
//! - [`auth`]: bearer tokens -> principal, and the request context of changes;
//! - [`errors`]: domain errors -> gRPC statuses with google.rpc details;
//! - [`page_token`]: signed, opaque page and resume tokens;
//! - [`pods`]: waiting for pods in StartPod, StopPod and RestartPod;
//! - [`kinds`]: the kinds (and exec programs) some worker offers;
//! - [`service`]: the `taskpod.v1.TaskService` handlers;
//! - [`watch`]: WatchTask and WatchTasks relays;
//! - [`hub`]: one per replica: tells relays when to look again (Redis, or one poll);
//! - [`rpc_telemetry`]: the server span and duration metric of every call;
//! - [`server`]: health, reflection, TLS, `/metrics`, graceful drain.

pub mod admission;
pub mod auth;
pub mod errors;
pub mod hub;
pub mod kinds;
pub mod listing;
pub mod oversized;
pub mod page_token;
pub mod pods;
pub mod rpc_telemetry;
pub mod server;
pub mod service;
pub mod settings;
pub mod watch;

pub use server::{ServeError, serve};
pub use settings::ApiSettings;
