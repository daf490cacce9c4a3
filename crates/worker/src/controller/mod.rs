//! The control loop: one task that owns the worker's parts and carries out what the
//! planner decides.
//!
//! The parts, each testable alone: [`crate::ownership`] (this incarnation, its lock
//! keeper, claims and hand-backs), [`crate::planner`] (pure rules), [`crate::checks`]
//! (which tasks the next check reads), [`crate::pod_table`] (the pods), the
//! [`crate::recorder`] (crash records, in a task of its own) and the
//! [`crate::maintenance`] services under the [`crate::supervisor`].
//!
//! The loop waits on: shutdown; the incarnation's fence (its lock session was lost:
//! pods have already been stopped by the fence itself, the loop only drops the books);
//! a supervised task dying; crash outcomes; pods ending; the store probe's verdict;
//! bus wake-ups; backoffs ending; and its tick, which (re)registers when needed, reads
//! membership and claims every `claim_interval_ms`, and runs the feed's check. Nothing
//! here is needed for the lock session to stay alive, or for a node that lost it to
//! stop its pods.

mod check;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use taskpod_core::Error;
use taskpod_core::bus::{BusEvent, Publisher, TaskUpdate, channels};
use taskpod_core::domain::{NodeId, Status, TaskId};
use taskpod_core::store::Store;
use taskpod_core::telemetry::metrics::metrics;
use taskpod_core::telemetry::spans::{Destination, process_span};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::appender::Appender;
use crate::checks::Checks;
use crate::handler::Handler;
use crate::maintenance;
use crate::ownership::Incarnation;
use crate::pod_table::PodTable;
use crate::recorder::{self, Recorded, Recorder, RecorderIo};
use crate::settings::WorkerSettings;
use crate::slots::Slots;
use crate::supervisor::Supervisor;
use crate::wakeups::Wakeups;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("store: {0}")]
    Store(#[from] Error),
    #[error("lock session: {0}")]
    Lock(#[from] crate::lock::LockError),
    #[error("{0}")]
    Settings(String),
    /// A server of the worker (health, metrics) ended while the worker ran.
    #[error("{0}")]
    ServerDied(String),
}

/// How long a drain waits for the crash records of its last pods.
const DRAIN_RECORDS: Duration = Duration::from_secs(5);

/// The worker: see the module docs.
pub struct Controller {
    settings: WorkerSettings,
    store: Store,
    /// Hands out publishing handles: pods and the recorder publish their own changes.
    bus: Publisher,
    handlers: BTreeMap<String, Arc<dyn Handler>>,
    slots: BTreeMap<String, Slots>,
    kinds: BTreeSet<String>,
    programs: BTreeSet<String>,
    /// The pods' appends, batched; its flushers run on `flushers` (with the bus
    /// publisher's task), waited for at the end of the drain.
    appender: Appender,
    flushers: TaskTracker,
    /// The current incarnation; `None` between a fence and the next registration.
    incarnation: Option<Incarnation>,
    /// The current incarnation's node id, for the heartbeat service.
    node_id: watch::Sender<Option<NodeId>>,
    pods: PodTable,
    checks: Checks,
    recorder: Recorder,
    /// Outcomes of the recorder's jobs; the channel outlives recorder tasks.
    recorded: mpsc::UnboundedReceiver<Recorded>,
    services: Supervisor,
    /// Stops the maintenance services at the end of the drain.
    chores_stop: CancellationToken,
    /// False while the store probe cannot reach the store through the pool.
    store_healthy: watch::Receiver<bool>,
    last_claim: Option<Instant>,
    /// The incarnation that lost its session last, and the nodes alive at its last
    /// membership read: compared with the next incarnation's first read, they tell an
    /// interruption of every node at once from the loss of some.
    previous: Option<(NodeId, BTreeSet<NodeId>)>,
    /// Nodes whose pods are interruptions, not node losses: they lost their sessions
    /// together with every other node.
    lost_together: BTreeSet<NodeId>,
    /// When the Postgres server last started, read at each registration.
    server_started_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When a dead peer was last found: adopted pods count their failover from it.
    peer_lost_at: Option<Instant>,
    /// Tasks whose last pod ran elsewhere and did not stop cleanly: their `exec` pods
    /// wait the fence margin.
    adopted: HashSet<TaskId>,
    /// Tasks whose next pod is a restart after a crash (`taskpod_pod_restarts_total`).
    restarting: HashSet<TaskId>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("node", &self.node())
            .field("pods", &self.pods.running())
            .finish()
    }
}

