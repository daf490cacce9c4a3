//! The worker's periodic chores, each a small service: the heartbeat, the pending-pod
//! gauges, the crash prune, the event-partition upkeep and the store probe.
//!
//! A service does one thing in [`Service::run_once`] (which a unit test calls
//! directly) at a typed interval from the settings. [`run`] calls it until shutdown,
//! bounds each run, logs failures and goes on; the [`crate::supervisor`] restarts a
//! service whose task died (a panic). None of them runs in the control loop, so none
//! can delay a check, a claim or the lock session's pings. (River's maintenance
//! services, `internal/maintenance/`, are the model.)

pub mod gauges;
pub mod heartbeat;
pub mod partitions;
pub mod probe;
pub mod prune;

use std::time::Duration;

use futures::future::BoxFuture;
use taskpod_core::Error;
use taskpod_core::domain::NodeId;
use taskpod_core::store::Store;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::settings::WorkerSettings;

/// One periodic chore.
pub trait Service: Send + 'static {
    /// For logs and the supervisor.
    fn name(&self) -> &'static str;
    fn interval(&self) -> Duration;
    /// Does the chore once.
    ///
    /// # Errors
    /// When the store fails; the next interval tries again.
    fn run_once(&mut self) -> BoxFuture<'_, Result<(), Error>>;
}

/// The longest one run may take: a run past it is abandoned (a silent connection) and
/// counts as failed.
const RUN_LIMIT: Duration = Duration::from_secs(30);

/// Runs `service` every interval (the first time at once) until `shutdown`.
pub async fn run(mut service: Box<dyn Service>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(service.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let limit = service
            .interval()
            .min(RUN_LIMIT)
            .max(Duration::from_secs(1));
        let name = service.name();
        tokio::select! {
            () = shutdown.cancelled() => return,
            ran = tokio::time::timeout(limit, service.run_once()) => match ran {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(service = name, error = %e, "maintenance run failed"),
                Err(_) => tracing::warn!(service = name, ?limit, "maintenance run timed out"),
            },
        }
    }
}

/// Makes a fresh instance of a service (the first, and after a death).
pub type MakeService = Box<dyn Fn() -> Box<dyn Service> + Send>;

/// The worker's services, by name, with the store probe's verdict (`false` while the
/// pool cannot reach the store) and the heartbeat's view of the current node.
pub fn services(
    store: &Store,
    settings: &WorkerSettings,
    node: watch::Receiver<Option<NodeId>>,
) -> (Vec<(&'static str, MakeService)>, watch::Receiver<bool>) {
    let m = &settings.maintenance;
    let ms = Duration::from_millis;
    let (healthy, verdict) = watch::channel(true);
    let retention = Duration::from_secs(settings.restart.crash_retention_seconds);
    let every = (
        ms(m.heartbeat_ms),
        ms(m.gauges_ms),
        ms(m.crash_prune_ms),
        ms(m.partition_upkeep_ms),
        ms(m.store_probe_ms),
        ms(m.store_fence_after_ms),
    );
    let s = store.clone();
    let heartbeat: MakeService = Box::new(move || {
        Box::new(heartbeat::Heartbeat {
            store: s.clone(),
            node: node.clone(),
            interval: every.0,
        })
    });
    let s = store.clone();
    let gauges: MakeService = Box::new(move || {
        Box::new(gauges::PendingGauges {
            store: s.clone(),
            interval: every.1,
        })
    });
    let s = store.clone();
    let prune: MakeService = Box::new(move || {
        Box::new(prune::CrashPrune {
            store: s.clone(),
            retention,
            interval: every.2,
        })
    });
    let s = store.clone();
    let upkeep: MakeService = Box::new(move || {
        Box::new(partitions::PartitionUpkeep {
            store: s.clone(),
            interval: every.3,
        })
    });
    let s = store.clone();
    let probe: MakeService = Box::new(move || {
        Box::new(probe::StoreProbe::keeping(
            s.clone(),
            every.4,
            every.5,
            healthy.clone(),
        ))
    });
    (
        vec![
            ("heartbeat", heartbeat),
            ("pending_gauges", gauges),
            ("crash_prune", prune),
            ("partition_upkeep", upkeep),
            ("store_probe", probe),
        ],
        verdict,
    )
}
