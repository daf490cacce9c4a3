//! The environment layer every binary's settings share.
//!
//! `TASKPOD_*` variables configure several programs at once (the CLI reads
//! `TASKPOD_ADDRESS`, the servers `TASKPOD_STORE__URL`, ...), so each binary takes only
//! the variables whose first segment names one of its own top-level settings; the rest
//! belong to someone else and are ignored rather than refused. Keys inside a section it
//! owns are still checked strictly (`deny_unknown_fields`), as is every key of a file.

use figment::providers::Env;

/// `TASKPOD_*` variables for the settings whose top-level keys are `known`, with `__`
/// nesting (`TASKPOD_STORE__URL` -> `store.url`).
pub fn env_layer(known: &'static [&'static str]) -> Env {
    Env::prefixed("TASKPOD_")
        .filter(move |key| {
            let first = key.as_str().split("__").next().unwrap_or_default();
            known.iter().any(|k| k.eq_ignore_ascii_case(first))
        })
        .split("__")
}
