//! The worker's control loop: liveness of the lock session, partition ownership, and
//! the pods of owned partitions.
//!
//! One task owns the lock session and all bookkeeping, so there is no shared mutable
//! state; pods are separate tasks it starts, stops (by cancelling their token) and
//! reaps. Nothing a pod does can delay a tick: the loop only waits on the store and
//! on its own timer. Each tick:
//!
//! 1. pings the lock session; a failed ping self-fences (every pod stopped, children
//!    killed, ownership dropped) and the next tick reconnects as a new incarnation;
//! 2. every `claim_interval`, reads membership (probing peers' node keys), claims any
//!    free partition at once and hands back extras above this node's share once
//!    membership has been stable for `settle_ms`, idle partitions first;
//! 3. runs one batched check of the tasks changed since the last tick (the change
//!    feed, commit-order safe: what Redis lost is still there), and every
//!    `full_check_ms` of every active task of its partitions and every pod it runs:
//!    stops pods whose task left `active` or whose epoch moved, records `node_lost`
//!    for pods a dead owner left behind, and mints epochs, in batches, for tasks that
//!    need a pod, highest priority first.
//!
//! A wake-up from the bus runs the same check at once for just the tasks it named, so
//! a start or a stop waits for neither the tick nor a scan of every pod; what an idle
//! pod costs is its share of the rare full check.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use taskpod_core::Error;
use taskpod_core::bus::{BusEvent, Publisher, Subscription, TaskUpdate, channels};
use taskpod_core::domain::restart::{CrashKind, RestartPolicy};
use taskpod_core::domain::{EventMetadata, NodeId, PodState, Status, TaskId};
use taskpod_core::store::crash_batch::CrashItem;
use taskpod_core::store::crashes::{CrashOutcome, CrashReport};
use taskpod_core::store::nodes::PodCandidate;
use taskpod_core::store::{MintRequest, MintedPod, Store};
use taskpod_core::telemetry::context::{continue_trace, traceparent_of};
use taskpod_core::telemetry::metrics::metrics;
use taskpod_core::telemetry::spans::{Destination, process_span};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::appender::Appender;
use crate::handler::Handler;
use crate::lock::{LockSession, NODE_NAMESPACE, PARTITION_NAMESPACE};
use crate::pod::{self, PodExit, PodIo, PodSpec};
use crate::settings::WorkerSettings;
use crate::slots::Slots;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("store: {0}")]
    Store(#[from] Error),
    #[error("lock session: {0}")]
    Lock(#[from] crate::lock::LockError),
    #[error("{0}")]
    Settings(String),
}

/// How often the cluster-wide pending-pod gauges are refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(2);

/// The most tasks one mint statement takes.
const MINT_BATCH: usize = 512;
/// Node losses recorded in one transaction, between two pings of the lock session.
const LOSS_CHUNK: usize = 128;

/// How long after its own fence a node treats adopted pods as interrupted rather than
/// lost.
const INTERRUPTION_WINDOW: Duration = Duration::from_secs(30);

/// A running pod, as the controller tracks it.
#[derive(Debug)]
struct PodHandle {
    epoch: i64,
    partition: i32,
    /// Cancelled by the controller when the pod must stop.
    stop: CancellationToken,
    /// The trace the pod continues, for the span of its crash.
    trace: Option<String>,
}

/// The controller's state; see the module docs for the loop.
pub struct Controller {
    settings: WorkerSettings,
    store: Store,
    node: NodeId,
    lock_key: i32,
    lock: Option<LockSession>,
    /// Partition -> generation at which this node claimed it.
    owned: BTreeMap<i32, i64>,
    /// Partitions being handed back: no new pods; released once empty.
    leaving: BTreeSet<i32>,
    pods: HashMap<TaskId, PodHandle>,
    /// Every pod task; reaped in the loop.
    joins: JoinSet<(TaskId, i64, PodExit)>,
    handlers: BTreeMap<String, Arc<dyn Handler>>,
    slots: BTreeMap<String, Slots>,
    /// Tasks whose previous pod died with its node: their `exec` pods wait the fence
    /// margin.
    adopted: HashSet<TaskId>,
    policy: RestartPolicy,
    membership: Vec<NodeId>,
    membership_since: Instant,
    last_claim: Option<Instant>,
    last_heartbeat: Instant,
    last_prune: Instant,
    /// Announces the changes this node makes (crashes; pods announce their own).
    bus: Publisher,
    /// The pods' appends, batched.
    appender: Appender,
    /// Runs the appender's flushers; waited for at the end of the drain.
    flushers: TaskTracker,
    /// The wake-up subscription: one channel per owned partition. `None` without a bus.
    subscription: Option<Subscription>,
    /// When this node last lost its lock session. Pods of lost nodes adopted soon after
    /// were most likely lost to the same interruption (a Postgres restart ends every
    /// session at once), which is charged to no task.
    last_fence: Option<Instant>,
    /// The last time the lock session answered a ping.
    last_ping: Instant,
    /// Told of every answered ping and of every loss; pods read it.
    liveness: crate::liveness::LivenessFeed,
    last_gauge: Option<Instant>,
    /// Tasks whose next pod is a restart after a crash (`taskpod_pod_restarts_total`).
    restarting: HashSet<TaskId>,
    /// When a dead peer was last found: adopted pods count their failover from it.
    peer_lost_at: Option<Instant>,
    /// Tasks named by wake-ups since the last pass.
    woken: HashSet<TaskId>,
    /// The change feed's position: the tick checks the tasks changed since.
    feed: Option<u64>,
    /// The next pass reads everything (start, new partitions, a bus reconnect).
    full_due: bool,
    last_full: Instant,
    /// Tasks waiting out a restart backoff, and until when.
    backoffs: HashMap<TaskId, chrono::DateTime<chrono::Utc>>,
    /// A pass left tasks unstarted for want of capacity: look again when a pod ends.
    starved: bool,
}

/// A mint being asked for: its span, the trace it continues, and the partition claim
/// it relies on.
#[derive(Debug)]
struct Claim {
    span: tracing::Span,
    asked: Option<String>,
    partition: i32,
    generation: i64,
}

/// Which tasks a pass looks at.
#[derive(Debug)]
enum Scope {
    /// Every active task of the owned partitions and every pod this node runs.
    All,
    /// Only these: named by wake-ups, or a backoff now over.
    Tasks(Vec<TaskId>),
    /// The tasks of this node's that the change feed says changed in `[from, to)`,
    /// and these.
    Changed {
        from: u64,
        to: u64,
        also: Vec<TaskId>,
    },
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("node", &self.node)
            .field("owned", &self.owned.len())
            .field("pods", &self.pods.len())
            .finish()
    }
}

