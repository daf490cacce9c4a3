//! taskpod's API server (`taskpod-api`): validates and authenticates requests, executes
//! lifecycle commands through `taskpod_core::store::Store::execute`, reads tasks for
//! get/list/count and relays status streams. It holds no task state of its own.
//!
//! The gRPC service lands with the API issue; this crate exists now so the workspace
//! has the shape the dependency rules in docs/architecture.md describe.
