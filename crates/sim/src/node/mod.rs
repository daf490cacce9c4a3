//! A simulated worker node: the controller's bookkeeping and its use of the planner,
//! one store round trip per scheduler step, so other actors (and faults) come between
//! any two of its calls the way they do between two awaits of the real control loop.
//!
//! Layout:
//! - [`ops`]: the round trips a control cycle is made of, and how each is carried out;
//! - [`claims`]: membership, claims and hand-backs (`planner::membership`);
//! - [`check`]: the per-task check (`planner::plan`) and acting on its answer;
//! - [`pod`]: one pod's life, with fenced appends.
//!
//! A node is up, down (crashed: its session ended, its memory and pods gone) or paused
//! (it takes no step; the server ends its idle session; when it resumes, the round trip
//! it was in runs first, on stale memory, before it notices anything).

pub mod check;
pub mod claims;
pub mod ops;
pub mod pod;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rand_chacha::ChaCha8Rng;
use taskpod_core::domain::{NodeId, TaskId};
use taskpod_core::store::keys::NODE_NAMESPACE;

use crate::config::Timers;
use crate::model::{Model, SessionId};
use crate::time::{LocalClock, Millis};
use crate::trace::Trace;
use ops::Op;
use pod::{Exit, SimPod};

/// Everything a node's or a pod's step may touch besides itself.
#[derive(Debug)]
pub struct Ctx<'a> {
    pub now: Millis,
    pub model: &'a mut Model,
    pub trace: &'a mut Trace,
    pub rng: &'a mut ChaCha8Rng,
    pub timers: &'a Timers,
    pub ids: &'a mut Ids,
    /// Handler side effects, for the zombie check.
    pub effects: &'a mut Vec<Effect>,
    pub stats: &'a mut crate::stats::Stats,
    pub crash_chance: f64,
}

/// Deterministic ids: every run names its nodes and tasks alike.
#[derive(Debug, Default)]
pub struct Ids {
    nodes: u128,
    tasks: u128,
}

impl Ids {
    pub fn node(&mut self) -> NodeId {
        self.nodes += 1;
        NodeId(uuid::Uuid::from_u128(0x4e00_0000_0000 + self.nodes))
    }

    pub fn task(&mut self) -> TaskId {
        self.tasks += 1;
        TaskId(uuid::Uuid::from_u128(0x5400_0000_0000 + self.tasks))
    }
}

/// A handler's side effect (what an `exec` program does outside the store).
#[derive(Clone, Copy, Debug)]
pub struct Effect {
    pub at: Millis,
    pub task: TaskId,
    pub epoch: i64,
    pub node: usize,
    pub session: SessionId,
}

/// Whether the process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Up,
    /// Crashed; restarts at `until`.
    Down {
        until: Millis,
    },
    /// Frozen (SIGSTOP, a long GC pause) until `until`.
    Paused {
        until: Millis,
    },
}

/// One process.
#[derive(Debug)]
pub struct SimNode {
    pub index: usize,
    pub capacity: u32,
    pub kinds: BTreeSet<String>,
    pub clock: LocalClock,
    pub health: Health,
    pub inc: Option<Incarnation>,
    /// When (local time) this process last fenced itself; a restart forgets it.
    pub last_fence: Option<Millis>,
    pub incarnations: u32,
    /// The node just resumed from a pause: the round trip it was in goes out first.
    pub resumed: bool,
}

/// What one registration of the process knows: its own memory, stale as it may be.
#[derive(Debug)]
pub struct Incarnation {
    pub id: NodeId,
    pub session: SessionId,
    pub lock_key: i32,
    /// Partition locks this session took (the lock session's `held`).
    pub locked: BTreeSet<i32>,
    /// Partition -> the generation it claimed it at.
    pub owned: BTreeMap<i32, i64>,
    /// Partitions being handed back -> when (local) their pods are stopped.
    pub leaving: BTreeMap<i32, Millis>,
    pub pods: BTreeMap<TaskId, SimPod>,
    /// The live nodes as the last membership read found them.
    pub live: BTreeSet<NodeId>,
    pub membership: Vec<NodeId>,
    pub membership_since: Millis,
    pub last_ping: Millis,
    pub last_claim: Option<Millis>,
    pub last_tick: Option<Millis>,
    pub last_full: Option<Millis>,
    /// The change feed's position.
    pub feed: Option<usize>,
    pub full_due: bool,
    /// Tasks named by wake-ups since the last check.
    pub woken: BTreeSet<TaskId>,
    /// Tasks backing off -> when (local) to look again.
    pub backoffs: BTreeMap<TaskId, Millis>,
    pub ops: VecDeque<Op>,
}

impl SimNode {
    pub fn new(index: usize, capacity: u32, kinds: BTreeSet<String>, clock: LocalClock) -> Self {
        Self {
            index,
            capacity,
            kinds,
            clock,
            health: Health::Up,
            inc: None,
            last_fence: None,
            incarnations: 0,
            resumed: false,
        }
    }

    pub fn local(&self, now: Millis) -> Millis {
        self.clock.at(now)
    }

