//! Zero writes under a stale epoch, on top of the storm's epoch checks (which cover
//! writes after a `pod_crashed` and writes under an older epoch than one already
//! written):
//! - `no-write-after-stop`: once `pod_stopped` of epoch e is written, no other
//!   transaction writes an event under e (`metadata.epoch`, or `data.epoch` of a pod
//!   event): a pod's last word is its stop;
//! - `no-output-after-end`: no `exec` output chunk of epoch e is stored by a
//!   transaction that began after e ended (its `pod_stopped` or `pod_crashed`, or a
//!   newer epoch's `pod_started`). A cut that loses only the replies lets a cut-off
//!   worker's statements reach Postgres and commit, so this is where a write that
//!   is not fenced would show.

use std::collections::BTreeMap;

use sqlx::PgPool;
use uuid::Uuid;

use crate::chaos::check::Violation;
use crate::chaos::check::oracle::{Snapshot, clock};

/// One stored output chunk: task, epoch, seq, when its transaction began (unix ms).
pub type Chunk = (Uuid, i64, i32, i64);

/// Every output chunk.
///
/// # Errors
/// When Postgres cannot be queried.
pub async fn output_chunks(pool: &PgPool) -> anyhow::Result<Vec<Chunk>> {
    Ok(sqlx::query_as(
        "SELECT task_id, epoch, seq, (extract(epoch FROM at) * 1000)::bigint FROM task_output",
    )
    .fetch_all(pool)
    .await?)
}

pub fn check(snapshot: &Snapshot, chunks: &[Chunk]) -> Vec<Violation> {
    let mut out = Vec::new();
    // When each (task, epoch) ended, by the first event that ended it.
    let mut ended: BTreeMap<(Uuid, i64), i64> = BTreeMap::new();
    for (task, events) in &snapshot.events {
        let mut epochs: Vec<i64> = events.iter().filter_map(|e| e.data_epoch()).collect();
        epochs.sort_unstable();
        epochs.dedup();
        for e in events {
            let Some(epoch) = e.data_epoch() else {
                continue;
            };
            let ends: Vec<i64> = match e.kind.as_str() {
                "pod_stopped" | "pod_crashed" => vec![epoch],
                "pod_started" => epochs.iter().copied().filter(|o| *o < epoch).collect(),
                _ => Vec::new(),
            };
            for old in ends {
                ended.entry((*task, old)).or_insert(e.recorded_ms);
            }
        }
        for (at, stop) in events
            .iter()
            .enumerate()
            .filter(|(_, e)| e.kind == "pod_stopped")
        {
            let Some(epoch) = stop.data_epoch() else {
                continue;
            };
            let later: Vec<String> = events[at + 1..]
                .iter()
                .filter(|e| e.tx != stop.tx)
                .filter(|e| e.epoch == Some(epoch) || e.data_epoch() == Some(epoch))
                .map(|e| format!("  after: {}", snapshot.event_line(e)))
                .collect();
            if !later.is_empty() {
                out.push(
                    Violation::new(
                        "no-write-after-stop",
                        Some(task.to_string()),
                        format!(
                            "{} event(s) under epoch {epoch} after its pod_stopped (v{})",
                            later.len(),
                            stop.version
                        ),
                    )
                    .with([format!("  stop: {}", snapshot.event_line(stop))])
                    .with(later),
                );
            }
        }
    }
    let mut late: BTreeMap<(Uuid, i64), Vec<&Chunk>> = BTreeMap::new();
    for chunk in chunks {
        let (task, epoch, _, at) = chunk;
        if ended.get(&(*task, *epoch)).is_some_and(|end| at > end) {
            late.entry((*task, *epoch)).or_default().push(chunk);
        }
    }
    for ((task, epoch), chunks) in late {
        let end = ended.get(&(task, epoch)).copied().unwrap_or_default();
        let mut v = Violation::new(
            "no-output-after-end",
            Some(task.to_string()),
            format!(
                "{} output chunk(s) of epoch {epoch} stored after it ended at {}",
                chunks.len(),
                clock(end)
            ),
        );
        v.evidence.extend(
            chunks
                .iter()
                .map(|(_, _, seq, at)| format!("  chunk seq {seq} at {}", clock(*at))),
        );
        v.evidence.extend(
            snapshot
                .events_of(&task)
                .iter()
                .filter(|e| e.kind.starts_with("pod_"))
                .map(|e| format!("  {}", snapshot.event_line(e))),
        );
        out.push(v);
    }
    out
}
