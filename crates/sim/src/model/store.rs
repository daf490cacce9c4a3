//! The store as the protocol means it: partition rows with generations, task heads,
//! crash records, node rows and the advisory locks, with every conditional statement
//! written out as the intended semantics say (DESIGN "Ownership", after the fixes):
//!
//! - a claim only by the holder of the partition's lock; it bumps the generation;
//! - a release only by the owner at that generation;
//! - a mint only by the owner at that generation whose lock session is alive, of an
//!   active task without a pod, at the epoch observed, past its backoff;
//! - a pod append only under the current epoch while the head still shows it live
//!   (a recorded end retires the epoch), on an active task (`pod_stopped` excepted),
//!   at the expected version, while the lock session of the node that minted the
//!   epoch is alive;
//! - a crash record only by the owner at that generation whose lock session is alive,
//!   of the current, live epoch, once per (task, epoch); it decides the restart.
//!
//! The state table itself is the domain's (`decide`, `evolve`, `mint_pod`), shared
//! with the real store: the model adds only the fences. Every accepted write is
//! logged with the fence it claimed, for the history oracle ([`super::history`]).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use taskpod_core::domain::restart::{CrashKind, RestartDecision, RestartPolicy};
use taskpod_core::domain::{
    Command, Event, NodeId, PodState, Status, TaskId, TaskState, Writer, decide, evolve, mint_pod,
};
use taskpod_core::store::keys::{NODE_NAMESPACE, PARTITION_NAMESPACE};

use super::locks::{Locks, SessionId};
use super::refusal::Refusal;
use crate::time::Millis;

/// A task's rows: the head (as the state table sees it) and what placement reads.
#[derive(Clone, Debug)]
pub struct TaskRow {
    pub state: TaskState,
    pub partition: i32,
    pub created_at: DateTime<Utc>,
    /// The restart backoff ends then (Postgres's clock).
    pub not_before: Option<Millis>,
}

/// A partition row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionRow {
    pub owner: Option<NodeId>,
    pub generation: i64,
}

/// A registered node.
#[derive(Clone, Debug)]
pub struct NodeRow {
    pub lock_key: i32,
    pub capacity: u32,
    pub kinds: BTreeSet<String>,
}

/// A crash record (`pod_crashes`).
#[derive(Clone, Debug)]
pub struct CrashRow {
    pub task: TaskId,
    pub epoch: i64,
    pub kind: CrashKind,
    pub at: Millis,
}

/// What a crash record did to the task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashAnswer {
    /// A new pod may start at this time (Postgres's clock).
    Restart { not_before: Millis },
    /// The budget is spent: the task failed.
    Failed,
    /// The task had left `active`: nothing to restart.
    Ended,
    /// This (task, epoch) was recorded before.
    AlreadyRecorded,
}

/// An accepted write, or a fact the oracle needs, with the fence it relied on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    Claim {
        node: NodeId,
        partition: i32,
        generation: i64,
    },
    Release {
        node: NodeId,
        partition: i32,
        generation: i64,
    },
    /// `epoch` is the new epoch.
    Mint {
        node: NodeId,
        partition: i32,
        generation: i64,
        task: TaskId,
        epoch: i64,
    },
    Pod {
        task: TaskId,
        epoch: i64,
        events: Vec<&'static str>,
    },
    Crash {
        node: NodeId,
        partition: i32,
        generation: i64,
        task: TaskId,
        epoch: i64,
    },
    Command {
        task: TaskId,
        name: &'static str,
    },
    /// Not a write: the node's key stopped being held (its session ended, or its row
    /// went), so nothing it sends may be accepted any more.
    NodeLockLost {
        node: NodeId,
    },
}

