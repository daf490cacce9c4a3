//! What a worker runs: its kinds, their concurrency, the `sleep` delays, the `exec`
//! programs and the `exec` guard.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Which kinds this node runs and how.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct HandlerSettings {
    /// Kinds offered; a kind missing here is not run by this node.
    pub kinds: Vec<String>,
    /// Handlers of one kind running at once, per kind; missing kinds are bounded only
    /// by `capacity`.
    pub concurrency: BTreeMap<String, u32>,
    /// Delay of the `sleep` handler in each phase (0 allowed).
    pub sleep_phase_ms: u64,
    /// Programs the `exec` handler may run, by name; clients name one in the payload
    /// (`{"program": "name"}`), never a path.
    pub programs: BTreeMap<String, ProgramSettings>,
    pub exec: ExecSettings,
}

impl Default for HandlerSettings {
    fn default() -> Self {
        Self {
            kinds: vec!["manual".into(), "sleep".into(), "exec".into()],
            concurrency: BTreeMap::new(),
            sleep_phase_ms: 100,
            programs: BTreeMap::new(),
            exec: ExecSettings::default(),
        }
    }
}

/// How `exec` bounds a run's life to its worker's: each run is started under a guard
/// process that kills the run's whole process tree once the worker stops feeding it (see
/// `handlers::exec::guard`). Keep these the same on every worker: an adopting worker
/// waits out the old owner's guard timeout with its own.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ExecSettings {
    /// How often the worker tells each guard it still holds its claim.
    pub feed_interval_ms: u64,
    /// A guard that heard nothing this long kills its run: the bound on how long a
    /// paused (SIGSTOP) or hung worker's programs outlive it.
    pub guard_timeout_ms: u64,
    /// How long an adopted `exec` pod waits before running its program, so that the
    /// old owner's runs are dead first. Unset: ping interval + ping timeout + guard
    /// timeout + kill timeout, which holds whatever Postgres does. A smaller value is
    /// accepted only where it still holds (see [`WorkerSettings::check`]).
    pub fence_margin_ms: Option<u64>,
}

impl Default for ExecSettings {
    fn default() -> Self {
        Self {
            feed_interval_ms: 100,
            guard_timeout_ms: 1_000,
            fence_margin_ms: None,
        }
    }
}

impl ExecSettings {
    /// A late tick of a busy runtime must not kill a healthy run: the timeout spans
    /// several feed intervals.
    pub const MIN_INTERVALS_PER_TIMEOUT: u64 = 4;
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProgramSettings {
    pub path: PathBuf,
    #[serde(default)]
    pub args: Vec<String>,
    /// Each phase's run is killed (and counted as a crash) past this.
    #[serde(default = "default_phase_timeout")]
    pub phase_timeout_ms: u64,
    /// This exit code means Fail (terminal); 0 moves on; anything else is Retry.
    #[serde(default = "default_fail_code")]
    pub fail_exit_code: i32,
}

fn default_phase_timeout() -> u64 {
    60_000
}

fn default_fail_code() -> i32 {
    3
}
