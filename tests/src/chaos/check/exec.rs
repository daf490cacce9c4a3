//! `exec-overlap-bound`: two epochs of one task never ran their program (its whole
//! process tree) at once for longer than the run's bound (the documented overlap for
//! its settings plus slack; [`crate::chaos::overlap::EXEC_OVERLAP_BOUND`] in the
//! storm), measured from the lines the programs' grandchildren logged (see
//! [`crate::chaos::overlap`]).

use std::collections::BTreeMap;
use std::time::Duration;

use uuid::Uuid;

use super::{Input, Violation};
use crate::chaos::overlap;

pub fn check(input: &Input<'_>) -> (Vec<Violation>, BTreeMap<&'static str, String>) {
    let snapshot = input.snapshot;
    let bound = input.exec_overlap_bound;
    let found = overlap::overlaps(input.exec_lines);
    let mut figures = BTreeMap::new();
    figures.insert("exec log lines", input.exec_lines.len().to_string());
    figures.insert("tasks whose exec runs overlapped", found.len().to_string());
    figures.insert(
        "longest exec overlap",
        format!(
            "{:?} (bound {bound:?})",
            found
                .iter()
                .map(overlap::Overlap::duration)
                .max()
                .unwrap_or(Duration::ZERO)
        ),
    );
    let mut out = Vec::new();
    for o in found.iter().filter(|o| o.duration() > bound) {
        let id = Uuid::parse_str(&o.task).ok();
        let epochs: Vec<i64> = o.segments.iter().map(|s| s.epoch).collect();
        let mut v = Violation::new(
            "exec-overlap-bound",
            Some(o.task.clone()),
            format!(
                "epochs {epochs:?} ran at once for {:?} (from {} to {} unix ms), bound {bound:?}",
                o.duration(),
                o.start_ms,
                o.end_ms
            ),
        );
        for s in &o.segments {
            v.evidence.push(format!(
                "  epoch {} logged {} lines from {} to {} ({:?})",
                s.epoch,
                s.lines,
                s.start_ms,
                s.end_ms,
                Duration::from_millis(s.end_ms - s.start_ms)
            ));
        }
        if let Some(id) = id {
            for event in snapshot.events_of(&id) {
                let about = event.data_epoch().or(event.epoch);
                if matches!(
                    event.kind.as_str(),
                    "pod_started" | "pod_crashed" | "pod_stopped"
                ) && about.is_some_and(|e| epochs.contains(&e))
                {
                    v.evidence.push(format!("  {}", snapshot.event_line(event)));
                }
            }
            v.evidence.extend(snapshot.rows(&id));
        }
        out.push(v);
    }
    (out, figures)
}