/// The model store. `now` is Postgres's clock; the caller advances it.
#[derive(Clone, Debug)]
pub struct Model {
    pub now: Millis,
    pub locks: Locks,
    pub policy: RestartPolicy,
    partitions: BTreeMap<i32, PartitionRow>,
    nodes: BTreeMap<NodeId, NodeRow>,
    next_lock_key: i32,
    tasks: BTreeMap<TaskId, TaskRow>,
    crashes: Vec<CrashRow>,
    /// The change feed: the tasks each accepted change touched, in commit order.
    changes: Vec<TaskId>,
    /// Accepted writes (and lock losses), in order, for the oracle.
    log: Vec<(Millis, Write)>,
}

impl Model {
    /// A store with `partitions` free partitions at generation 0.
    pub fn new(partitions: u32, policy: RestartPolicy) -> Self {
        Self::with_partitions(
            (0..partitions as i32).map(|p| {
                (
                    p,
                    PartitionRow {
                        owner: None,
                        generation: 0,
                    },
                )
            }),
            policy,
        )
    }

    /// A store whose partition rows are `rows` (a copy of a real store's).
    pub fn with_partitions(
        rows: impl IntoIterator<Item = (i32, PartitionRow)>,
        policy: RestartPolicy,
    ) -> Self {
        Self {
            now: 0,
            locks: Locks::default(),
            policy,
            partitions: rows.into_iter().collect(),
            nodes: BTreeMap::new(),
            next_lock_key: 0,
            tasks: BTreeMap::new(),
            crashes: Vec::new(),
            changes: Vec::new(),
            log: Vec::new(),
        }
    }

    // ----- reads -----

    pub fn partition_count(&self) -> usize {
        self.partitions.len()
    }

    pub fn partitions(&self) -> Vec<(i32, PartitionRow)> {
        self.partitions.iter().map(|(p, r)| (*p, *r)).collect()
    }

    pub fn partition(&self, p: i32) -> Option<PartitionRow> {
        self.partitions.get(&p).copied()
    }

    pub fn nodes(&self) -> Vec<(NodeId, NodeRow)> {
        self.nodes.iter().map(|(n, r)| (*n, r.clone())).collect()
    }

    pub fn task(&self, task: TaskId) -> Option<&TaskRow> {
        self.tasks.get(&task)
    }

    pub fn tasks(&self) -> impl Iterator<Item = &TaskRow> {
        self.tasks.values()
    }

    pub fn crashes(&self) -> &[CrashRow] {
        &self.crashes
    }

    /// The change feed's end: tasks changed from here on are after it.
    pub fn watermark(&self) -> usize {
        self.changes.len()
    }

    /// The tasks changed in `[from, to)`, once each, in id order.
    pub fn changed(&self, from: usize, to: usize) -> Vec<TaskId> {
        let set: BTreeSet<TaskId> = self.changes[from.min(to)..to.min(self.changes.len())]
            .iter()
            .copied()
            .collect();
        set.into_iter().collect()
    }

    pub fn log(&self) -> &[(Millis, Write)] {
        &self.log
    }

    /// The session holding `node`'s key, if its lock session is alive.
    pub fn node_session(&self, node: NodeId) -> Option<SessionId> {
        let row = self.nodes.get(&node)?;
        self.locks.holder((NODE_NAMESPACE, row.lock_key))
    }

    pub fn node_alive(&self, node: NodeId) -> bool {
        self.node_session(node).is_some()
    }

    // ----- the server's own acts -----

    /// Ends a session (a crash, `idle_session_timeout`, a terminated backend), and
    /// notes the nodes whose key it held.
    pub fn end_session(&mut self, s: SessionId) {
        let released = self.locks.end(s, self.now);
        for key in released {
            if key.0 != NODE_NAMESPACE {
                continue;
            }
            let lost: Vec<NodeId> = self
                .nodes
                .iter()
                .filter(|(_, r)| r.lock_key == key.1)
                .map(|(n, _)| *n)
                .collect();
            for node in lost {
                self.log.push((self.now, Write::NodeLockLost { node }));
            }
        }
    }

    /// Ends the sessions idle past `timeout`; returns them.
    pub fn expire_idle(&mut self, timeout: Millis) -> Vec<SessionId> {
        let idle = self.locks.idle_past(self.now, timeout);
        for s in &idle {
            self.end_session(*s);
        }
        idle
    }

