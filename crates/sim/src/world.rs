//! The scheduler: one global logical clock, one seeded generator, and the actors it
//! picks from at each step (a node's control loop, one of its pods, an API caller, a
//! fault, the server's idle timeout, the bus). Everything is ordered (no hash-map
//! iteration), so a seed gives the same run every time.

use std::collections::BTreeSet;

use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;
use taskpod_core::domain::partition::partition_of;
use taskpod_core::domain::{Command, Status, TaskId};

use crate::config::Config;
use crate::faults::{self, Fault};
use crate::model::{History, Model};
use crate::node::{Ctx, Effect, Health, Ids, SimNode};
use crate::stats::Stats;
use crate::time::{LocalClock, Millis};
use crate::trace::Trace;

/// Kinds a task may have (see `node::pod`).
pub const KINDS: [&str; 3] = ["manual", "sleep", "flaky"];

/// Everything in a run.
#[derive(Debug)]
pub struct World {
    pub cfg: Config,
    pub rng: ChaCha8Rng,
    pub now: Millis,
    pub model: Model,
    pub history: History,
    pub nodes: Vec<SimNode>,
    pub trace: Trace,
    pub ids: Ids,
    pub effects: Vec<Effect>,
    pub stats: Stats,
    pub steps: u64,
    /// How far the bus has published the change feed.
    published: usize,
    /// The bus loses wake-ups (half of them) while this holds.
    lossy: bool,
    pub effects_checked: usize,
    tasks: u32,
}

/// Who acts in a step.
#[derive(Clone, Copy, Debug)]
enum Actor {
    Node(usize),
    Pod(usize, TaskId),
}

