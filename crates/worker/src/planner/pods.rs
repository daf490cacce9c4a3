//! What a check does with each task it read: stop a pod, start one, record a pod a lost
//! node left behind, or wait out a restart backoff.
//!
//! The rules, for a task of a partition this node owns (or a pod it runs):
//!
//! - a pod this node runs stays while its task is `active`, its epoch is the head's,
//!   the head still shows it live (`starting` or `running`: a recorded loss or a stop
//!   request retires it), and its partition is owned and not being evicted;
//! - a live pod in the head that this node does not run was left behind: by a lost
//!   node (`node_lost`, counted against the task's poison budget), or, charged to no
//!   task (an interruption): by this very incarnation (a mint whose answer was lost, a
//!   pod whose last record failed), by a node that lost its session to a Postgres
//!   restart (it began before the server did), or by a node that lost it together with
//!   every other node. Pods of tasks that already ended are recorded too, so no
//!   terminal task keeps a phantom pod;
//! - an `active` task without a pod gets one, unless its partition is leaving, its kind
//!   or program is one this node cannot run (it waits, counted as unplaceable, never
//!   failed), or its restart backoff (measured by Postgres's clock) is not over.
//!   Highest priority first, then the oldest, as far as capacity allows.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use taskpod_core::domain::{NodeId, PodState, Status, TaskId};

/// A task as a check reads it: the head's view plus what placement needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskView {
    pub task_id: TaskId,
    pub partition: i32,
    pub kind: String,
    /// The `exec` program the task names, for `exec` tasks.
    pub program: Option<String>,
    pub priority: i32,
    pub created_at: DateTime<Utc>,
    pub status: Status,
    pub pod_epoch: i64,
    pub pod_state: PodState,
    pub owner_node: Option<NodeId>,
    /// What is left of the restart backoff, by Postgres's clock when it was read
    /// (`None`: none, or over).
    pub backoff: Option<Duration>,
}

/// A pod in this node's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodSlot {
    pub epoch: i64,
    /// The pod has ended and its end is being recorded: leave it alone until then.
    pub ending: bool,
}

/// What the planner knows of this node.
#[derive(Debug)]
pub struct NodeView<'a> {
    pub node: NodeId,
    /// Partition -> the generation this node claimed it at.
    pub owned: &'a BTreeMap<i32, i64>,
    /// Partitions being handed back: no new pods.
    pub leaving: &'a BTreeSet<i32>,
    /// Leaving partitions whose hand-back deadline passed: their pods stop.
    pub evicting: &'a BTreeSet<i32>,
    pub pods: &'a HashMap<TaskId, PodSlot>,
    pub kinds: &'a BTreeSet<String>,
    pub programs: &'a BTreeSet<String>,
    /// How many more pods this node may run.
    pub room: usize,
    /// Nodes that lost their lock sessions together with every other node (found at
    /// this node's first membership read after its own fence): an interruption that hit
    /// every node at once, charged to no task.
    pub lost_together: &'a BTreeSet<NodeId>,
    /// When the Postgres server last started: an incarnation that began before lost its
    /// session to the restart.
    pub server_started_at: Option<DateTime<Utc>>,
}

impl NodeView<'_> {
    fn can_run(&self, task: &TaskView) -> bool {
        self.kinds.contains(&task.kind)
            && task
                .program
                .as_ref()
                .is_none_or(|p| self.programs.contains(p))
    }
}

/// Why a pod this node does not run is recorded as ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// Its node is gone: counted against the task's node-loss budget.
    NodeLost,
    /// Charged to no task: this node's own pod whose end was never recorded, or a pod
    /// cut off by an interruption that hit every node.
    Interrupted,
}

/// A pod to record as ended, under the claim `generation` of its partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostPod {
    pub task_id: TaskId,
    pub epoch: i64,
    pub partition: i32,
    pub generation: i64,
    pub owner: Option<NodeId>,
    pub loss: Loss,
}

/// A pod to mint: the epoch observed, and the claim it relies on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Start {
    pub task: TaskView,
    pub generation: i64,
}

/// The check's answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Pods this node runs that must stop.
    pub stop: Vec<TaskId>,
    /// Pods to record as ended.
    pub lost: Vec<LostPod>,
    /// Pods to mint, in the order to mint them.
    pub start: Vec<Start>,
    /// Tasks waiting out a backoff, and for how long.
    pub backoff: Vec<(TaskId, Duration)>,
    /// Active tasks without a pod whose kind or program this node cannot run.
    pub unplaceable: usize,
    /// Tasks that need a pod and found no room: look again when a pod ends.
    pub starved: bool,
}

/// Classifies `tasks` (see the module docs).
pub fn plan(view: &NodeView<'_>, tasks: Vec<TaskView>) -> Plan {
    let mut out = Plan::default();
    let mut wanted = Vec::new();
    let mut seen = std::collections::HashSet::with_capacity(tasks.len());
    for task in tasks {
        if !seen.insert(task.task_id) {
            continue;
        }
        let generation = view.owned.get(&task.partition).copied();
        if let Some(pod) = view.pods.get(&task.task_id) {
            if pod.ending {
                continue;
            }
            let keep = task.status == Status::Active
                && task.pod_epoch == pod.epoch
                && matches!(task.pod_state, PodState::Starting | PodState::Running)
                && generation.is_some()
                && !view.evicting.contains(&task.partition);
            if !keep {
                out.stop.push(task.task_id);
            }
            continue;
        }
        let Some(generation) = generation else {
            continue;
        };
        if task.pod_state != PodState::None {
            let own = task.owner_node == Some(view.node);
            let together = task
                .owner_node
                .is_some_and(|n| view.lost_together.contains(&n));
            let restarted = task
                .owner_node
                .and_then(|n| n.created_at())
                .zip(view.server_started_at)
                .is_some_and(|(born, started)| born < started);
            out.lost.push(LostPod {
                task_id: task.task_id,
                epoch: task.pod_epoch,
                partition: task.partition,
                generation,
                owner: task.owner_node,
                loss: if own || together || restarted {
                    Loss::Interrupted
                } else {
                    Loss::NodeLost
                },
            });
            continue;
        }
        if task.status != Status::Active || view.leaving.contains(&task.partition) {
            continue;
        }
        if !view.can_run(&task) {
            out.unplaceable += 1;
            continue;
        }
        match task.backoff {
            Some(wait) if !wait.is_zero() => out.backoff.push((task.task_id, wait)),
            _ => wanted.push(Start { task, generation }),
        }
    }
    wanted.sort_by(|a, b| {
        b.task
            .priority
            .cmp(&a.task.priority)
            .then(a.task.created_at.cmp(&b.task.created_at))
            .then(a.task.task_id.cmp(&b.task.task_id))
    });
    if wanted.len() > view.room {
        out.starved = true;
        wanted.truncate(view.room);
    }
    out.start = wanted;
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