impl Controller {
    /// Registers this process as a node and opens its lock session.
    ///
    /// # Errors
    /// When the store or the lock session cannot be reached.
    pub async fn start(settings: WorkerSettings) -> Result<Self, WorkerError> {
        let store = Store::connect(&settings.store).await?;
        let handlers = crate::handlers::registry(&settings.handlers);
        let slots = handlers
            .keys()
            .map(|kind| {
                let n = settings
                    .handlers
                    .concurrency
                    .get(kind)
                    .copied()
                    .unwrap_or(settings.capacity);
                (kind.clone(), Slots::new(n as usize))
            })
            .collect();
        let policy = settings.restart.policy();
        let flushers = TaskTracker::new();
        let appender = Appender::start(store.clone(), &flushers);
        let mut controller = Self {
            appender,
            flushers,
            store,
            node: NodeId::new(),
            lock_key: 0,
            lock: None,
            owned: BTreeMap::new(),
            leaving: BTreeSet::new(),
            pods: HashMap::new(),
            joins: JoinSet::new(),
            handlers,
            slots,
            adopted: HashSet::new(),
            policy,
            membership: Vec::new(),
            membership_since: Instant::now(),
            last_claim: None,
            last_heartbeat: Instant::now(),
            last_prune: Instant::now(),
            last_fence: None,
            last_ping: Instant::now(),
            liveness: crate::liveness::LivenessFeed::new(settings.lock_detection_bound()).0,
            last_gauge: None,
            restarting: HashSet::new(),
            peer_lost_at: None,
            woken: HashSet::new(),
            feed: None,
            full_due: true,
            last_full: Instant::now(),
            backoffs: HashMap::new(),
            starved: false,
            bus: Publisher::new(&settings.bus).map_err(|e| WorkerError::Settings(e.to_string()))?,
            subscription: None,
            settings,
        };
        controller.connect().await?;
        Ok(controller)
    }

    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Registers a fresh incarnation and takes its node key on a new lock session.
    async fn connect(&mut self) -> Result<(), WorkerError> {
        let mut lock = LockSession::connect(self.settings.lock_url(), &self.settings.lock).await?;
        let node = NodeId::new();
        let programs: Vec<String> = self.settings.handlers.programs.keys().cloned().collect();
        // The key first, the row after: a peer deletes a row whose key nobody holds.
        let lock_key = self.store.reserve_lock_key().await?;
        if !lock.try_lock((NODE_NAMESPACE, lock_key)).await? {
            return Err(WorkerError::Store(Error::Internal(format!(
                "node key {lock_key} is taken"
            ))));
        }
        self.store
            .register_node(
                node,
                lock_key,
                &self.settings.name,
                self.settings.capacity as i32,
                &self.settings.handlers.kinds,
                &programs,
            )
            .await?;
        let old = std::mem::replace(&mut self.node, node);
        if self.lock_key != 0 {
            // The previous incarnation fenced itself; its row goes.
            let _ = self.store.deregister_node(old).await;
        }
        self.lock_key = lock_key;
        self.lock = Some(lock);
        self.last_claim = None;
        tracing::info!(node = %self.node, lock_key, "node registered");
        Ok(())
    }

