//! Every task ends, and ends within its budgets:
//! - `terminal-in-time`: after healing, every task is terminal within the settle
//!   timeout (the hang detector; the wait itself is the storm's);
//! - `terminal-pod-state-none`: no terminal task keeps a pod (`pod_state` other than
//!   `none`);
//! - `crash-budget`: within any restart window, a task has at most
//!   `max_restart_attempts + 1` handler crashes (the one past the budget fails it) and
//!   at most `max_node_losses + 1` node losses, with the task's own `metadata.restart`
//!   tightening the workers' settings as the store does;
//! - `budget-not-spent-early`: a task failed for a spent budget really had that many
//!   crashes in a window;
//! - `interrupted-only-by-outage`: a pod loss is charged to no budget (`interrupted`)
//!   only when the store went down while the pod lived ("an interruption that hits
//!   every node at once"), or when its own node recorded it (a drain's cut-off, a pod
//!   whose mint answer or last record was lost: nothing was lost to a dead node); a
//!   pod lost while Postgres stayed up (its one worker killed, paused, cut off or
//!   fenced) is `node_lost`, charged to the poison budget.

use std::time::Duration;

use super::oracle::{CrashRow, TaskRow, clock};
use super::{Budget, Input, Violation};

const TERMINAL: [&str; 3] = ["completed", "cancelled", "failed"];
/// Clock slack when lining fault times up with Postgres's timestamps (one machine,
/// one clock; this covers scheduling and the time a fault takes to act).
const CLOCK_SLACK_MS: i64 = 1_000;

