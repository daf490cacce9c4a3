//! `adoption-waits-fence-margin`: the program of a pod adopted from a lost node starts
//! only after the fence margin (`docs/architecture.md`, "Side effects": the adopter
//! waits P + T + G + K, 4.3 s by default, before running it), counted from the
//! transaction that recorded the loss. The overlap check cannot see a margin skipped
//! while the old owner fenced itself in time (nothing overlaps then); this sees it.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::chaos::check::Violation;
use crate::chaos::check::oracle::{Snapshot, clock};
use crate::chaos::overlap::LogLine;

/// Clock granularity between Postgres's `now()` and the programs' log lines.
const SLACK_MS: i64 = 100;

pub fn check(snapshot: &Snapshot, exec_lines: &[LogLine], margin: Duration) -> Vec<Violation> {
    let margin_ms = i64::try_from(margin.as_millis()).unwrap_or(i64::MAX);
    let mut first_line: BTreeMap<(&str, i64), u64> = BTreeMap::new();
    for line in exec_lines {
        let at = first_line
            .entry((line.task.as_str(), line.epoch))
            .or_insert(line.at_ms);
        *at = (*at).min(line.at_ms);
    }
    let mut out = Vec::new();
    for (task, crashes) in &snapshot.crashes {
        let id = task.to_string();
        for lost in crashes.iter().filter(|c| c.kind == "node_lost") {
            let successor = first_line
                .range((id.as_str(), lost.epoch + 1)..=(id.as_str(), i64::MAX))
                .map(|((_, epoch), at)| (*epoch, i64::try_from(*at).unwrap_or(i64::MAX)))
                .min_by_key(|(_, at)| *at);
            let Some((epoch, started)) = successor else {
                continue;
            };
            if started + SLACK_MS < lost.at_ms + margin_ms {
                out.push(
                    Violation::new(
                        "adoption-waits-fence-margin",
                        Some(id.clone()),
                        format!(
                            "epoch {epoch}'s program ran at {}, {} ms after epoch {}'s loss was \
                             recorded at {} (fence margin {margin:?})",
                            clock(started),
                            started - lost.at_ms,
                            lost.epoch,
                            clock(lost.at_ms)
                        ),
                    )
                    .with([format!("  {}", snapshot.crash_line(lost))])
                    .with(
                        snapshot
                            .events_of(task)
                            .iter()
                            .filter(|e| e.kind.starts_with("pod_"))
                            .map(|e| format!("  {}", snapshot.event_line(e))),
                    ),
                );
            }
        }
    }
    out
}
