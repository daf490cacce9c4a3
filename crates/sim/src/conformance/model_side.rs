//! The model's side of a conformance run: the same operations on [`Model`], with one
//! model session per node slot.

use std::collections::BTreeSet;

use taskpod_core::domain::{Event, NodeId, Phase, TaskId, TaskState};
use taskpod_core::store::keys::{NODE_NAMESPACE, PARTITION_NAMESPACE};

use super::step::{Answer, PodEvent, Step, Value};
use crate::model::{CrashAnswer, Model, PartitionRow, SessionId};

/// One registration of a node slot, as both sides know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Incarnation {
    pub id: NodeId,
    pub lock_key: i32,
}

/// What both sides share: the node slots' incarnations and the tasks.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    /// Per slot, its incarnations, oldest first.
    pub incs: Vec<Vec<Incarnation>>,
    pub tasks: Vec<TaskId>,
    pub partitions: Vec<i32>,
}

impl Cluster {
    pub fn inc(&self, node: usize, inc: usize) -> Option<Incarnation> {
        self.incs.get(node).and_then(|v| v.get(inc)).copied()
    }
}

/// The model and its sessions.
#[derive(Debug)]
pub struct ModelSide {
    pub model: Model,
    /// Per slot, its current session (if it connected).
    pub sessions: Vec<Option<SessionId>>,
}

impl ModelSide {
    pub fn new(nodes: usize, partitions: Vec<(i32, PartitionRow)>) -> Self {
        let policy = super::runner::policy();
        Self {
            model: Model::with_partitions(partitions, policy),
            sessions: vec![None; nodes],
        }
    }

    /// Whether slot `node`'s current session holds `partition`'s lock.
    pub fn holds(&self, node: usize, partition: i32) -> bool {
        self.sessions[node]
            .is_some_and(|s| self.model.locks.holder((PARTITION_NAMESPACE, partition)) == Some(s))
    }

    pub fn alive(&self, node: usize) -> bool {
        self.sessions[node].is_some_and(|s| self.model.locks.alive(s))
    }

