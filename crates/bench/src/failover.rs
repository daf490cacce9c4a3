//! `taskpod bench failover`: time until every pod runs again after a worker holding
//! many of them is SIGKILLed (dev cluster only: the bench kills its own process).
//!
//! Two workers share the partitions evenly; N `manual` pods are started (CreateTasks
//! with auto_start, batches of 1000) and run for `--settle` (the warm-up: every pod
//! started, the workers back to idle ticks). Then the worker holding the most pods is
//! killed, and the store is polled every 10 ms until
//! - the dead node's row is gone (its peer found its node key free and deregistered
//!   it),
//! - no partition is owned by it or by nobody (the survivor claimed them all),
//! - every one of the N pods runs on a live node
//!   (`pod_state = 'running' AND owner_node <> killed`).
//!
//! Each adopted pod's own time is its new `pod_started_at` (stamped by the adopting
//! worker just before its `pod_started` append) minus the moment of the kill, both on
//! this machine's clock: those make the histogram.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use taskpod_core::store::inspect::{self, NodeLost, PerNode, Takeover};
use tokio::time::Instant;

use super::cluster::Target;
use super::load;
use super::progress::{Progress, say};
use super::report::{Figure, Latencies, Report};
use super::{BenchError, CommonArgs, Database, Needs, Scenario, WORKER_CAPACITY, Workers};

/// How often the store is read after the kill: the resolution of the figures.
const POLL: Duration = Duration::from_millis(10);

#[derive(Debug, clap::Args)]
pub struct FailoverArgs {
    /// Pods running before the kill (over both workers)
    #[arg(long, value_name = "N", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub pods: u64,
    /// How long every pod runs before the kill (the warm-up)
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = taskpod_client::duration::parse)]
    pub settle: Duration,
    /// Give up when the pods do not all run again within this
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = taskpod_client::duration::parse)]
    pub recovery_timeout: Duration,
    #[command(flatten)]
    pub common: CommonArgs,
}

impl Scenario for FailoverArgs {
    fn name(&self) -> &'static str {
        "failover"
    }

    fn common(&self) -> &CommonArgs {
        &self.common
    }

    fn needs(&self) -> Needs {
        Needs {
            dev_only: true,
            database: Database::Optional,
            workers: Workers::Exactly(2),
            replicas: 1,
            worker_env: &[],
        }
    }

    /// More pods than the surviving worker can run.
    fn check(&self) -> Result<(), String> {
        if self.pods > WORKER_CAPACITY {
            return Err(format!(
                "--pods {}: after the kill one worker runs them all, and a worker runs at \
                 most {WORKER_CAPACITY} (its default capacity)",
                self.pods
            ));
        }
        Ok(())
    }

    async fn run(self, target: &mut Target) -> Result<Report, BenchError> {
        run(target, self).await
    }
}

/// When each milestone after the kill was first seen.
#[derive(Debug, Default)]
struct Milestones {
    node_gone: Option<Duration>,
    partitions_claimed: Option<Duration>,
    first_running: Option<Duration>,
    all_running: Option<Duration>,
}