impl Controller {
    /// Connects the pool, registers the first incarnation and starts the background
    /// services.
    ///
    /// # Errors
    /// When the store or the lock session cannot be reached.
    pub async fn start(settings: WorkerSettings) -> Result<Self, WorkerError> {
        let store = Store::connect(&settings.store).await?;
        metrics().known_series(taskpod_core::telemetry::Role::Worker, Some(&settings.name));
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
        let flushers = TaskTracker::new();
        let bus = Publisher::start(&settings.bus, &flushers)
            .map_err(|e| WorkerError::Settings(e.to_string()))?;
        // Every write announces what it committed, through the store.
        let store = store.with_bus(bus.clone());
        let appender = Appender::start(store.clone(), &flushers);
        let (recorder, recorded, inbox) = recorder::channel();
        let (node_id, node_rx) = watch::channel(None);
        let (chores, store_healthy) = maintenance::services(&store, &settings, node_rx);
        let mut services = Supervisor::new();
        let io = RecorderIo {
            store: store.clone(),
            policy: settings.restart_policy(),
            name: settings.name.clone(),
        };
        services.start(
            "recorder",
            Box::new(move || Box::pin(recorder::run(io.clone(), inbox.clone()))),
        );
        let chores_stop = CancellationToken::new();
        for (name, make) in chores {
            let stop = chores_stop.clone();
            services.start(
                name,
                Box::new(move || Box::pin(maintenance::run(make(), stop.clone()))),
            );
        }
        let mut controller = Self {
            kinds: handlers.keys().cloned().collect(),
            programs: settings.handlers.programs.keys().cloned().collect(),
            checks: Checks::new(settings.full_check()),
            handlers,
            slots,
            appender,
            flushers,
            incarnation: None,
            node_id,
            pods: PodTable::default(),
            recorder,
            recorded,
            services,
            chores_stop,
            store_healthy,
            last_claim: None,
            previous: None,
            lost_together: BTreeSet::new(),
            server_started_at: None,
            peer_lost_at: None,
            adopted: HashSet::new(),
            restarting: HashSet::new(),
            bus,
            store,
            settings,
        };
        controller.connect().await?;
        Ok(controller)
    }

    /// The current incarnation's node id (nil between incarnations).
    pub fn node(&self) -> NodeId {
        self.incarnation
            .as_ref()
            .map_or(NodeId(uuid::Uuid::nil()), Incarnation::node)
    }

    async fn connect(&mut self) -> Result<(), WorkerError> {
        self.server_started_at = Some(self.store.server_started_at().await?);
        let incarnation = Incarnation::connect(&self.store, &self.settings).await?;
        self.node_id.send_replace(Some(incarnation.node()));
        self.incarnation = Some(incarnation);
        self.last_claim = None;
        self.checks.reset();
        Ok(())
    }

