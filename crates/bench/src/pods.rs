//! `taskpod bench pods`: what N idle pods cost one worker, and what they cost Postgres
//! in advisory locks (dev cluster only: the bench reads its own worker's `/proc`).
//!
//! One worker owns every partition. The run reads the worker's resident memory
//! (`VmRSS`) and the advisory locks Postgres holds (`pg_locks`) three times: with no
//! pod, with N/10 `manual` pods running, and with N; each reading follows `--settle` of
//! idleness (the warm-up). Ownership is per partition, so the locks should be the
//! partition count plus one per node (the node's own key) at every reading, whatever N
//! is. Then the worker's and Postgres's CPU use over `--idle` seconds of N idle pods.
//!
//! The latency histogram is each pod's start-up in bulk: from its task's `created_at`
//! (CreateTasks with auto_start, batches of 1000) to its `pod_started_at`, for the pods
//! after the first N/10 (which are the warm-up).

use std::time::Duration;

use sqlx::PgPool;
use taskpod_core::store::inspect;
use tokio::time::Instant;

use super::cluster::Target;
use super::load;
use super::procfs;
use super::progress::say;
use super::report::{Figure, Latencies, Report, Unit};
use super::{BenchError, CommonArgs, Database, Needs, Scenario, WORKER_CAPACITY, Workers};

#[derive(Debug, clap::Args)]
pub struct PodsArgs {
    /// Idle pods on the worker at the end (readings at 0, N/10 and N)
    #[arg(long, value_name = "N", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub pods: u64,
    /// Idle time before each reading (the warm-up)
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = taskpod_client::duration::parse)]
    pub settle: Duration,
    /// How long CPU use is sampled with N idle pods
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = taskpod_client::duration::parse)]
    pub idle: Duration,
    #[command(flatten)]
    pub common: CommonArgs,
}

impl Scenario for PodsArgs {
    fn name(&self) -> &'static str {
        "pods"
    }

    fn common(&self) -> &CommonArgs {
        &self.common
    }

    fn needs(&self) -> Needs {
        Needs {
            dev_only: true,
            database: Database::Optional,
            workers: Workers::Exactly(1),
            replicas: 1,
            worker_env: &[],
        }
    }

    /// Fewer than 10 pods (no N/10 reading), or more than a worker runs.
    fn check(&self) -> Result<(), String> {
        if self.pods < 10 {
            return Err(format!(
                "--pods {}: at least 10, so that N/10 is a reading of its own",
                self.pods
            ));
        }
        if self.pods > WORKER_CAPACITY {
            return Err(format!(
                "--pods {}: one worker runs at most {WORKER_CAPACITY} pods (its default capacity)",
                self.pods
            ));
        }
        Ok(())
    }

    async fn run(self, target: &mut Target) -> Result<Report, BenchError> {
        run(target, self).await
    }
}

/// One reading of memory and locks.
#[derive(Debug, Clone, Copy)]
struct Reading {
    pods: u64,
    rss: u64,
    locks: i64,
}

async fn read(pool: &PgPool, pid: u32, pods: u64) -> Result<Reading, BenchError> {
    let rss = procfs::rss_bytes(pid).map_err(|source| BenchError::Proc {
        what: format!("the worker's memory (pid {pid})"),
        source,
    })?;
    let locks = load::advisory_locks(pool).await?;
    say(format!(
        "pods: {pods} pods: worker RSS {} kB, {locks} advisory locks",
        rss / 1024
    ));
    Ok(Reading { pods, rss, locks })
}

/// Per pod start-up: `created_at` to `pod_started_at`.
async fn startup_latencies(pool: &PgPool, ids: &[String]) -> Result<Latencies, BenchError> {
    let ids: Vec<uuid::Uuid> = ids.iter().filter_map(|id| id.parse().ok()).collect();
    let micros = inspect::created_to_pod_started_us(pool, &ids)
        .await
        .map_err(BenchError::store("read the pods' start times"))?;
    let mut latencies = Latencies::new();
    for us in micros.into_iter().flatten() {
        latencies.record(Duration::from_micros(u64::try_from(us).unwrap_or(0)));
    }
    Ok(latencies)
}

fn cpu(pid: u32, with_children: bool) -> Result<Duration, BenchError> {
    let time = if with_children {
        procfs::cpu_time_with_children(pid)
    } else {
        procfs::cpu_time(pid)
    };
    time.map_err(|source| BenchError::Proc {
        what: format!("the CPU time of pid {pid}"),
        source,
    })
}