    /// Whether the node's pods may act: its last answered ping is recent enough by its
    /// own clock (the worker's `Liveness`).
    pub fn fresh(&self, now: Millis, bound: Millis) -> bool {
        self.inc
            .as_ref()
            .is_some_and(|inc| self.local(now).saturating_sub(inc.last_ping) <= bound)
    }

    /// One step of the control loop: reconnect, or the next round trip, or a new cycle.
    pub fn step(&mut self, cx: &mut Ctx<'_>) {
        if self.inc.is_none() {
            self.connect(cx);
            return;
        }
        self.reap(cx);
        let now_l = self.local(cx.now);
        let resumed = std::mem::take(&mut self.resumed);
        let Some(inc) = self.inc.as_mut() else {
            return;
        };
        if let Some(op) = inc.ops.pop_front() {
            // Long work pings as it goes (keep_lock_alive); a round trip already on the
            // wire when the process froze goes out without it.
            let ping_due = now_l.saturating_sub(inc.last_ping) >= cx.timers.ping_interval;
            if ping_due && !resumed && !matches!(op, Op::Ping) {
                inc.ops.push_front(op);
                self.run(Op::Ping, cx);
            } else {
                self.run(op, cx);
            }
            return;
        }
        let tick_due = inc
            .last_tick
            .is_none_or(|t| now_l.saturating_sub(t) >= cx.timers.tick);
        if tick_due {
            inc.last_tick = Some(now_l);
            inc.ops.push_back(Op::Ping);
            let claim_due = inc
                .last_claim
                .is_none_or(|t| now_l.saturating_sub(t) >= cx.timers.claim_interval);
            if claim_due {
                inc.ops.push_back(Op::Membership);
            }
            inc.ops.push_back(Op::Check { tick: true });
        } else if !inc.woken.is_empty() {
            inc.ops.push_back(Op::Check { tick: false });
        }
    }

    /// Registers a new incarnation and takes its node key on a new lock session.
    fn connect(&mut self, cx: &mut Ctx<'_>) {
        let session = cx.model.locks.open(cx.now);
        let id = cx.ids.node();
        self.incarnations += 1;
        cx.trace
            .name_node(id, format!("n{}.{}", self.index, self.incarnations));
        let lock_key = cx
            .model
            .register_node(id, self.capacity, self.kinds.clone(), None);
        if cx
            .model
            .locks
            .try_lock(session, (NODE_NAMESPACE, lock_key), cx.now)
            != Ok(true)
        {
            cx.model.end_session(session);
            return;
        }
        let now_l = self.local(cx.now);
        cx.trace.note(cx.now, |t| {
            format!("{} registered (key {lock_key})", t.node(id))
        });
        self.inc = Some(Incarnation {
            id,
            session,
            lock_key,
            locked: BTreeSet::new(),
            owned: BTreeMap::new(),
            leaving: BTreeMap::new(),
            pods: BTreeMap::new(),
            live: [id].into(),
            membership: Vec::new(),
            membership_since: now_l,
            last_ping: now_l,
            last_claim: None,
            last_tick: None,
            last_full: None,
            feed: None,
            full_due: true,
            woken: BTreeSet::new(),
            backoffs: BTreeMap::new(),
            ops: VecDeque::new(),
        });
    }

    /// Pods that ended leave the table; a crashed one stays (as ending) until its crash
    /// is recorded.
    fn reap(&mut self, _cx: &mut Ctx<'_>) {
        let Some(inc) = self.inc.as_mut() else {
            return;
        };
        let mut record = Vec::new();
        inc.pods.retain(|task, pod| match pod.exit {
            None => true,
            Some(Exit::Crashed) if !pod.ending => {
                pod.ending = true;
                record.push(Op::RecordCrash {
                    task: *task,
                    epoch: pod.epoch,
                    partition: pod.partition,
                });
                true
            }
            Some(Exit::Crashed) => true,
            Some(_) => false,
        });
        inc.ops.extend(record);
    }

    /// The lock session is gone: every pod stops at once (their children killed, no
    /// write), ownership is dropped, and the next step registers a new incarnation.
    pub fn self_fence(&mut self, cx: &mut Ctx<'_>) {
        let Some(inc) = self.inc.take() else {
            return;
        };
        cx.stats.self_fences += 1;
        self.last_fence = Some(self.local(cx.now));
        cx.trace.note(cx.now, |t| {
            format!(
                "{} lost its lock session: fences itself, stopping {} pods",
                t.node(inc.id),
                inc.pods.len()
            )
        });
        // The session may still be open (a failed ping on a live connection): closing
        // it is the worker's last act, and ends whatever it held.
        cx.model.end_session(inc.session);
    }

    /// The process dies: its session ends with it, its memory and pods are gone.
    pub fn crash(&mut self, cx: &mut Ctx<'_>, until: Millis) {
        if let Some(inc) = self.inc.take() {
            cx.model.end_session(inc.session);
            cx.trace
                .note(cx.now, |t| format!("{} crashes", t.node(inc.id)));
        }
        self.last_fence = None;
        self.resumed = false;
        self.health = Health::Down { until };
    }
}