/// The most crashes of `kind` within any `window`.
fn most_in_window(crashes: &[CrashRow], kind: &str, window: Duration) -> usize {
    let mut times: Vec<i64> = crashes
        .iter()
        .filter(|c| c.kind == kind)
        .map(|c| c.at_ms)
        .collect();
    times.sort_unstable();
    let window = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
    (0..times.len())
        .map(|i| {
            times[..=i]
                .iter()
                .filter(|t| **t > times[i].saturating_sub(window))
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// The workers' budget as this task's metadata tightens it.
fn effective(budget: &Budget, task: &TaskRow) -> (u32, Duration) {
    let attempts = task
        .max_restart_attempts
        .map_or(budget.max_restart_attempts, |n| {
            n.min(budget.max_restart_attempts)
        });
    let window = task
        .restart_window_seconds
        .map_or(budget.restart_window, |s| {
            budget.restart_window.max(Duration::from_secs(s))
        });
    (attempts, window)
}

pub fn check(input: &Input<'_>) -> Vec<Violation> {
    let snapshot = input.snapshot;
    let mut out = Vec::new();
    for (id, task) in &snapshot.tasks {
        let v =
            |invariant, summary: String| Violation::new(invariant, Some(id.to_string()), summary);
        let crash_lines = || {
            snapshot
                .crashes_of(id)
                .iter()
                .map(|c| format!("  {}", snapshot.crash_line(c)))
                .collect::<Vec<_>>()
        };
        // The head decides (the listing row is checked against it elsewhere).
        let head = snapshot.heads.get(id);
        let (status, phase) = head.map_or((&task.status, &task.phase), |h| (&h.status, &h.phase));
        let terminal = TERMINAL.contains(&status.as_str());
        if !terminal {
            out.push(
                v(
                    "terminal-in-time",
                    format!(
                        "still {status} (phase {phase}) {:?} after healing",
                        input.settle_timeout
                    ),
                )
                .with(snapshot.rows(id))
                .with(snapshot.tail(id, 8))
                .with(crash_lines()),
            );
        }
        if terminal && head.is_some_and(|h| h.pod_state != "none") {
            out.push(
                v(
                    "terminal-pod-state-none",
                    format!(
                        "{status} with pod_state {}",
                        head.map_or("?", |h| h.pod_state.as_str())
                    ),
                )
                .with(snapshot.rows(id))
                .with(snapshot.tail(id, 6)),
            );
        }

        let crashes = snapshot.crashes_of(id);
        let (attempts, window) = effective(input.budget, task);
        let handler = most_in_window(crashes, "handler", window);
        let lost = most_in_window(crashes, "node_lost", window);
        let handler_limit = attempts as usize + 1;
        let lost_limit = input.budget.max_node_losses as usize + 1;
        if handler > handler_limit || lost > lost_limit {
            out.push(
                v(
                    "crash-budget",
                    format!(
                        "{handler} handler crashes (limit {handler_limit}) and {lost} node losses \
                         (limit {lost_limit}) within {window:?}"
                    ),
                )
                .with(snapshot.rows(id))
                .with(crash_lines()),
            );
        }
        for crash in crashes.iter().filter(|c| c.kind == "interrupted") {
            let events = snapshot.events_of(id);
            let by_its_own_node = crash.node.is_some_and(|node| {
                let own = format!("worker:{node}");
                events.iter().any(|e| {
                    e.kind == "pod_crashed" && e.data_epoch() == Some(crash.epoch) && e.actor == own
                })
            });
            if by_its_own_node {
                continue;
            }
            let started = events
                .iter()
                .find(|e| e.kind == "pod_started" && e.data_epoch() == Some(crash.epoch));
            // Minted but never started: it lived at least since the event before the
            // loss was recorded.
            let since = started.map(|e| e.recorded_ms).or_else(|| {
                events
                    .iter()
                    .filter(|e| e.recorded_ms <= crash.at_ms && e.kind != "pod_crashed")
                    .map(|e| e.recorded_ms)
                    .next_back()
            });
            let Some(since) = since else { continue };
            let outage = input.store_outages.iter().any(|(down, up)| {
                *down <= crash.at_ms + CLOCK_SLACK_MS && *up >= since - CLOCK_SLACK_MS
            });
            if !outage {
                let mut violation = v(
                    "interrupted-only-by-outage",
                    format!(
                        "epoch {} lost as interrupted (charged to no budget), but the store did \
                         not go down between {} and {}",
                        crash.epoch,
                        clock(since),
                        clock(crash.at_ms)
                    ),
                )
                .with([format!("  {}", snapshot.crash_line(crash))]);
                violation
                    .evidence
                    .extend(started.map(|e| format!("  {}", snapshot.event_line(e))));
                violation.evidence.push(format!(
                    "  store outages: {}",
                    input
                        .store_outages
                        .iter()
                        .map(|(d, u)| format!("{}..{}", clock(*d), clock(*u)))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                out.push(violation);
            }
        }
        let error = task.last_error.as_deref().unwrap_or_default();
        let early = (error.starts_with("restart budget spent") && handler < handler_limit)
            || (error.starts_with("poison budget spent") && lost < lost_limit);
        if status == "failed" && early {
            out.push(
                v(
                    "budget-not-spent-early",
                    format!(
                        "failed as {error:?} with {handler} handler crashes (budget {attempts} \
                         restarts) and {lost} node losses (budget {}) within {window:?}",
                        input.budget.max_node_losses
                    ),
                )
                .with(snapshot.rows(id))
                .with(crash_lines()),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crash(kind: &str, at_ms: i64) -> CrashRow {
        CrashRow {
            epoch: at_ms,
            kind: kind.into(),
            reason: String::new(),
            node: None,
            at_ms,
        }
    }

    #[test]
    fn crashes_are_counted_in_a_sliding_window() {
        let rows = [
            crash("handler", 0),
            crash("handler", 500),
            crash("node_lost", 600),
            crash("handler", 2_000),
            crash("handler", 2_400),
        ];
        assert_eq!(most_in_window(&rows, "handler", Duration::from_secs(1)), 2);
        assert_eq!(most_in_window(&rows, "handler", Duration::from_secs(10)), 4);
        assert_eq!(
            most_in_window(&rows, "node_lost", Duration::from_secs(10)),
            1
        );
        assert_eq!(most_in_window(&[], "handler", Duration::from_secs(10)), 0);
    }
}