/// Runs the scenario.
///
/// # Errors
/// A failed step, or pods that do not all start within five minutes.
async fn run(target: &mut Target, args: PodsArgs) -> Result<Report, BenchError> {
    let pool = target.pool()?.clone();
    let dev = target.dev_cluster()?;
    let worker_pid = dev.worker_pid(0)?;
    let postgres_pid = dev.postgres_pid()?;
    let spread = load::wait_partitions_spread(&pool, 1, Duration::from_secs(30)).await?;
    let nodes = load::nodes(&pool).await?;
    let expected_locks = spread.total + nodes;
    let total = args.pods;
    let tenth = total / 10;

    tokio::time::sleep(args.settle).await;
    let empty = read(&pool, worker_pid, 0).await?;

    let first = load::create_manual_tasks(
        &target.client,
        "pods",
        usize::try_from(tenth).unwrap_or(usize::MAX),
        true,
    )
    .await?;
    let expected = i64::try_from(tenth).unwrap_or(i64::MAX);
    load::wait_running(&pool, "pods", expected, Duration::from_secs(300)).await?;
    tokio::time::sleep(args.settle).await;
    let at_tenth = read(&pool, worker_pid, tenth).await?;

    let stage = Instant::now();
    let rest = load::create_manual_tasks(
        &target.client,
        "pods",
        usize::try_from(total - tenth).unwrap_or(usize::MAX),
        true,
    )
    .await?;
    let expected = i64::try_from(total).unwrap_or(i64::MAX);
    load::wait_running(&pool, "pods", expected, Duration::from_secs(300)).await?;
    let stage = stage.elapsed();
    tokio::time::sleep(args.settle).await;
    let at_n = read(&pool, worker_pid, total).await?;

    say(format!(
        "pods: sampling CPU for {:?} with {total} idle pods",
        args.idle
    ));
    let (worker0, postgres0, wall) = (
        cpu(worker_pid, false)?,
        cpu(postgres_pid, true)?,
        Instant::now(),
    );
    tokio::time::sleep(args.idle).await;
    let (worker1, postgres1, wall) = (
        cpu(worker_pid, false)?,
        cpu(postgres_pid, true)?,
        wall.elapsed(),
    );
    let worker_cpu = procfs::core_percent(worker1.saturating_sub(worker0), wall);
    let postgres_cpu = procfs::core_percent(postgres1.saturating_sub(postgres0), wall);

    let startup = startup_latencies(&pool, &rest.ids).await?;
    let per_pod = (at_n.rss as f64 - empty.rss as f64) / total as f64;
    let marginal = if total > tenth {
        (at_n.rss as f64 - at_tenth.rss as f64) / (total - tenth) as f64
    } else {
        0.0
    };

    let mut notes = Vec::new();
    for r in [empty, at_tenth, at_n] {
        if r.locks != expected_locks {
            notes.push(format!(
                "{} advisory locks with {} pods, not the {expected_locks} expected \
                 ({} partitions + {nodes} node(s))",
                r.locks, r.pods, spread.total
            ));
        }
    }
    notes.push(
        "memory is the worker's VmRSS; freed memory that the allocator keeps still counts"
            .to_owned(),
    );
    let mut batches = first.batches.clone();
    batches.merge(&rest.batches);
    let created = load::Created {
        ids: Vec::new(),
        batches,
        elapsed: first.elapsed + rest.elapsed,
    };

    Ok(Report {
        scenario: "pods",
        parameters: vec![
            ("pods", total.into()),
            (
                "settle_ms",
                u64::try_from(args.settle.as_millis())
                    .unwrap_or(u64::MAX)
                    .into(),
            ),
            (
                "idle_ms",
                u64::try_from(args.idle.as_millis())
                    .unwrap_or(u64::MAX)
                    .into(),
            ),
        ],
        cluster: target.info.clone(),
        latencies: vec![
            startup.summary(
                "pod_startup",
                "one pod of the last 9N/10: its task's created_at to its pod_started_at",
                stage,
            ),
            created.summary(),
        ],
        figures: vec![
            Figure::new(
                "rss_no_pods",
                "worker RSS, no pods",
                empty.rss as f64,
                Unit::Bytes,
            ),
            Figure::new(
                "rss_tenth",
                format!("worker RSS, {tenth} pods"),
                at_tenth.rss as f64,
                Unit::Bytes,
            ),
            Figure::new(
                "rss_all",
                format!("worker RSS, {total} pods"),
                at_n.rss as f64,
                Unit::Bytes,
            ),
            Figure::new(
                "rss_per_pod",
                "RSS per idle pod ((N pods - none) / N)",
                per_pod.round(),
                Unit::Bytes,
            ),
            Figure::new(
                "rss_per_pod_marginal",
                "RSS per idle pod ((N - N/10 pods) / (9N/10))",
                marginal.round(),
                Unit::Bytes,
            ),
            Figure::count(
                "advisory_locks_no_pods",
                "advisory locks, no pods",
                u64::try_from(empty.locks).unwrap_or(0),
            ),
            Figure::count(
                "advisory_locks_tenth",
                format!("advisory locks, {tenth} pods"),
                u64::try_from(at_tenth.locks).unwrap_or(0),
            ),
            Figure::count(
                "advisory_locks_all",
                format!("advisory locks, {total} pods"),
                u64::try_from(at_n.locks).unwrap_or(0),
            ),
            Figure::count(
                "advisory_locks_expected",
                format!("expected: {} partitions + {nodes} node(s)", spread.total),
                u64::try_from(expected_locks).unwrap_or(0),
            ),
            Figure::new(
                "idle_cpu_worker",
                format!("worker CPU, {total} idle pods"),
                worker_cpu,
                Unit::CorePercent,
            ),
            Figure::new(
                "idle_cpu_postgres",
                format!("postgres CPU (all backends), {total} idle pods"),
                postgres_cpu,
                Unit::CorePercent,
            ),
        ],
        notes,
    })
}