    // ----- nodes and partitions -----

    /// Registers a node; returns its lock key (`lock_key` when given, as a real store
    /// assigned it, else the next one).
    pub fn register_node(
        &mut self,
        node: NodeId,
        capacity: u32,
        kinds: BTreeSet<String>,
        lock_key: Option<i32>,
    ) -> i32 {
        let key = lock_key.unwrap_or_else(|| {
            self.next_lock_key += 1;
            self.next_lock_key
        });
        self.nodes.insert(
            node,
            NodeRow {
                lock_key: key,
                capacity,
                kinds,
            },
        );
        key
    }

    pub fn deregister_node(&mut self, node: NodeId) {
        if self.nodes.remove(&node).is_some() {
            self.log.push((self.now, Write::NodeLockLost { node }));
        }
    }

    /// Records `node`'s claim on `p`: only the holder of `p`'s lock may.
    ///
    /// # Errors
    /// [`Refusal::NodeLockLost`], [`Refusal::NotLockHolder`], [`Refusal::NotFound`].
    pub fn claim(&mut self, node: NodeId, p: i32) -> Result<i64, Refusal> {
        let session = self.node_session(node).ok_or(Refusal::NodeLockLost)?;
        if self.locks.holder((PARTITION_NAMESPACE, p)) != Some(session) {
            return Err(Refusal::NotLockHolder);
        }
        let row = self.partitions.get_mut(&p).ok_or(Refusal::NotFound)?;
        row.generation += 1;
        row.owner = Some(node);
        let generation = row.generation;
        self.log.push((
            self.now,
            Write::Claim {
                node,
                partition: p,
                generation,
            },
        ));
        Ok(generation)
    }

    /// Clears `node`'s claim on `p` at `generation`.
    ///
    /// # Errors
    /// [`Refusal::StaleGeneration`] when the claim moved on.
    pub fn release(&mut self, node: NodeId, p: i32, generation: i64) -> Result<(), Refusal> {
        let row = self.partitions.get_mut(&p).ok_or(Refusal::NotFound)?;
        if row.owner != Some(node) || row.generation != generation {
            return Err(Refusal::StaleGeneration);
        }
        row.owner = None;
        self.log.push((
            self.now,
            Write::Release {
                node,
                partition: p,
                generation,
            },
        ));
        Ok(())
    }

    /// The worker fence: the task's partition owned by `node` at `generation`, and
    /// `node`'s lock session alive.
    fn check_owner(&self, task: &TaskRow, node: NodeId, generation: i64) -> Result<(), Refusal> {
        let row = self
            .partitions
            .get(&task.partition)
            .ok_or(Refusal::NotFound)?;
        if row.owner != Some(node) || row.generation != generation {
            return Err(Refusal::StaleGeneration);
        }
        if !self.node_alive(node) {
            return Err(Refusal::NodeLockLost);
        }
        Ok(())
    }

    // ----- tasks -----

    /// Adds a task (version 1, inactive, or active when `active`).
    pub fn create_task(
        &mut self,
        task: TaskId,
        partition: i32,
        kind: &str,
        priority: i32,
        created_at: DateTime<Utc>,
        active: bool,
    ) {
        let created = Event::TaskCreated {
            title: "sim".into(),
            description: String::new(),
            kind: kind.to_owned(),
            payload: serde_json::Value::Null,
            priority,
            metadata: serde_json::json!({}),
        };
        let Ok(mut state) = TaskState::genesis(task, &created) else {
            return;
        };
        if active && let Ok(next) = evolve(&state, &Event::PodRequested {}) {
            state = next;
        }
        self.tasks.insert(
            task,
            TaskRow {
                state,
                partition,
                created_at,
                not_before: None,
            },
        );
        self.changes.push(task);
    }