impl World {
    /// The world of `seed`: its cluster shape, nodes and first tasks.
    pub fn new(seed: u64, trace: bool) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let cfg = Config::draw(&mut rng);
        let model = Model::new(cfg.partitions, cfg.policy.clone());
        let history = History::new(model.partitions());
        let mut nodes = Vec::with_capacity(cfg.nodes);
        for i in 0..cfg.nodes {
            let capacity = rng.random_range(cfg.max_tasks as u32..=2 * cfg.max_tasks as u32);
            let mut kinds: BTreeSet<String> = KINDS.iter().map(|k| (*k).to_owned()).collect();
            if cfg.partial_node && i + 1 == cfg.nodes && i > 0 {
                kinds.remove("flaky");
            }
            let rate = rng.random_range(cfg.skew_permille.0..=cfg.skew_permille.1);
            let clock = LocalClock::new(rng.random_range(0..10_000), rate);
            nodes.push(SimNode::new(i, capacity, kinds, clock));
        }
        let mut world = Self {
            cfg,
            rng,
            now: 0,
            model,
            history,
            nodes,
            trace: Trace::new(trace),
            ids: Ids::default(),
            effects: Vec::new(),
            stats: Stats {
                seeds: 1,
                ..Stats::default()
            },
            steps: 0,
            published: 0,
            lossy: false,
            effects_checked: 0,
            tasks: 0,
        };
        let shape = format!("{:?}", world.cfg);
        world.trace.note(0, |_| format!("seed {seed}: {shape}"));
        for _ in 0..world.cfg.initial_tasks {
            let active = world.rng.random_bool(0.7);
            world.create_task(active);
        }
        world
    }

    fn create_task(&mut self, active: bool) {
        let id = self.ids.task();
        self.tasks += 1;
        let partition = partition_of(id, self.cfg.partitions) as i32;
        let kind = KINDS[self.rng.random_range(0..KINDS.len())];
        let priority = self.rng.random_range(-1..=1);
        let created_at =
            chrono::DateTime::UNIX_EPOCH + chrono::Duration::seconds(i64::from(self.tasks));
        self.model
            .create_task(id, partition, kind, priority, created_at, active);
        self.trace.name_task(id, format!("t{}", self.tasks));
        self.trace.note(self.now, |t| {
            format!(
                "api creates {} ({kind}, p{partition}{})",
                t.task(id),
                if active { ", active" } else { "" }
            )
        });
    }

    /// One step: time moves, the server and the bus do their part, maybe a fault and a
    /// command, then one actor.
    pub fn step(&mut self, faults_on: bool, api_on: bool) {
        self.steps += 1;
        self.trace.step = self.steps;
        self.now += self.rng.random_range(1..=10);
        self.model.now = self.now;
        for s in self.model.expire_idle(self.cfg.timers.idle_timeout) {
            self.stats.idle_expiries += 1;
            self.trace
                .note(self.now, |_| format!("server ends idle session {}", s.0));
        }
        self.wake_up();
        if faults_on && self.rng.random_bool(self.cfg.fault_chance) {
            let fault = faults::draw(&mut self.rng, &self.cfg);
            self.apply(fault);
        }
        if api_on && self.rng.random_bool(self.cfg.api_chance) {
            self.api();
        }
        let actors = self.actors();
        if !actors.is_empty() {
            let actor = actors[self.rng.random_range(0..actors.len())];
            self.act(actor);
        }
        self.publish();
    }

    fn actors(&self) -> Vec<Actor> {
        let mut out = Vec::new();
        for n in &self.nodes {
            if n.health != Health::Up {
                continue;
            }
            out.push(Actor::Node(n.index));
            if let Some(inc) = &n.inc {
                out.extend(
                    inc.pods
                        .iter()
                        .filter(|(_, p)| p.running())
                        .map(|(t, _)| Actor::Pod(n.index, *t)),
                );
            }
        }
        out
    }

    fn act(&mut self, actor: Actor) {
        let mut cx = Ctx {
            now: self.now,
            model: &mut self.model,
            trace: &mut self.trace,
            rng: &mut self.rng,
            timers: &self.cfg.timers,
            ids: &mut self.ids,
            effects: &mut self.effects,
            stats: &mut self.stats,
            crash_chance: self.cfg.crash_chance,
        };
        match actor {
            Actor::Node(i) => self.nodes[i].step(&mut cx),
            Actor::Pod(i, task) => self.nodes[i].step_pod(&mut cx, task),
        }
    }

    /// Restarts crashed nodes and wakes paused ones whose time has come.
    fn wake_up(&mut self) {
        for n in &mut self.nodes {
            match n.health {
                Health::Down { until } if until <= self.now => {
                    n.health = Health::Up;
                    self.trace
                        .note(self.now, |_| format!("node {} restarts", n.index));
                }
                Health::Paused { until } if until <= self.now => {
                    n.health = Health::Up;
                    n.resumed = true;
                    if let Some(inc) = &mut n.inc {
                        for pod in inc.pods.values_mut() {
                            pod.inflight = self.rng.random_bool(0.5);
                        }
                    }
                    self.trace
                        .note(self.now, |_| format!("node {} resumes", n.index));
                }
                _ => {}
            }
        }
    }

    fn apply(&mut self, fault: Fault) {
        let now = self.now;
        self.trace.note(now, |_| format!("fault: {fault:?}"));
        match fault {
            Fault::Crash(i, after) => {
                if matches!(self.nodes[i].health, Health::Down { .. }) {
                    return;
                }
                self.stats.node_crashes += 1;
                let mut cx = Ctx {
                    now,
                    model: &mut self.model,
                    trace: &mut self.trace,
                    rng: &mut self.rng,
                    timers: &self.cfg.timers,
                    ids: &mut self.ids,
                    effects: &mut self.effects,
                    stats: &mut self.stats,
                    crash_chance: self.cfg.crash_chance,
                };
                self.nodes[i].crash(&mut cx, now + after);
            }
            Fault::Pause(i, length) => {
                if self.nodes[i].health == Health::Up {
                    self.stats.pauses += 1;
                    self.nodes[i].health = Health::Paused {
                        until: now + length,
                    };
                }
            }
            Fault::KillSession(i) => {
                if let Some(inc) = &self.nodes[i].inc
                    && self.model.locks.alive(inc.session)
                {
                    self.stats.session_kills += 1;
                    self.model.end_session(inc.session);
                }
            }
            Fault::Skew(i, rate) => {
                self.stats.skews += 1;
                self.nodes[i].clock.set_rate(now, rate);
            }
            Fault::LossyBus(on) => self.lossy = on,
        }
    }

    /// A caller's command: start, stop, restart, complete or cancel a task, or create
    /// one while there is room.
    fn api(&mut self) {
        let open: Vec<TaskId> = self
            .model
            .tasks()
            .filter(|r| !r.state.status.is_terminal())
            .map(|r| r.state.task_id)
            .collect();
        if open.len() < self.cfg.max_tasks && (open.is_empty() || self.rng.random_bool(0.2)) {
            let active = self.rng.random_bool(0.8);
            self.create_task(active);
            return;
        }
        let task = open[self.rng.random_range(0..open.len())];
        let command = match self.rng.random_range(0..100) {
            0..45 => Command::RequestStart,
            45..65 => Command::RequestStop { reason: None },
            65..85 => Command::RequestRestart,
            85..93 => Command::Complete,
            _ => Command::Cancel {
                reason: "sim".into(),
            },
        };
        let answer = self.model.execute(task, &command);
        self.trace.note(self.now, |t| {
            let what = match &answer {
                Ok(s) => format!("{} v{} {}", s.status, s.version, s.pod_state),
                Err(why) => format!("refused: {why}"),
            };
            format!("api {} {}: {what}", command.name(), t.task(task))
        });
    }

    /// The bus: every committed change is announced on its partition's channel, to
    /// the nodes that subscribed (those that believe they own it), unless lost.
    fn publish(&mut self) {
        let to = self.model.watermark();
        let changed = self.model.changed(self.published, to);
        self.published = to;
        for task in changed {
            let Some(partition) = self.model.task(task).map(|r| r.partition) else {
                continue;
            };
            for n in &mut self.nodes {
                if matches!(n.health, Health::Down { .. }) {
                    continue;
                }
                let Some(inc) = &mut n.inc else {
                    continue;
                };
                if !inc.owned.contains_key(&partition) {
                    continue;
                }
                if self.lossy && self.rng.random_bool(0.5) {
                    self.stats.lost_wakeups += 1;
                    continue;
                }
                inc.woken.insert(task);
            }
        }
    }

    /// The end of the faults: crashed nodes restart, paused ones resume, the bus stops
    /// losing messages.
    pub fn heal(&mut self) {
        for n in &mut self.nodes {
            match n.health {
                Health::Down { until } | Health::Paused { until } if until > self.now => {
                    n.health = match n.health {
                        Health::Paused { .. } => Health::Paused { until: self.now },
                        _ => Health::Down { until: self.now },
                    };
                }
                _ => {}
            }
        }
        self.lossy = false;
        self.trace
            .note(self.now, |_| "faults stop; every node is back".to_owned());
    }

    /// Whether the task has a status that wants a pod.
    pub fn wants_pod(status: Status) -> bool {
        status == Status::Active
    }
}