    /// Runs until `shutdown`, then drains: pods stop cleanly, partitions are handed back,
    /// the node deregisters. Other workers take over at once and record no crash.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.settings.tick());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut wakeups = Wakeups::start(&self.settings.bus, shutdown.child_token());
        loop {
            let backoff = self.checks.next_backoff();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                () = fenced(&self.incarnation) => self.lost_incarnation("lock session lost"),
                death = self.services.next_death() => {
                    if death.name == "recorder" {
                        self.pods.forget_recording();
                    }
                }
                Some(recorded) = self.recorded.recv() => self.settle(recorded),
                Some(ended) = self.pods.join_next() => self.reap(ended),
                Ok(()) = self.store_healthy.changed() => {
                    if !*self.store_healthy.borrow_and_update() && self.incarnation.is_some() {
                        self.lost_incarnation("the store is unreachable through the pool");
                    }
                }
                event = wakeups.next() => {
                    // Messages that arrived meanwhile share the check.
                    self.wake(event);
                    while let Some(event) = wakeups.try_next() {
                        self.wake(event);
                    }
                    let scope = self.checks.woken_scope();
                    let checked = self.check(scope).await;
                    self.outcome(checked);
                }
                () = sleep_until(backoff), if backoff.is_some() => {
                    let due = self.checks.due_backoffs();
                    let checked = self.check(crate::checks::Scope::Tasks(due)).await;
                    self.outcome(checked);
                }
                _ = tick.tick() => {
                    let stepped = self.step().await;
                    self.outcome(stepped);
                    wakeups.set_channels(self.channels());
                }
            }
        }
        self.drain().await;
        wakeups.stop().await;
    }

    /// The wake-up channels of the owned partitions.
    fn channels(&self) -> BTreeSet<String> {
        self.incarnation
            .as_ref()
            .map(|inc| {
                inc.owned()
                    .keys()
                    .map(|p| channels::partition(*p))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Acts on a step's failure: a lock session that failed ends the incarnation; any
    /// other failure waits for the next tick.
    fn outcome(&mut self, result: Result<(), WorkerError>) {
        match result {
            Ok(()) => {}
            Err(WorkerError::Lock(e)) => {
                tracing::warn!(error = %e, "lock session failed");
                self.lost_incarnation("lock session failed");
            }
            Err(e) => tracing::warn!(error = %e, "control step failed"),
        }
    }

    /// The tick: (re)register, membership and claims when due, the feed's check.
    async fn step(&mut self) -> Result<(), WorkerError> {
        if self.incarnation.is_none() {
            if !*self.store_healthy.borrow() {
                return Ok(());
            }
            self.connect().await?;
        }
        let now = Instant::now();
        if claim_due(
            self.last_claim,
            now,
            self.settings.claim_interval(),
            self.settings.tick(),
        ) {
            // A failed round is tried again at the next tick.
            self.claim_round().await?;
            self.last_claim = Some(now);
        }
        let watermark = self.store.watermark().await?;
        let scope = self.checks.tick_scope(watermark);
        self.check(scope).await?;
        if let Some(inc) = &self.incarnation {
            metrics().node_load(
                &self.settings.name,
                self.pods.running() as i64,
                inc.owned().len() as i64,
            );
        }
        Ok(())
    }

    /// Membership, claims, hand-backs and releases.
    async fn claim_round(&mut self) -> Result<(), WorkerError> {
        let partitions = self.store.partition_count() as usize;
        let busy = self.pods.busy_partitions();
        let Some(inc) = &mut self.incarnation else {
            return Ok(());
        };
        if inc
            .refresh_membership(&self.store, partitions)
            .await?
            .peer_lost
        {
            self.peer_lost_at = Some(Instant::now());
        }
        if let Some((old, mut alive)) = self.previous.take() {
            // Every node the last incarnation saw alive is gone now (Postgres was
            // unreachable for all of them at once): their pods are interruptions.
            alive.insert(old);
            if alive.len() >= 2 && alive.iter().all(|n| !inc.live().contains(n)) {
                tracing::info!(nodes = alive.len(), "every node lost its session at once");
                self.lost_together.extend(alive);
            }
        }
        let claimed = inc.claim(&self.store).await;
        if matches!(claimed, Ok(n) if n > 0) || claimed.is_err() {
            // Their tasks, and a dead owner's pods, are found by a full check.
            self.checks.read_everything();
        }
        claimed?;
        inc.rebalance(
            &busy,
            self.settings.settle(),
            self.settings.handback_deadline(),
        );
        self.pods.stop_in(&inc.evicting(Instant::now()));
        inc.release_idle(&self.store, &busy).await?;
        Ok(())
    }

    /// The incarnation is over (its session was lost, or must be let go): its pods stop
    /// (the fence has already told them), its books are dropped without waiting on the
    /// store, and the next tick registers a new one.
    fn lost_incarnation(&mut self, why: &str) {
        let Some(inc) = self.incarnation.take() else {
            return;
        };
        // The same words as the fence watcher's: whichever notices first, an operator
        // (and the partition suite's timeline) reads one line for a self-fence.
        tracing::warn!(node = %inc.node(), pods = self.pods.running(), why, "fencing every pod");
        self.previous = Some((inc.node(), inc.live().clone()));
        inc.abandon();
        self.pods.stop_all();
        self.node_id.send_replace(None);
        self.checks.reset();
    }

    /// Notes what a bus event asks to look at.
    fn wake(&mut self, event: BusEvent) {
        let update = match event {
            BusEvent::Connected => {
                self.checks.read_everything();
                return;
            }
            BusEvent::Message { payload, .. } => {
                // A message that does not parse names nothing; the feed still has it.
                match serde_json::from_slice::<TaskUpdate>(&payload) {
                    Ok(update) => update,
                    Err(_) => return,
                }
            }
        };
        consumed(&update);
        let Some(inc) = &self.incarnation else {
            return;
        };
        // Only a task of this node's may need something of it: a pod it runs, or an
        // active task of a partition it owns and keeps. Its own pods moving on need no
        // check.
        let epoch = self.pods.epoch_of(update.task_id);
        let own_progress = epoch == Some(update.epoch)
            && update.status == Status::Active
            && matches!(update.event_type.as_str(), "pod_started" | "phase_changed");
        let may_need_a_pod = update.status == Status::Active
            && inc.owned().contains_key(&update.partition)
            && !inc.leaving().contains(&update.partition);
        if (epoch.is_some() || may_need_a_pod) && !own_progress {
            self.checks.wake(update.task_id);
        }
    }

    /// SIGTERM: pods stop cleanly within the grace, the ones still running are cut off
    /// and recorded as interrupted (charged to no task), partitions are handed back and
    /// the node deregisters, so the others take over at once.
    async fn drain(mut self) {
        tracing::info!(node = %self.node(), pods = self.pods.running(), "draining");
        self.pods.stop_all();
        let grace = self.settings.drain_grace();
        let _ = tokio::time::timeout(grace, async {
            while let Some(ended) = self.pods.join_next().await {
                self.reap(ended);
            }
        })
        .await;
        for (task, epoch, partition) in self.pods.abort_all() {
            self.record_end(
                task,
                epoch,
                partition,
                None,
                taskpod_core::domain::restart::CrashKind::Interrupted,
                "cut off by the drain".into(),
            );
        }
        // The crash records of the last pods, before the partitions go.
        let _ = tokio::time::timeout(DRAIN_RECORDS, async {
            while !self.pods.slots().is_empty() {
                match self.recorded.recv().await {
                    Some(recorded) => self.settle(recorded),
                    None => break,
                }
            }
        })
        .await;
        if let Some(mut inc) = self.incarnation.take() {
            if let Err(e) = inc.release_all(&self.store).await {
                tracing::warn!(error = %e, "hand-back failed; the locks end with the session");
            }
            inc.close(&self.store).await;
        }
        self.chores_stop.cancel();
        let services = std::mem::take(&mut self.services);
        services.shutdown().await;
        // The pods and the recorder are gone, and with this the last handles on the
        // appender and the publisher (which sends what it still holds, within
        // `bus.timeout_ms`).
        let flushers = self.flushers.clone();
        let bus = self.bus.clone();
        drop(self);
        // Store clones hold the publisher too: it stops when told, not when the last
        // handle goes.
        bus.close();
        drop(bus);
        flushers.close();
        flushers.wait().await;
        tracing::info!("drained");
    }
}

/// Resolves when the incarnation's fence is cancelled (never without one).
async fn fenced(incarnation: &Option<Incarnation>) {
    match incarnation {
        Some(inc) => inc.fence().cancelled().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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

/// Whether a claim round is due at the tick `now`, the last one having started at
/// `last`. Rounds run on ticks, so the interval is measured between ticks with half a
/// tick's slack: measured from the end of the last round, or against a tick that fired
/// a little early, 500 ms came out as three ticks of 250 ms, not two, and a dead peer's
/// partitions waited 250 ms longer to be taken over.
fn claim_due(last: Option<Instant>, now: Instant, interval: Duration, tick: Duration) -> bool {
    last.is_none_or(|t| now.saturating_duration_since(t) + tick / 2 >= interval)
}

#[cfg(test)]
mod claim_due_tests {
    use super::claim_due;
    use std::time::Duration;
    use tokio::time::Instant;

    const TICK: Duration = Duration::from_millis(250);
    const INTERVAL: Duration = Duration::from_millis(500);

    #[test]
    fn the_first_round_is_due_at_once() {
        assert!(claim_due(None, Instant::now(), INTERVAL, TICK));
    }

    #[test]
    fn a_round_is_due_every_interval_of_ticks_even_on_an_early_tick() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        assert!(!claim_due(Some(start), at(250), INTERVAL, TICK));
        // Two ticks later, a few milliseconds short of the interval.
        assert!(claim_due(Some(start), at(497), INTERVAL, TICK));
        assert!(claim_due(Some(start), at(500), INTERVAL, TICK));
    }

    #[test]
    fn a_tick_longer_than_the_interval_claims_every_tick() {
        let start = Instant::now();
        let tick = Duration::from_millis(1_000);
        assert!(claim_due(Some(start), start + tick, INTERVAL, tick));
    }
}