    /// Mints the next epoch of `task` for `node` (see the module docs).
    ///
    /// # Errors
    /// The first fence that refuses.
    pub fn mint(
        &mut self,
        node: NodeId,
        task: TaskId,
        observed_epoch: i64,
        generation: i64,
    ) -> Result<TaskState, Refusal> {
        let row = self.tasks.get(&task).ok_or(Refusal::NotFound)?;
        self.check_owner(row, node, generation)?;
        if row.state.pod_epoch != observed_epoch {
            return Err(Refusal::StaleEpoch);
        }
        let next = mint_pod(&row.state, node).map_err(Refusal::from)?;
        if row.not_before.is_some_and(|t| t > self.now) {
            return Err(Refusal::BackingOff);
        }
        let partition = row.partition;
        let epoch = next.pod_epoch;
        self.set_state(task, next.clone());
        self.log.push((
            self.now,
            Write::Mint {
                node,
                partition,
                generation,
                task,
                epoch,
            },
        ));
        Ok(next)
    }

    /// A pod's append under `epoch` at `expected_version` (see the module docs).
    ///
    /// # Errors
    /// The first fence that refuses, or the state table.
    pub fn append_pod(
        &mut self,
        task: TaskId,
        expected_version: i64,
        epoch: i64,
        events: &[Event],
    ) -> Result<TaskState, Refusal> {
        if events.is_empty() || events.iter().any(|e| !e.may_be_written_by(Writer::Pod)) {
            return Err(Refusal::Illegal("not a pod's event".into()));
        }
        let row = self.tasks.get(&task).ok_or(Refusal::NotFound)?;
        let before = &row.state;
        if before.pod_epoch != epoch {
            return Err(Refusal::StaleEpoch);
        }
        if before.pod_state == PodState::None {
            return Err(Refusal::EpochRetired);
        }
        let acknowledging_stop = events.iter().all(|e| matches!(e, Event::PodStopped { .. }));
        if before.status != Status::Active && !acknowledging_stop {
            return Err(Refusal::NotRunning);
        }
        if before.version != expected_version {
            return Err(Refusal::VersionConflict);
        }
        if !before.owner_node.is_some_and(|n| self.node_alive(n)) {
            return Err(Refusal::NodeLockLost);
        }
        let after = fold(before, events)?;
        self.set_state(task, after.clone());
        self.log.push((
            self.now,
            Write::Pod {
                task,
                epoch,
                events: events.iter().map(Event::type_name).collect(),
            },
        ));
        Ok(after)
    }

    /// Records the end of `task`'s pod `epoch`, by `node` owning its partition at
    /// `generation`, and decides the restart (see the module docs).
    ///
    /// # Errors
    /// The first fence that refuses.
    pub fn record_crash(
        &mut self,
        node: NodeId,
        generation: i64,
        task: TaskId,
        epoch: i64,
        kind: CrashKind,
        jitter: f64,
    ) -> Result<CrashAnswer, Refusal> {
        let row = self.tasks.get(&task).ok_or(Refusal::NotFound)?;
        self.check_owner(row, node, generation)?;
        let before = row.state.clone();
        if before.pod_epoch != epoch || !before.has_pod() {
            return Err(Refusal::StaleEpoch);
        }
        if self
            .crashes
            .iter()
            .any(|c| c.task == task && c.epoch == epoch)
        {
            return Ok(CrashAnswer::AlreadyRecorded);
        }
        let partition = row.partition;
        self.crashes.push(CrashRow {
            task,
            epoch,
            kind,
            at: self.now,
        });
        let mut events = vec![Event::PodCrashed {
            epoch,
            reason: format!("{} of epoch {epoch}", kind.as_str()),
            kind,
        }];
        // As the store: a pod lost with its node waits the adoption margin of its kind.
        let adoption = match kind {
            CrashKind::Handler => 0,
            CrashKind::NodeLost | CrashKind::Interrupted => {
                self.policy.adoption_delay(&before.kind).as_millis() as Millis
            }
        };
        let (answer, delay) = if before.status != Status::Active {
            (CrashAnswer::Ended, None)
        } else if kind == CrashKind::Interrupted {
            (CrashAnswer::Ended, Some(adoption))
        } else {
            let (handler, lost) = self.crash_counts(task);
            match self.policy.decide(handler, lost, jitter) {
                RestartDecision::Restart { delay } => (
                    CrashAnswer::Ended,
                    Some((delay.as_millis() as Millis).max(adoption)),
                ),
                RestartDecision::Fail { error } => {
                    events.push(Event::TaskFailed {
                        error,
                        from_phase: before.phase,
                    });
                    (CrashAnswer::Failed, None)
                }
            }
        };
        let after = fold(&before, &events)?;
        self.set_state(task, after);
        let answer = match delay {
            Some(d) => {
                let not_before = self.now + d;
                if let Some(row) = self.tasks.get_mut(&task) {
                    row.not_before = Some(not_before);
                }
                CrashAnswer::Restart { not_before }
            }
            None => answer,
        };
        self.log.push((
            self.now,
            Write::Crash {
                node,
                partition,
                generation,
                task,
                epoch,
            },
        ));
        Ok(answer)
    }