    /// Runs until `shutdown`, then drains: pods stop cleanly, partitions are handed back,
    /// the node deregisters. Other workers take over at once and record no crash.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.settings.tick());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Owned by this loop; ends with it (the token) or when the handle drops.
        let bus_stop = shutdown.child_token();
        let (mut wakeups, bus_task) =
            match Subscription::start(&self.settings.bus, bus_stop.clone()) {
                Some((subscription, rx, task)) => {
                    self.subscription = Some(subscription);
                    (Some(rx), Some(task))
                }
                None => (None, None),
            };
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(event) = async { match &mut wakeups { Some(rx) => rx.recv().await, None => std::future::pending().await } } => {
                    // A change in an owned partition, or a reconnect after which anything
                    // may have been missed: check those tasks now. Messages that arrived
                    // meanwhile share the check; more arriving during it, the next.
                    self.wake(event);
                    if let Some(rx) = &mut wakeups {
                        while let Ok(event) = rx.try_recv() {
                            self.wake(event);
                        }
                    }
                    if let Err(e) = self.woken_pass().await {
                        self.failed(e).await;
                    }
                    continue;
                }
                () = tokio::time::sleep_until(self.next_backoff()), if !self.backoffs.is_empty() => {
                    // A crashed task may start again: do not wait for the tick.
                    let due = self.due_backoffs();
                    if let Err(e) = self.pass(Scope::Tasks(due)).await {
                        self.failed(e).await;
                    }
                    continue;
                }
                Some(joined) = self.joins.join_next(), if !self.joins.is_empty() => {
                    if let Ok((task, epoch, exit)) = joined {
                        self.reap(task, epoch, exit).await;
                    }
                    continue;
                }
                _ = tick.tick() => {}
            }
            if let Err(e) = self.step().await {
                self.failed(e).await;
            }
        }
        self.drain().await;
        bus_stop.cancel();
        if let Some(task) = bus_task {
            let _ = task.await;
        }
    }

    async fn failed(&mut self, e: WorkerError) {
        tracing::warn!(error = %e, "control step failed");
        if matches!(e, WorkerError::Lock(_)) {
            self.self_fence().await;
        }
    }

    /// Notes what a bus event asks to look at.
    fn wake(&mut self, event: BusEvent) {
        match event {
            BusEvent::Connected => self.full_due = true,
            BusEvent::Message { payload, .. } => {
                // A message that does not parse names nothing; the feed still has it.
                let Ok(update) = serde_json::from_slice::<TaskUpdate>(&payload) else {
                    return;
                };
                consumed(&update);
                // Only a task of this node's may need something of it: a pod it runs, or
                // an active task of a partition it owns. Its own pods moving on need no
                // check.
                let pod = self.pods.get(&update.task_id);
                let own_progress = pod.is_some_and(|p| p.epoch == update.epoch)
                    && update.status == Status::Active
                    && matches!(update.event_type.as_str(), "pod_started" | "phase_changed");
                let may_need_a_pod = update.status == Status::Active
                    && self.owned.contains_key(&update.partition)
                    && !self.leaving.contains(&update.partition);
                if (pod.is_some() || may_need_a_pod) && !own_progress {
                    self.woken.insert(update.task_id);
                }
            }
        }
    }

    /// The check a wake-up triggers: only the tasks it named (everything, after a
    /// reconnect).
    async fn woken_pass(&mut self) -> Result<(), WorkerError> {
        if self.lock.is_none() {
            return Ok(());
        }
        self.keep_lock_alive(false).await?;
        let scope = if self.full_due {
            self.full_scope()
        } else {
            Scope::Tasks(self.woken.drain().collect())
        };
        self.pass(scope).await
    }

    fn full_scope(&mut self) -> Scope {
        self.full_due = false;
        self.last_full = Instant::now();
        self.woken.clear();
        Scope::All
    }

    /// The tick's check: the tasks changed since the last tick (the change feed, which
    /// Redis cannot lose), the ones wake-ups named, and backoffs now over; everything
    /// every `full_check_ms`, and when something asked for it.
    async fn tick_scope(&mut self) -> Result<Scope, WorkerError> {
        let next = self.store.watermark().await?;
        let from = self.feed.replace(next);
        let full_interval = Duration::from_millis(self.settings.full_check_ms);
        let Some(from) =
            from.filter(|_| !self.full_due && self.last_full.elapsed() < full_interval)
        else {
            return Ok(self.full_scope());
        };
        let mut also: Vec<TaskId> = self.woken.drain().collect();
        also.extend(self.due_backoffs());
        Ok(Scope::Changed {
            from,
            to: next,
            also,
        })
    }

    /// The tasks whose restart backoff is over, forgotten here.
    fn due_backoffs(&mut self) -> Vec<TaskId> {
        let now = chrono::Utc::now();
        let mut due = Vec::new();
        self.backoffs.retain(|id, until| {
            let over = *until <= now;
            if over {
                due.push(*id);
            }
            !over
        });
        due
    }

    /// When the earliest backoff ends (by Postgres's clock, read as this one's).
    fn next_backoff(&self) -> Instant {
        let now = chrono::Utc::now();
        let wait = self
            .backoffs
            .values()
            .min()
            .and_then(|until| (*until - now).to_std().ok())
            .unwrap_or_default();
        Instant::now() + wait
    }

    async fn step(&mut self) -> Result<(), WorkerError> {
        if self.lock.is_none() {
            self.connect().await?;
        }
        self.keep_lock_alive(true).await?;
        let claim_due = self
            .last_claim
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(self.settings.claim_interval_ms));
        if claim_due {
            self.claim().await?;
            self.last_claim = Some(Instant::now());
        }
        let scope = self.tick_scope().await?;
        self.pass(scope).await?;
        metrics().node_load(
            &self.settings.name,
            self.pods.len() as i64,
            self.owned.len() as i64,
        );
        // A scan of the active tasks: often enough for a gauge, not every tick.
        if self
            .last_gauge
            .is_none_or(|t| t.elapsed() >= GAUGE_INTERVAL)
        {
            let (pending, oldest) = self.store.pending_pods().await?;
            metrics().pods_pending(pending, oldest);
            self.last_gauge = Some(Instant::now());
        }
        if self.last_heartbeat.elapsed() >= Duration::from_secs(5) {
            self.store.heartbeat_node(self.node).await?;
            self.last_heartbeat = Instant::now();
        }
        if self.last_prune.elapsed() >= Duration::from_secs(3600) {
            let retention = Duration::from_secs(self.settings.restart.crash_retention_seconds);
            if let Ok(n) = self.store.prune_crashes(retention).await
                && n > 0
            {
                tracing::info!(pruned = n, "crash history pruned");
            }
            self.last_prune = Instant::now();
        }
        Ok(())
    }

    /// Pings the lock session when a ping interval has passed (or always, with `now`).
    /// Long steps (adopting thousands of pods) call it as they go: a session left idle
    /// past `idle_session_timeout` is ended by Postgres, and the node would lose every
    /// lock in the middle of its own work.
    async fn keep_lock_alive(&mut self, now: bool) -> Result<(), WorkerError> {
        let due = now
            || self.last_ping.elapsed()
                >= Duration::from_millis(self.settings.lock.ping_interval_ms);
        if let (true, Some(lock)) = (due, &mut self.lock) {
            lock.ping().await?;
            self.last_ping = Instant::now();
            self.liveness.confirm();
        }
        Ok(())
    }

    /// Membership, claims and hand-backs.
    async fn claim(&mut self) -> Result<(), WorkerError> {
        let Some(lock) = &mut self.lock else {
            return Ok(());
        };
        let nodes = self.store.nodes().await?;
        let mut live = Vec::new();
        let mut live_capacity = 0i64;
        let mut offered: BTreeSet<String> = BTreeSet::new();
        for n in &nodes {
            let alive = n.node_id == self.node
                || lock.is_held_elsewhere((NODE_NAMESPACE, n.lock_key)).await?;
            if alive {
                live.push(n.node_id);
                live_capacity += i64::from(n.capacity);
                offered.extend(n.kinds.iter().cloned());
            } else {
                tracing::info!(node = %n.node_id, name = %n.name, "peer is gone");
                self.peer_lost_at = Some(Instant::now());
                self.store.deregister_node(n.node_id).await?;
            }
        }
        live.sort();
        if live != self.membership {
            self.membership = live.clone();
            self.membership_since = Instant::now();
        }
        // Kinds are a cluster contract: a node that cannot run a kind another node
        // offers does not own partitions, so no task waits on a node that cannot run it.
        let mine: BTreeSet<String> = self.handlers.keys().cloned().collect();
        let eligible = offered.is_subset(&mine);

        let partitions = self.store.partitions().await?;
        let live: HashSet<NodeId> = live.into_iter().collect();
        if eligible {
            for p in &partitions {
                if self.owned.contains_key(&p.partition) {
                    continue;
                }
                if p.owner_node.is_some_and(|o| live.contains(&o)) {
                    continue;
                }
                if lock.try_lock((PARTITION_NAMESPACE, p.partition)).await? {
                    let generation = self.store.claim_partition(p.partition, self.node).await?;
                    self.owned.insert(p.partition, generation);
                    // Its tasks, and a dead owner's pods, are found by a full check.
                    self.full_due = true;
                    if let Some(previous) = p.owner_node {
                        tracing::info!(partition = p.partition, from = %previous, "partition adopted");
                    }
                }
            }
        }

        // Hand back extras above this node's share once membership has settled.
        let total = partitions.len() as i64;
        let share = if eligible && live_capacity > 0 {
            (total * i64::from(self.settings.capacity) + live_capacity - 1) / live_capacity
        } else {
            0
        };
        let settled =
            self.membership_since.elapsed() >= Duration::from_millis(self.settings.settle_ms);
        let keeping = self.owned.len() as i64 - self.leaving.len() as i64;
        if settled && keeping > share {
            let busy: HashSet<i32> = self.pods.values().map(|p| p.partition).collect();
            let mut extras: Vec<i32> = self
                .owned
                .keys()
                .copied()
                .filter(|p| !self.leaving.contains(p))
                .collect();
            // Idle partitions first, then the highest numbers (a stable choice).
            extras.sort_by_key(|p| (busy.contains(p), std::cmp::Reverse(*p)));
            for p in extras.into_iter().take((keeping - share) as usize) {
                self.leaving.insert(p);
                for pod in self.pods.values().filter(|pod| pod.partition == p) {
                    pod.stop.cancel();
                }
            }
        }
        self.release_empty_leaving().await?;
        if let Some(subscription) = &self.subscription {
            subscription.set_channels(self.owned.keys().map(|p| channels::partition(*p)).collect());
        }
        Ok(())
    }

    /// Releases partitions being handed back once no pod of theirs runs.
    async fn release_empty_leaving(&mut self) -> Result<(), WorkerError> {
        let busy: HashSet<i32> = self.pods.values().map(|p| p.partition).collect();
        let ready: Vec<i32> = self
            .leaving
            .iter()
            .copied()
            .filter(|p| !busy.contains(p))
            .collect();
        for p in ready {
            self.release(p).await?;
            self.leaving.remove(&p);
        }
        Ok(())
    }

    /// Clears the claim, then unlocks: a claimer that takes the lock next finds the row
    /// free, and a pod started in between is impossible (its mint checks the row).
    async fn release(&mut self, partition: i32) -> Result<(), WorkerError> {
        if let Some(generation) = self.owned.remove(&partition) {
            self.store
                .release_partition(partition, self.node, generation)
                .await?;
            if let Some(lock) = &mut self.lock {
                lock.unlock((PARTITION_NAMESPACE, partition)).await?;
            }
            tracing::debug!(partition, "partition handed back");
        }
        Ok(())
    }

    /// The batched check of the tasks `scope` names: stops pods whose task left
    /// `active`, whose epoch moved or that are asked to stop; records `node_lost` for
    /// pods a dead owner left behind; mints pods for tasks that need one.
    async fn pass(&mut self, scope: Scope) -> Result<(), WorkerError> {
        let candidates = match scope {
            Scope::All => {
                let partitions: Vec<i32> = self.owned.keys().copied().collect();
                let running: Vec<TaskId> = self.pods.keys().copied().collect();
                if partitions.is_empty() && running.is_empty() {
                    return Ok(());
                }
                self.store
                    .pod_candidates(self.node, &partitions, &running)
                    .await?
            }
            Scope::Tasks(ids) => {
                if ids.is_empty() {
                    return Ok(());
                }
                self.store.pod_candidates_of(self.node, &ids).await?
            }
            Scope::Changed { from, to, also } => {
                let partitions: Vec<i32> = self.owned.keys().copied().collect();
                let mut rows = self
                    .store
                    .changed_candidates(self.node, &partitions, from, to)
                    .await?;
                let seen: HashSet<TaskId> = rows.iter().map(|c| c.task_id).collect();
                let also: Vec<TaskId> = also.into_iter().filter(|t| !seen.contains(t)).collect();
                rows.extend(self.store.pod_candidates_of(self.node, &also).await?);
                rows
            }
        };
        let now = chrono::Utc::now();
        let mut to_start: Vec<PodCandidate> = Vec::new();
        let mut lost: Vec<PodCandidate> = Vec::new();
        for c in candidates {
            if let Some(pod) = self.pods.get(&c.task_id) {
                let keep = c.status == Status::Active
                    && c.pod_epoch == pod.epoch
                    && c.pod_state != PodState::Stopping
                    && self.owned.contains_key(&c.partition)
                    && !self.leaving.contains(&c.partition);
                if !keep {
                    pod.stop.cancel();
                }
                continue;
            }
            if c.status != Status::Active
                || !self.owned.contains_key(&c.partition)
                || self.leaving.contains(&c.partition)
            {
                continue;
            }
            if !self.handlers.contains_key(&c.kind) {
                continue;
            }
            match c.pod_state {
                PodState::None => match c.backoff {
                    Some(left) => {
                        let until = now + chrono::Duration::from_std(left).unwrap_or_default();
                        self.backoffs.insert(c.task_id, until);
                    }
                    None => to_start.push(c),
                },
                // A pod minted elsewhere (or by an earlier incarnation of this node)
                // whose owner no longer holds the partition: its node is lost.
                _ => lost.push(c),
            }
        }
        self.record_node_losses(lost).await?;
        self.start_pods(to_start).await
    }

    /// Mints pods for `wanted`, highest priority first, as many as capacity allows, in
    /// batches; each minted task gets its pod.
    async fn start_pods(&mut self, mut wanted: Vec<PodCandidate>) -> Result<(), WorkerError> {
        wanted.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then(a.created_at.cmp(&b.created_at))
        });
        let room = (self.settings.capacity as usize).saturating_sub(self.pods.len());
        if wanted.len() > room {
            self.starved = true;
            wanted.truncate(room);
        }
        for chunk in wanted.chunks(MINT_BATCH) {
            self.keep_lock_alive(false).await?;
            // Each claim continues the trace of the change that asked for the pod; the
            // statement runs in the first one's.
            let mut claims = HashMap::with_capacity(chunk.len());
            let mut requests = Vec::with_capacity(chunk.len());
            for c in chunk {
                let Some(&generation) = self.owned.get(&c.partition) else {
                    continue;
                };
                let claim = tracing::info_span!(
                    "taskpod.pod.claim",
                    task_id = %c.task_id,
                    taskpod.partition = c.partition,
                    taskpod.epoch = tracing::field::Empty,
                    taskpod.batch = chunk.len(),
                );
                continue_trace(&claim, c.traceparent.as_deref());
                claims.insert(
                    c.task_id,
                    Claim {
                        span: claim,
                        asked: c.traceparent.clone(),
                        partition: c.partition,
                        generation,
                    },
                );
                requests.push(MintRequest {
                    task_id: c.task_id,
                    observed_epoch: c.pod_epoch,
                    generation,
                });
            }
            let Some(first) = requests.first().and_then(|r| claims.get(&r.task_id)) else {
                continue;
            };
            let minted = self
                .store
                .mint_pods(self.node, &requests)
                .instrument(first.span.clone())
                .await?;
            if minted.len() < requests.len() {
                self.drop_lost_partitions(&claims).await?;
            }
            for m in minted {
                let Some(claim) = claims.remove(&m.task.task_id) else {
                    continue;
                };
                claim.span.record("taskpod.epoch", m.epoch);
                let trace = traceparent_of(&claim.span)
                    .or(claim.asked)
                    .or_else(|| m.traceparent.clone());
                self.spawn_pod(m, trace);
            }
        }
        Ok(())
    }

    /// Some mints were refused: drop the partitions whose claim is gone (a re-claim by
    /// another node; the lock says otherwise only until the next ping fails).
    async fn drop_lost_partitions(
        &mut self,
        claims: &HashMap<TaskId, Claim>,
    ) -> Result<(), WorkerError> {
        let claimed: BTreeSet<(i32, i64)> = claims
            .values()
            .map(|c| (c.partition, c.generation))
            .collect();
        let claimed: Vec<(i32, i64)> = claimed.into_iter().collect();
        for partition in self.store.lost_partitions(self.node, &claimed).await? {
            tracing::warn!(partition, "claim lost under us");
            self.owned.remove(&partition);
        }
        Ok(())
    }

    /// Records `node_lost` for pods a dead owner left behind: a chunk per transaction
    /// (`Store::record_crashes`: each decides its own restart under its own row lock),
    /// then one publish for the chunk.
    async fn record_node_losses(&mut self, lost: Vec<PodCandidate>) -> Result<(), WorkerError> {
        let interrupted = self
            .last_fence
            .is_some_and(|t| t.elapsed() < INTERRUPTION_WINDOW);
        let kind = if interrupted {
            CrashKind::Interrupted
        } else {
            CrashKind::NodeLost
        };
        for chunk in lost.chunks(LOSS_CHUNK) {
            // A chunk takes a few milliseconds; the lock session must not idle past
            // its timeout however many pods the dead node left.
            self.keep_lock_alive(false).await?;
            let mut jobs = Vec::with_capacity(chunk.len());
            for c in chunk {
                let Some(&generation) = self.owned.get(&c.partition) else {
                    continue;
                };
                let span = tracing::info_span!(
                    "taskpod.pod.node_lost",
                    task_id = %c.task_id,
                    taskpod.epoch = c.pod_epoch,
                );
                continue_trace(&span, c.traceparent.as_deref());
                let metadata = EventMetadata {
                    traceparent: traceparent_of(&span).or_else(|| c.traceparent.clone()),
                    ..self.metadata()
                };
                let owner = c.owner_node.map(|n| n.to_string()).unwrap_or_default();
                let report = CrashReport {
                    task_id: c.task_id,
                    epoch: c.pod_epoch,
                    node: c.owner_node,
                    reason: if interrupted {
                        format!("node {owner} interrupted with the store")
                    } else {
                        format!("node {owner} lost")
                    },
                    kind,
                };
                jobs.push((report, generation, metadata, span));
            }
            // One transaction for the chunk, each pod keeping its own outcome; the
            // spans stay open while it runs, so each pod's trace shows its record.
            let items: Vec<CrashItem> = jobs
                .iter()
                .map(|(report, generation, metadata, _)| CrashItem {
                    report: report.clone(),
                    generation: *generation,
                    jitter: rand::random::<f64>(),
                    metadata: metadata.clone(),
                })
                .collect();
            let answers = self
                .store
                .record_crashes(&items, self.node, &self.policy)
                .await;
            let results: Vec<_> = jobs
                .into_iter()
                .zip(answers)
                .map(|((report, _, metadata, _span), recorded)| {
                    (report.task_id, metadata.traceparent, recorded)
                })
                .collect();
            let mut crashed = Vec::new();
            for (task, traceparent, recorded) in results {
                match recorded {
                    Ok(outcome) => {
                        self.adopted.insert(task);
                        tracing::info!(task.id = %task, ?outcome, "pod of a lost node recorded");
                        self.crash_recorded(task, kind, &outcome);
                        if outcome != CrashOutcome::AlreadyRecorded {
                            crashed.push((task, traceparent));
                        }
                    }
                    Err(Error::StoreUnavailable(e)) => {
                        return Err(Error::StoreUnavailable(e).into());
                    }
                    Err(e) => {
                        tracing::debug!(task.id = %task, error = %e, "node loss not recorded")
                    }
                }
            }
            self.announce_all(crashed, "pod_crashed").await;
        }
        Ok(())
    }

    /// Counts a crash this node recorded, and remembers a coming restart.
    fn crash_recorded(&mut self, task: TaskId, kind: CrashKind, outcome: &CrashOutcome) {
        if *outcome == CrashOutcome::AlreadyRecorded {
            return;
        }
        metrics().pod_crashed(&self.settings.name, kind.as_str());
        if let CrashOutcome::Restart { not_before, .. } = outcome {
            self.restarting.insert(task);
            self.backoffs.insert(task, *not_before);
        }
    }

    fn spawn_pod(&mut self, minted: MintedPod, trace: Option<String>) {
        let (task_id, epoch, partition) =
            (minted.task.task_id, minted.epoch, minted.task.partition);
        let kind = minted.task.kind.clone();
        let Some(handler) = self.handlers.get(&kind).cloned() else {
            return;
        };
        let Some(slots) = self.slots.get(&kind).cloned() else {
            return;
        };
        let adopted = self.adopted.remove(&task_id);
        if self.restarting.remove(&task_id) {
            metrics().pod_restarted(&self.settings.name);
        }
        let spec = PodSpec {
            task: minted.task,
            state: minted.state,
            epoch,
            checkpoint: minted.checkpoint,
            fence_margin: (adopted && kind == "exec").then(|| self.settings.fence_margin()),
            trace: trace.clone(),
            adopted: adopted
                .then_some(self.peer_lost_at)
                .flatten()
                .map(|at| (at, self.settings.name.clone())),
        };
        let stop = CancellationToken::new();
        self.pods.insert(
            task_id,
            PodHandle {
                epoch,
                partition,
                stop: stop.clone(),
                trace,
            },
        );
        let io = PodIo {
            store: self.store.clone(),
            appender: self.appender.clone(),
            bus: self.bus.clone(),
            liveness: self.liveness.liveness(),
        };
        let node = self.node;
        let span = pod::span(&spec, node);
        self.joins.spawn(async move {
            let exit = AssertUnwindSafe(pod::run(io, spec, handler, slots, node, stop))
                .catch_unwind()
                .instrument(span.clone())
                .await
                .unwrap_or_else(|panic| {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    PodExit::Crashed(format!("handler panicked: {what}"))
                });
            span.record("taskpod.exit", exit.name());
            (task_id, epoch, exit)
        });
    }

    /// A pod ended: forget it, and record its crash if it crashed.
    async fn reap(&mut self, task: TaskId, epoch: i64, exit: PodExit) {
        let Some(handle) = self.pods.get(&task) else {
            return;
        };
        if handle.epoch != epoch {
            return;
        }
        let partition = handle.partition;
        let trace = handle.trace.clone();
        self.pods.remove(&task);
        if std::mem::take(&mut self.starved) {
            // A slot is free for a task an earlier pass could not start.
            self.full_due = true;
        }
        tracing::debug!(task.id = %task, epoch, ?exit, "pod ended");
        if let PodExit::Crashed(reason) = exit {
            let Some(&generation) = self.owned.get(&partition) else {
                return;
            };
            let report = CrashReport {
                task_id: task,
                epoch,
                node: Some(self.node),
                reason,
                kind: CrashKind::Handler,
            };
            let span = tracing::info_span!(
                "taskpod.pod.crash",
                task_id = %task,
                taskpod.epoch = epoch,
                taskpod.reason = %report.reason,
                otel.status_code = "ERROR",
            );
            continue_trace(&span, trace.as_deref());
            let metadata = EventMetadata {
                traceparent: traceparent_of(&span).or(trace),
                ..self.metadata()
            };
            let jitter = rand::random::<f64>();
            let recorded = self
                .store
                .record_crash(
                    &report,
                    self.node,
                    generation,
                    &self.policy,
                    jitter,
                    &metadata,
                )
                .instrument(span.clone())
                .await;
            if let Ok(outcome) = &recorded {
                self.crash_recorded(task, CrashKind::Handler, outcome);
            }
            match recorded {
                Ok(CrashOutcome::Failed { error }) => {
                    tracing::info!(task.id = %task, %error, "restart budget spent");
                    self.announce(task, "task_failed", metadata.traceparent)
                        .instrument(span)
                        .await;
                }
                Ok(outcome) => {
                    tracing::info!(task.id = %task, ?outcome, "pod crashed");
                    if outcome != CrashOutcome::AlreadyRecorded {
                        self.announce(task, "pod_crashed", metadata.traceparent)
                            .instrument(span)
                            .await;
                    }
                }
                Err(e) => tracing::warn!(task.id = %task, error = %e, "crash not recorded"),
            }
        }
    }

    /// The lock session failed: assume every lock is lost. Stop every pod at once (their
    /// children are killed as they stop), drop ownership, and reconnect next tick as a
    /// new incarnation.
    async fn self_fence(&mut self) {
        tracing::warn!(node = %self.node, pods = self.pods.len(), "lock session lost, fencing");
        self.last_fence = Some(Instant::now());
        self.liveness.lose();
        for pod in self.pods.values() {
            pod.stop.cancel();
        }
        self.owned.clear();
        self.leaving.clear();
        self.feed = None;
        self.full_due = true;
        if let Some(lock) = self.lock.take() {
            // Closing may hang on a dead socket; do not wait for it.
            drop(lock);
        }
        while let Some(joined) = self.joins.join_next().await {
            if let Ok((task, epoch, _)) = joined
                && self.pods.get(&task).is_some_and(|p| p.epoch == epoch)
            {
                self.pods.remove(&task);
            }
        }
        self.pods.clear();
    }

    async fn drain(mut self) {
        tracing::info!(node = %self.node, pods = self.pods.len(), "draining");
        for pod in self.pods.values() {
            pod.stop.cancel();
        }
        let grace = Duration::from_millis(self.settings.drain_grace_ms);
        let _ = tokio::time::timeout(grace, async {
            while let Some(joined) = self.joins.join_next().await {
                if let Ok((task, epoch, exit)) = joined {
                    self.reap(task, epoch, exit).await;
                }
            }
        })
        .await;
        self.joins.abort_all();
        let owned: Vec<i32> = self.owned.keys().copied().collect();
        for p in owned {
            if let Err(e) = self.release(p).await {
                tracing::warn!(partition = p, error = %e, "hand-back failed; the lock ends with the session");
            }
        }
        let _ = self.store.deregister_node(self.node).await;
        if let Some(lock) = self.lock.take() {
            lock.close().await;
        }
        // The pods are gone, and with this the last handle on the appender.
        let flushers = self.flushers.clone();
        drop(self);
        flushers.close();
        flushers.wait().await;
        tracing::info!("drained");
    }

    /// Announces changes this node recorded, read back in one query, published in one
    /// round trip (best effort, after the commits).
    async fn announce_all(&self, changed: Vec<(TaskId, Option<String>)>, event_type: &str) {
        if changed.is_empty() {
            return;
        }
        let ids: Vec<TaskId> = changed.iter().map(|c| c.0).collect();
        let Ok(tasks) = self.store.get_tasks(&ids).await else {
            return;
        };
        let traces: HashMap<TaskId, Option<String>> = changed.into_iter().collect();
        let updates: Vec<TaskUpdate> = tasks
            .iter()
            .map(|t| {
                let trace = traces.get(&t.task_id).cloned().flatten();
                TaskUpdate::from_task(t, event_type, trace)
            })
            .collect();
        self.bus.publish(&updates).await;
    }

    /// Announces a change this node recorded (best effort, after the commit).
    async fn announce(&self, task: TaskId, event_type: &str, traceparent: Option<String>) {
        if let Ok(state) = self.store.state(task).await {
            let update = TaskUpdate::of(
                &state,
                self.store.partition_count(),
                event_type,
                traceparent,
            );
            self.bus.publish(&[update]).await;
        }
    }

    fn metadata(&self) -> EventMetadata {
        EventMetadata {
            actor_id: format!("worker:{}", self.node),
            correlation_id: format!("worker:{}", self.node),
            ..EventMetadata::default()
        }
    }
}

/// A wake-up is the consumption of a writer's update: when spans are exported, it is
/// a CONSUMER span in the writer's trace (the check it triggers follows at once).
fn consumed(update: &TaskUpdate) {
    if !taskpod_core::telemetry::traces_exported() {
        return;
    }
    let task_id = update.task_id.to_string();
    let _span = process_span(
        Destination::Partition,
        &task_id,
        update.traceparent.as_deref(),
    )
    .entered();
}
