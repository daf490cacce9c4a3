//! Pod epochs fence every write of a pod:
//! - `epochs-increase`: `pod_started` epochs are unique and increase along the stream,
//!   none above the head's `pod_epoch`; and the epochs events were written under
//!   (`metadata.epoch`) never go back (a write under an older epoch after a newer one
//!   is a zombie's);
//! - `no-write-after-crash`: once `pod_crashed` of epoch e is written (`node_lost`
//!   included: it is a `pod_crashed` of kind `node_lost`), no later transaction writes
//!   anything under e, nor records e's loss again. Events of the crash's own
//!   transaction (the `task_failed` of a spent budget, tagged with e) are part of
//!   recording it, not writes after it;
//! - `crash-row-matches-event`: every `pod_crashes` row has its `pod_crashed` event
//!   (same epoch and kind) and every event its row: they are written in one
//!   transaction.

use std::collections::BTreeMap;

use super::oracle::EventRow;
use super::{Input, Violation};

pub fn check(input: &Input<'_>) -> Vec<Violation> {
    let snapshot = input.snapshot;
    let mut out = Vec::new();
    for id in snapshot.tasks.keys() {
        let events = snapshot.events_of(id);
        let head_epoch = snapshot.heads.get(id).map_or(0, |h| h.pod_epoch);
        let v =
            |invariant, summary: String| Violation::new(invariant, Some(id.to_string()), summary);
        let all = || {
            events
                .iter()
                .map(|e| format!("  {}", snapshot.event_line(e)))
        };

        // Started epochs: strictly increasing, never above the head's.
        let mut last_started: Option<&EventRow> = None;
        for event in events.iter().filter(|e| e.kind == "pod_started") {
            let epoch = event.data_epoch().unwrap_or_default();
            if let Some(prev) = last_started
                && prev.data_epoch().unwrap_or_default() >= epoch
            {
                out.push(
                    v(
                        "epochs-increase",
                        format!(
                            "pod_started of epoch {epoch} after one of epoch {}",
                            prev.data_epoch().unwrap_or_default()
                        ),
                    )
                    .with([
                        format!("  {}", snapshot.event_line(prev)),
                        format!("  {}", snapshot.event_line(event)),
                    ]),
                );
            }
            if epoch > head_epoch {
                out.push(
                    v(
                        "epochs-increase",
                        format!("pod_started of epoch {epoch} above the head's {head_epoch}"),
                    )
                    .with(snapshot.rows(id)),
                );
            }
            last_started = Some(event);
        }

        // Writers' epochs never go back.
        let mut newest: Option<&EventRow> = None;
        for event in events.iter().filter(|e| e.epoch.is_some()) {
            if let Some(prev) = newest
                && event.epoch < prev.epoch
            {
                out.push(
                    v(
                        "epochs-increase",
                        format!(
                            "{} written under epoch {:?} after a write under epoch {:?}",
                            event.kind, event.epoch, prev.epoch
                        ),
                    )
                    .with([
                        format!("  {}", snapshot.event_line(prev)),
                        format!("  {}", snapshot.event_line(event)),
                    ]),
                );
            }
            if newest.is_none_or(|p| event.epoch > p.epoch) {
                newest = Some(event);
            }
        }

        // Nothing under a crashed epoch afterwards.
        for (at, crash) in events
            .iter()
            .enumerate()
            .filter(|(_, e)| e.kind == "pod_crashed")
        {
            let Some(epoch) = crash.data_epoch() else {
                out.push(
                    v(
                        "no-write-after-crash",
                        "pod_crashed without an epoch".into(),
                    )
                    .with(all()),
                );
                continue;
            };
            let later: Vec<&EventRow> = events[at + 1..]
                .iter()
                .filter(|e| e.tx != crash.tx)
                .filter(|e| e.epoch == Some(epoch) || e.data_epoch() == Some(epoch))
                .collect();
            if !later.is_empty() {
                let mut violation = v(
                    "no-write-after-crash",
                    format!(
                        "{} event(s) under epoch {epoch} after its pod_crashed (v{}, {})",
                        later.len(),
                        crash.version,
                        crash
                            .data
                            .get("kind")
                            .and_then(|k| k.as_str())
                            .unwrap_or("?")
                    ),
                )
                .with([format!("  crash: {}", snapshot.event_line(crash))]);
                violation.evidence.extend(
                    later
                        .iter()
                        .map(|e| format!("  after: {}", snapshot.event_line(e))),
                );
                violation.evidence.extend(
                    snapshot
                        .crashes_of(id)
                        .iter()
                        .map(|c| format!("  {}", snapshot.crash_line(c))),
                );
                out.push(violation);
            }
        }

        // Crash rows and pod_crashed events agree.
        let rows: BTreeMap<i64, &str> = snapshot
            .crashes_of(id)
            .iter()
            .map(|c| (c.epoch, c.kind.as_str()))
            .collect();
        let mut recorded: BTreeMap<i64, &str> = BTreeMap::new();
        for event in events.iter().filter(|e| e.kind == "pod_crashed") {
            if let Some(epoch) = event.data_epoch() {
                let kind = event
                    .data
                    .get("kind")
                    .and_then(|k| k.as_str())
                    .unwrap_or("?");
                recorded.insert(epoch, kind);
            }
        }
        if rows != recorded {
            out.push(
                v(
                    "crash-row-matches-event",
                    format!("crash rows {rows:?} but pod_crashed events {recorded:?}"),
                )
                .with(
                    snapshot
                        .crashes_of(id)
                        .iter()
                        .map(|c| format!("  {}", snapshot.crash_line(c))),
                )
                .with(all().filter(|l| l.contains("pod_crashed"))),
            );
        }
    }
    out
}
