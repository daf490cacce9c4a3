//! taskpod's worker node (`taskpod-worker`): owns partitions through advisory locks on a
//! dedicated session, mints pod epochs with `Store::mint_pod`, runs and supervises pods,
//! records crashes and adopts the pods of dead peers.
//!
//! The runtime lands with the worker issue; the store operations it needs (fenced
//! appends, mints, partition claims) are in `taskpod_core::store` and tested there.
