//! The `exec` programs of a chaos run, and the log they leave.
//!
//! Every program is a shell script whose **grandchild** (a background subshell, in
//! the program's process group) appends `<task_id> <epoch> <unix-millis>` to
//! `{dir}/exec.log` every 100 ms while the phase runs, then the script exits: 0 moves
//! on, 1 is a crash (restarted within the budget), 3 fails the task. A grandchild, not
//! the script itself, because the bound on overlapping runs must hold for a program's
//! whole process tree: a worker that dies takes its direct child along
//! (`PR_SET_PDEATHSIG`), not the child's children. From the log,
//! [`super::overlap`] computes how long two epochs of one task ran at once.
//!
//! bash rather than dash only for `$EPOCHREALTIME`: a timestamp without a fork per
//! line, which keeps dozens of concurrent programs cheap on two cores.

use crate::cluster::ProgramSpec;

/// The log every program appends to, under the programs folder.
pub const EXEC_LOG: &str = "exec.log";

/// Milliseconds each phase's run lasts, unless a program says otherwise.
const PHASE_MS: u64 = 400;

/// `@PHASE_MS@`, `@DEV_MS@`, `@ECHO@`, `@STDOUT@` and `@EXIT@` are filled in per
/// program; `{dir}` by the cluster.
const TEMPLATE: &str = r#"#!/bin/bash
# @NAME@: @ABOUT@
# Written by the taskpod chaos harness (tests/src/chaos/programs.rs).
phase_ms=@PHASE_MS@
[ "$TASKPOD_PHASE" = development ] && phase_ms=@DEV_MS@
(
  n=$((phase_ms / 100))
  while [ "$n" -gt 0 ]; do
    t=${EPOCHREALTIME/./}
    echo "$TASKPOD_TASK_ID $TASKPOD_EPOCH ${t:0:13}" >> "{dir}/exec.log"
    @ECHO@
    sleep 0.1
    n=$((n - 1))
  done
) </dev/null >@STDOUT@ 2>&1 &
wait $!
@EXIT@
"#;

/// A program of the mix: its name and what tasks running it are expected to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    /// Every phase succeeds.
    Steady,
    /// Each phase's run crashes (exit 1) with probability 15%.
    Flaky,
    /// A 20 s development phase: long enough that a worker dying mid-phase leaves an
    /// orphaned grandchild logging beside the adopted pod's run.
    Long,
    /// Always crashes in planning; tasks carry a restart budget of 2, so each fails
    /// after exactly 3 handler crashes.
    Doomed,
    /// Exits with the fail code (3) in review: the task fails at once.
    Fatal,
    /// An 8 s development phase whose run also prints a line every 100 ms on stdout
    /// (stored as the task's output, per epoch): runs across a network cut, and shows
    /// whether output is written under an epoch that already ended.
    Span,
}

impl Program {
    pub const ALL: [Program; 6] = [
        Program::Steady,
        Program::Flaky,
        Program::Long,
        Program::Doomed,
        Program::Fatal,
        Program::Span,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Program::Steady => "steady",
            Program::Flaky => "flaky",
            Program::Long => "long",
            Program::Doomed => "doomed",
            Program::Fatal => "fatal",
            Program::Span => "span",
        }
    }

    /// `metadata.restart` for tasks running it, when it needs its own budget.
    pub fn restart_limit(self) -> Option<u32> {
        match self {
            Program::Doomed => Some(2),
            _ => None,
        }
    }

    fn about(self) -> &'static str {
        match self {
            Program::Steady => "every phase succeeds",
            Program::Flaky => "each phase crashes (exit 1) 15% of the time",
            Program::Long => "a 20 s development phase",
            Program::Doomed => "always crashes in planning",
            Program::Fatal => "fails the task (exit 3) in review",
            Program::Span => "an 8 s development phase that also prints to stdout",
        }
    }

    fn dev_ms(self) -> u64 {
        match self {
            Program::Long => 20_000,
            Program::Span => 8_000,
            _ => PHASE_MS,
        }
    }

    fn exit(self) -> &'static str {
        match self {
            Program::Steady | Program::Long | Program::Span => "exit 0",
            Program::Flaky => "[ $((RANDOM % 100)) -lt 15 ] && exit 1\nexit 0",
            Program::Doomed => "[ \"$TASKPOD_PHASE\" = planning ] && exit 1\nexit 0",
            Program::Fatal => "[ \"$TASKPOD_PHASE\" = review ] && exit 3\nexit 0",
        }
    }

    pub fn spec(self) -> ProgramSpec {
        ProgramSpec {
            name: self.name().to_owned(),
            script: TEMPLATE
                .replace("@NAME@", self.name())
                .replace("@ABOUT@", self.about())
                .replace("@PHASE_MS@", &PHASE_MS.to_string())
                .replace("@DEV_MS@", &self.dev_ms().to_string())
                .replace("@EXIT@", self.exit())
                .replace(
                    "@ECHO@",
                    if self == Program::Span {
                        "echo \"span $TASKPOD_EPOCH $n\""
                    } else {
                        ":"
                    },
                )
                .replace(
                    "@STDOUT@",
                    if self == Program::Span {
                        "&1"
                    } else {
                        "/dev/null"
                    },
                ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_script_is_filled_in() {
        for program in Program::ALL {
            let script = program.spec().script;
            assert!(!script.contains('@'), "{script}");
            assert!(script.contains("{dir}/exec.log"), "{script}");
        }
    }
}