    /// Applies `step`; `lock_key` is the key the real store gave a `Connect`'s node,
    /// `event` the pod event of an `Append`.
    pub fn apply(
        &mut self,
        step: &Step,
        cluster: &Cluster,
        lock_key: Option<i32>,
        event: Option<&Event>,
    ) -> Answer {
        let refused = |why: crate::model::Refusal| Answer::Refused(why.to_string());
        let now = self.model.now;
        match step {
            Step::Connect { node } => {
                let Some(inc) = cluster.incs[*node].last() else {
                    return Answer::Refused("no incarnation".into());
                };
                let s = self.model.locks.open(now);
                self.sessions[*node] = Some(s);
                let key = self.model.register_node(
                    inc.id,
                    1,
                    BTreeSet::from(["sleep".to_owned()]),
                    lock_key,
                );
                match self.model.locks.try_lock(s, (NODE_NAMESPACE, key), now) {
                    Ok(true) => Answer::Accepted(Value::Done),
                    _ => Answer::Refused("node key taken".into()),
                }
            }
            Step::KillSession { node } => {
                if let Some(s) = self.sessions[*node] {
                    self.model.end_session(s);
                }
                Answer::Accepted(Value::Done)
            }
            Step::TryLock { node, partition } => match self.sessions[*node] {
                Some(s) => {
                    match self
                        .model
                        .locks
                        .try_lock(s, (PARTITION_NAMESPACE, *partition), now)
                    {
                        Ok(got) => Answer::Accepted(Value::Locked(got)),
                        Err(_) => Answer::Refused("session gone".into()),
                    }
                }
                None => Answer::Refused("no session".into()),
            },
            Step::Unlock { node, partition } => match self.sessions[*node] {
                Some(s) => match self
                    .model
                    .locks
                    .unlock(s, (PARTITION_NAMESPACE, *partition), now)
                {
                    Ok(got) => Answer::Accepted(Value::Locked(got)),
                    Err(_) => Answer::Refused("session gone".into()),
                },
                None => Answer::Refused("no session".into()),
            },
            Step::Claim {
                node,
                inc,
                partition,
            } => {
                let Some(i) = cluster.inc(*node, *inc) else {
                    return Answer::Refused("no incarnation".into());
                };
                match self.model.claim(i.id, *partition) {
                    Ok(g) => Answer::Accepted(Value::Generation(g)),
                    Err(why) => refused(why),
                }
            }
            Step::Release {
                node,
                inc,
                partition,
                generation,
            } => {
                let Some(i) = cluster.inc(*node, *inc) else {
                    return Answer::Refused("no incarnation".into());
                };
                match self.model.release(i.id, *partition, *generation) {
                    Ok(()) => Answer::Accepted(Value::Done),
                    Err(why) => refused(why),
                }
            }
            Step::Mint {
                node,
                inc,
                task,
                observed_epoch,
                generation,
            } => {
                let Some(i) = cluster.inc(*node, *inc) else {
                    return Answer::Refused("no incarnation".into());
                };
                match self
                    .model
                    .mint(i.id, cluster.tasks[*task], *observed_epoch, *generation)
                {
                    Ok(s) => Answer::Accepted(Value::Epoch(s.pod_epoch)),
                    Err(why) => refused(why),
                }
            }
            Step::Append {
                task,
                epoch,
                version,
                ..
            } => {
                let Some(event) = event else {
                    return Answer::Refused("no event".into());
                };
                match self.model.append_pod(
                    cluster.tasks[*task],
                    *version,
                    *epoch,
                    std::slice::from_ref(event),
                ) {
                    Ok(s) => Answer::Accepted(Value::Version(s.version)),
                    Err(why) => refused(why),
                }
            }
            Step::Crash {
                node,
                inc,
                task,
                epoch,
                generation,
                kind,
                ..
            } => {
                let Some(i) = cluster.inc(*node, *inc) else {
                    return Answer::Refused("no incarnation".into());
                };
                match self.model.record_crash(
                    i.id,
                    *generation,
                    cluster.tasks[*task],
                    *epoch,
                    *kind,
                    0.5,
                ) {
                    Ok(a) => Answer::Accepted(Value::Crash(crash_name(a))),
                    Err(why) => refused(why),
                }
            }
            Step::Command { task, command } => {
                match self.model.execute(cluster.tasks[*task], command) {
                    Ok(s) => Answer::Accepted(Value::Version(s.version)),
                    Err(why) => refused(why),
                }
            }
        }
    }
}

/// The outcome's name, as both sides report it.
pub fn crash_name(a: CrashAnswer) -> &'static str {
    match a {
        CrashAnswer::Restart { .. } => "restart",
        CrashAnswer::Failed => "failed",
        CrashAnswer::Ended => "ended",
        CrashAnswer::AlreadyRecorded => "already recorded",
    }
}

/// The pod event of an `Append`, from the model's head (both sides get this one).
pub fn pod_event(head: &TaskState, epoch: i64, event: PodEvent, fallback: NodeId) -> Event {
    match event {
        PodEvent::Started => Event::PodStarted {
            epoch,
            node: head.owner_node.unwrap_or(fallback),
            started_at: chrono::DateTime::UNIX_EPOCH,
        },
        PodEvent::Stopped => Event::PodStopped {
            epoch,
            reason: "conformance".into(),
        },
        PodEvent::Advance => {
            let to = match head.phase {
                Phase::SpecClarification => Some(Phase::Planning),
                Phase::Planning => Some(Phase::Development),
                Phase::Development => Some(Phase::Review),
                _ => None,
            };
            match to {
                Some(to) => Event::PhaseChanged {
                    from: head.phase,
                    to,
                },
                None => Event::TaskCompleted {
                    from_phase: head.phase,
                },
            }
        }
    }
}