    /// Handler crashes and node losses of `task` within the policy's window.
    fn crash_counts(&self, task: TaskId) -> (u32, u32) {
        let window = self.policy.window.as_millis() as Millis;
        let recent = self
            .crashes
            .iter()
            .filter(|c| c.task == task && c.at + window > self.now);
        let (mut handler, mut lost) = (0, 0);
        for c in recent {
            match c.kind {
                CrashKind::Handler => handler += 1,
                CrashKind::NodeLost => lost += 1,
                CrashKind::Interrupted => {}
            }
        }
        (handler, lost)
    }

    /// An API command, decided from the head as it is.
    ///
    /// # Errors
    /// The state table's refusal.
    pub fn execute(&mut self, task: TaskId, command: &Command) -> Result<TaskState, Refusal> {
        let row = self.tasks.get(&task).ok_or(Refusal::NotFound)?;
        let events = decide(&row.state, command).map_err(Refusal::from)?;
        let after = fold(&row.state, &events)?;
        self.set_state(task, after.clone());
        self.log.push((
            self.now,
            Write::Command {
                task,
                name: command.name(),
            },
        ));
        Ok(after)
    }

    // ----- resynchronising with a real store after a mismatch -----

    /// Takes `state` as the task's head (what the real store holds).
    pub fn resync_head(&mut self, task: TaskId, state: TaskState) {
        if let Some(row) = self.tasks.get_mut(&task) {
            row.state = state;
        }
    }

    /// Takes `row` as the partition's row.
    pub fn resync_partition(&mut self, p: i32, row: PartitionRow) {
        self.partitions.insert(p, row);
    }

    /// Adds a crash record the real store made and the model refused.
    pub fn resync_crash(&mut self, task: TaskId, epoch: i64, kind: CrashKind) {
        self.crashes.push(CrashRow {
            task,
            epoch,
            kind,
            at: self.now,
        });
    }

    /// Forgets a crash record the real store refused and the model made.
    pub fn resync_uncrash(&mut self, task: TaskId, epoch: i64) {
        self.crashes
            .retain(|c| !(c.task == task && c.epoch == epoch));
    }

    /// Logs a write the real store accepted and the model refused, so the model's own
    /// history follows what both now hold.
    pub fn resync_write(&mut self, write: Write) {
        self.log.push((self.now, write));
    }

    fn set_state(&mut self, task: TaskId, state: TaskState) {
        if let Some(row) = self.tasks.get_mut(&task) {
            row.state = state;
            self.changes.push(task);
        }
    }
}

fn fold(before: &TaskState, events: &[Event]) -> Result<TaskState, Refusal> {
    events
        .iter()
        .try_fold(before.clone(), |s, e| evolve(&s, e))
        .map_err(|e| Refusal::Illegal(e.to_string()))
}