/// Runs the scenario.
///
/// # Errors
/// A failed step, or pods that do not run again within `--recovery-timeout`.
async fn run(target: &mut Target, args: FailoverArgs) -> Result<Report, BenchError> {
    let pool = target.pool()?.clone();
    let pods = usize::try_from(args.pods).unwrap_or(usize::MAX);
    let expected = i64::try_from(args.pods).unwrap_or(i64::MAX);
    load::wait_partitions_spread(&pool, 2, Duration::from_secs(30)).await?;
    let created = load::create_manual_tasks(&target.client, "failover", pods, true).await?;
    let setup = load::wait_running(&pool, "failover", expected, Duration::from_secs(300)).await?;
    say(format!(
        "failover: {pods} pods running {:.2}s after the last batch; settling {:?}",
        setup.as_secs_f64(),
        args.settle
    ));
    tokio::time::sleep(args.settle).await;

    // The worker holding the most pods.
    let per_node = inspect::running_pods_per_node(&pool)
        .await
        .map_err(BenchError::store("count pods per node"))?;
    let Some(&PerNode {
        node: Some(victim_node),
        count: victim_pods,
    }) = per_node.first()
    else {
        return Err(BenchError::Failed("find a worker running pods".into()));
    };
    let dev = target.dev_cluster()?;
    let victim = dev
        .workers
        .iter()
        .position(|w| w.node.parse::<uuid::Uuid>().ok() == Some(victim_node.0))
        .ok_or_else(|| {
            BenchError::Failed(format!("match node {victim_node} to a worker process"))
        })?;
    let victim_tasks = inspect::running_pods_of(&pool, victim_node)
        .await
        .map_err(BenchError::store("list the victim's pods"))?;
    let victim_partitions = inspect::partitions_of(&pool, victim_node)
        .await
        .map_err(BenchError::store("count the victim's partitions"))?;
    say(format!(
        "failover: SIGKILL worker {} (node {victim_node}): {victim_pods} pods, \
         {victim_partitions} partitions",
        victim + 1
    ));

    let killed_at: DateTime<Utc> = Utc::now();
    let killed = Instant::now();
    dev.kill_worker(victim)?;

    let seen = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let progress = {
        let seen = Arc::clone(&seen);
        Progress::start("failover", move || {
            format!(
                "{}/{expected} running on live nodes, {} partitions left to claim",
                seen.0.load(Ordering::Relaxed),
                seen.1.load(Ordering::Relaxed)
            )
        })
    };
    let mut at = Milestones::default();
    loop {
        let Takeover {
            registered,
            unclaimed_partitions: unclaimed,
            running_elsewhere: running,
        } = inspect::takeover(&pool, victim_node)
            .await
            .map_err(BenchError::store("poll the recovery"))?;
        let now = killed.elapsed();
        seen.0
            .store(u64::try_from(running).unwrap_or(0), Ordering::Relaxed);
        seen.1
            .store(u64::try_from(unclaimed).unwrap_or(0), Ordering::Relaxed);
        if !registered {
            at.node_gone.get_or_insert(now);
        }
        if unclaimed == 0 {
            at.partitions_claimed.get_or_insert(now);
        }
        if running > expected - victim_pods {
            at.first_running.get_or_insert(now);
        }
        if running >= expected {
            at.all_running = Some(now);
            break;
        }
        if now > args.recovery_timeout {
            return Err(BenchError::Timeout {
                what: format!("{expected} pods running again ({running} run)"),
                after: args.recovery_timeout,
            });
        }
        tokio::time::sleep(POLL).await;
    }
    progress.finish();
    let all_running = at.all_running.unwrap_or_default();

    // Each adopted pod's own time, and the node_lost records.
    let started = inspect::pod_started_at(&pool, &victim_tasks)
        .await
        .map_err(BenchError::store("read the adopted pods' start times"))?;
    let mut recovery = Latencies::new();
    for started_at in started.into_iter().flatten() {
        let micros = (started_at - killed_at).num_microseconds().unwrap_or(0);
        recovery.record(Duration::from_micros(u64::try_from(micros).unwrap_or(0)));
    }
    // Where the time goes: the survivor records one node_lost crash per adopted pod
    // (each row's `at` is its transaction's start) before it mints their new epochs.
    let NodeLost {
        crashes: node_lost,
        first: first_lost,
        last: last_lost,
    } = inspect::node_lost(&pool, victim_node)
        .await
        .map_err(BenchError::store("count node_lost crashes"))?;
    let since_kill = |t: Option<DateTime<Utc>>| t.and_then(|t| (t - killed_at).to_std().ok());

    let mut notes = vec![
        "the workers run with their defaults: tick_ms 250, claim_interval_ms 500, \
         lock.ping_interval_ms 300, restart.backoff_base_ms 200 (a node_lost restart waits \
         100-200 ms)"
            .to_owned(),
    ];
    if node_lost != i64::try_from(victim_tasks.len()).unwrap_or(-1) {
        notes.push(format!(
            "{node_lost} node_lost crashes were recorded for {} adopted pods",
            victim_tasks.len()
        ));
    }
    let millis = |key: &str, label: &str, d: Option<Duration>| {
        Figure::millis(key, label, d.unwrap_or_default())
    };
    Ok(Report {
        scenario: "failover",
        parameters: vec![
            ("pods", args.pods.into()),
            (
                "settle_ms",
                u64::try_from(args.settle.as_millis())
                    .unwrap_or(u64::MAX)
                    .into(),
            ),
        ],
        cluster: target.info.clone(),
        latencies: vec![
            recovery.summary(
                "pod_recovery",
                "one pod of the killed worker: from the SIGKILL to its new pod_started_at",
                all_running,
            ),
            created.summary(),
        ],
        figures: vec![
            Figure::count("pods", "pods running before the kill", args.pods),
            Figure::count(
                "pods_on_killed_worker",
                "pods on the killed worker",
                u64::try_from(victim_pods).unwrap_or(0),
            ),
            Figure::count(
                "partitions_on_killed_worker",
                "partitions of the killed worker",
                u64::try_from(victim_partitions).unwrap_or(0),
            ),
            millis(
                "dead_node_deregistered",
                "SIGKILL -> dead node deregistered",
                at.node_gone,
            ),
            millis(
                "partitions_claimed",
                "SIGKILL -> all its partitions claimed",
                at.partitions_claimed,
            ),
            millis(
                "first_node_lost_recorded",
                "SIGKILL -> first node_lost crash recorded",
                since_kill(first_lost),
            ),
            millis(
                "last_node_lost_recorded",
                "SIGKILL -> last node_lost crash recorded",
                since_kill(last_lost),
            ),
            millis(
                "first_pod_running",
                "SIGKILL -> first adopted pod running",
                at.first_running,
            ),
            Figure::millis(
                "all_pods_running",
                "SIGKILL -> every pod running again",
                all_running,
            ),
            Figure::count(
                "node_lost_crashes",
                "node_lost crashes recorded",
                u64::try_from(node_lost).unwrap_or(0),
            ),
            Figure::millis(
                "setup_all_running",
                "set-up: last CreateTasks -> all pods running",
                setup,
            ),
        ],
        notes,
    })
}
