//! The check: read the tasks of the scope the way the store's candidate queries do,
//! ask `planner::plan`, and carry out its answer (stops at once, crash records and
//! mints as the next round trips).
//!
//! Scopes mirror the store's candidate queries: a full check (every active task and
//! every live pod of the owned partitions, and every pod this node runs) after a
//! claim, a reconnect, or every `full_check`; otherwise the change feed since the last
//! tick (tasks changed that are active or have a live pod in an owned partition, or
//! whose pod is this node's), plus the tasks wake-ups named and the backoffs now over.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use taskpod_core::domain::{PodState, Status, TaskId};
use taskpod_worker::planner::{NodeView, PodSlot, TaskView, plan};

use super::ops::Op;
use super::{Ctx, SimNode};
use crate::model::{Model, TaskRow};

impl SimNode {
    pub(super) fn check(&mut self, cx: &mut Ctx<'_>, tick: bool) {
        let now_l = self.local(cx.now);
        let capacity = self.capacity as usize;
        let Some(inc) = self.inc.as_mut() else {
            return;
        };
        let me = inc.id;
        let full = inc.full_due
            || (tick
                && inc
                    .last_full
                    .is_none_or(|t| now_l.saturating_sub(t) >= cx.timers.full_check));
        let owned: BTreeSet<i32> = inc.owned.keys().copied().collect();
        let running: BTreeSet<TaskId> = inc.pods.keys().copied().collect();
        let mut ids: BTreeSet<TaskId> = BTreeSet::new();
        let due: Vec<TaskId> = inc
            .backoffs
            .iter()
            .filter(|(_, at)| **at <= now_l)
            .map(|(t, _)| *t)
            .collect();
        for t in &due {
            inc.backoffs.remove(t);
        }
        if full {
            inc.full_due = false;
            inc.last_full = Some(now_l);
            inc.woken.clear();
            inc.feed = Some(cx.model.watermark());
            ids.extend(
                cx.model
                    .tasks()
                    .filter(|r| {
                        active_in(r, &owned)
                            || live_in(r, &owned)
                            || running.contains(&r.state.task_id)
                    })
                    .map(|r| r.state.task_id),
            );
        } else {
            if tick {
                let to = cx.model.watermark();
                let from = inc.feed.replace(to).unwrap_or(to);
                ids.extend(cx.model.changed(from, to).into_iter().filter(|t| {
                    cx.model.task(*t).is_some_and(|r| {
                        active_in(r, &owned) || live_in(r, &owned) || r.state.owner_node == Some(me)
                    })
                }));
            }
            ids.extend(std::mem::take(&mut inc.woken));
            ids.extend(due);
        }
        if ids.is_empty() {
            return;
        }
        let tasks: Vec<TaskView> = ids
            .iter()
            .filter_map(|t| cx.model.task(*t))
            .map(|r| view(cx.model, r))
            .collect();
        let leaving: BTreeSet<i32> = inc.leaving.keys().copied().collect();
        let evicting: BTreeSet<i32> = inc
            .leaving
            .iter()
            .filter(|(_, at)| **at <= now_l)
            .map(|(p, _)| *p)
            .collect();
        let pods: HashMap<TaskId, PodSlot> = inc
            .pods
            .iter()
            .map(|(t, p)| {
                (
                    *t,
                    PodSlot {
                        epoch: p.epoch,
                        ending: p.ending || p.exit.is_some(),
                    },
                )
            })
            .collect();
        let programs = BTreeSet::new();
        let node_view = NodeView {
            node: me,
            owned: &inc.owned,
            leaving: &leaving,
            evicting: &evicting,
            pods: &pods,
            kinds: &self.kinds,
            programs: &programs,
            room: capacity.saturating_sub(inc.pods.len()),
            // Which kind a loss is recorded as does not matter to the ownership
            // invariants: every loss retires its epoch alike.
            lost_together: &BTreeSet::new(),
            server_started_at: None,
        };
        let answer = plan(&node_view, tasks);
        cx.trace.note(cx.now, |t| {
            let names = |v: &mut dyn Iterator<Item = TaskId>| -> String {
                v.map(|id| t.task(id)).collect::<Vec<_>>().join(",")
            };
            format!(
                "{} checks {} tasks{}: stop [{}] lost [{}] start [{}] backoff [{}]",
                t.node(me),
                ids.len(),
                if full { " (full)" } else { "" },
                names(&mut answer.stop.iter().copied()),
                names(&mut answer.lost.iter().map(|l| l.task_id)),
                names(&mut answer.start.iter().map(|s| s.task.task_id)),
                names(&mut answer.backoff.iter().map(|b| b.0)),
            )
        });
        for t in &answer.stop {
            if let Some(pod) = inc.pods.get_mut(t) {
                pod.stop = true;
            }
        }
        for (t, wait) in &answer.backoff {
            inc.backoffs.insert(*t, now_l + wait.as_millis() as u64);
        }
        if !answer.lost.is_empty() {
            inc.ops.push_back(Op::RecordLosses(answer.lost));
        }
        if !answer.start.is_empty() {
            inc.ops.push_back(Op::Mint(answer.start));
        }
    }
}

fn active_in(r: &TaskRow, owned: &BTreeSet<i32>) -> bool {
    r.state.status == Status::Active && owned.contains(&r.partition)
}

/// A live pod on an owned partition, whatever its task's status: one a lost node may
/// have left behind on a task that ended meanwhile.
fn live_in(r: &TaskRow, owned: &BTreeSet<i32>) -> bool {
    r.state.pod_state != PodState::None && owned.contains(&r.partition)
}

/// A task as the candidate query returns it: the head plus the backoff left by
/// Postgres's clock.
pub fn view(model: &Model, r: &TaskRow) -> TaskView {
    TaskView {
        task_id: r.state.task_id,
        partition: r.partition,
        kind: r.state.kind.clone(),
        program: None,
        priority: r.state.priority,
        created_at: r.created_at,
        status: r.state.status,
        pod_epoch: r.state.pod_epoch,
        pod_state: r.state.pod_state,
        owner_node: r.state.owner_node,
        backoff: r
            .not_before
            .filter(|t| *t > model.now)
            .map(|t| Duration::from_millis(t - model.now)),
    }
}
