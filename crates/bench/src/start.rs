//! `taskpod bench start`: StartPod -> running latency.
//!
//! Creates `warmup + tasks` inactive `manual` tasks (CreateTasks, batches of 1000),
//! then starts their pods with `concurrency` StartPod calls in flight. StartPod returns
//! when the pod runs, so one call's latency is the whole path: the API's transaction,
//! the worker's wake-up (bus or tick), the mint, the pod's `pod_started` append, and
//! the API noticing it. The first `warmup` calls are not timed. `--idle-pods N` starts
//! N pods first and leaves them running, to time StartPod on a loaded worker. With a
//! database (--dev or --database-url) the store's own view is added: from the
//! `pod_requested` event's transaction to the `pod_started` one's, which leaves out the
//! client, the RPC and the API's polling.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use taskpod_core::store::inspect;
use taskpod_proto::v1;
use tokio::time::Instant;

use super::cluster::Target;
use super::load;
use super::progress::{Progress, say};
use super::report::{Figure, Latencies, Report, Summary, format_us};
use super::{BenchError, CommonArgs, Database, Needs, Scenario, Workers};
use taskpod_client::client::Client;

#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// StartPod calls to time (after the warm-up), one task each
    #[arg(long, value_name = "N", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub tasks: u64,
    /// StartPod calls in flight at once
    #[arg(long, value_name = "C", default_value_t = 8,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub concurrency: u64,
    /// StartPod calls made first and not timed
    #[arg(long, value_name = "N", default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub warmup: u64,
    /// Idle `manual` pods started (and left running) before the timed calls: StartPod
    /// with a loaded worker. Needs a database (--dev or --database-url) to wait on
    #[arg(long, value_name = "N", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub idle_pods: u64,
    /// Leave the pods running on a remote cluster [default: they are cancelled at the
    /// end]
    #[arg(long)]
    pub keep: bool,
    #[command(flatten)]
    pub common: CommonArgs,
}

impl Scenario for StartArgs {
    fn name(&self) -> &'static str {
        "start"
    }

    fn common(&self) -> &CommonArgs {
        &self.common
    }

    fn needs(&self) -> Needs {
        Needs {
            dev_only: false,
            database: Database::Optional,
            workers: Workers::Default(2),
            replicas: 1,
            worker_env: &[],
        }
    }

    /// Flags that do not fit together.
    fn check(&self) -> Result<(), String> {
        if self.keep && self.common.dev {
            return Err("--keep applies to a remote cluster; --dev throws its cluster away".into());
        }
        if self.idle_pods > 0 && !self.common.dev && self.common.database_url.is_none() {
            return Err(
                "--idle-pods waits in the store until they run: add --database-url (or --dev)"
                    .into(),
            );
        }
        Ok(())
    }

    async fn run(self, target: &mut Target) -> Result<Report, BenchError> {
        run(target, self).await
    }
}

/// What one phase of StartPod calls gave.
#[derive(Debug, Default)]
struct Phase {
    latencies: Latencies,
    elapsed: Duration,
    errors: u64,
    /// Calls that returned (at the server's wait limit) before the pod ran.
    not_running: u64,
    first_error: Option<String>,
}

/// Counters the progress line reads while a phase runs.
#[derive(Debug, Default)]
struct Live {
    done: AtomicU64,
    errors: AtomicU64,
    latencies: Mutex<Latencies>,
}

/// Starts the pods of `ids` with `concurrency` calls in flight.
async fn start_pods(
    client: &Client,
    ids: Arc<Vec<String>>,
    concurrency: usize,
    what: &'static str,
) -> Phase {
    let total = ids.len();
    let next = Arc::new(AtomicUsize::new(0));
    let live = Arc::new(Live::default());
    let progress = {
        let live = Arc::clone(&live);
        let started = Instant::now();
        Progress::start("start", move || {
            let done = live.done.load(Ordering::Relaxed);
            let (p50, p99) = live
                .latencies
                .lock()
                .map(|l| (l.quantile_us(0.5), l.quantile_us(0.99)))
                .unwrap_or_default();
            format!(
                "{what} {done}/{total}, {:.0}/s, p50 {}, p99 {}, errors {}",
                done as f64 / started.elapsed().as_secs_f64().max(1e-3),
                format_us(p50),
                format_us(p99),
                live.errors.load(Ordering::Relaxed)
            )
        })
    };
    let started = Instant::now();
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(total.max(1)) {
        let (client, ids, next, live) = (
            client.clone(),
            Arc::clone(&ids),
            Arc::clone(&next),
            Arc::clone(&live),
        );
        callers.spawn(async move {
            let mut phase = Phase::default();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(task_id) = ids.get(index) else {
                    break;
                };
                let call = Instant::now();
                let answer = client
                    .grpc()
                    .start_pod(client.request(v1::StartPodRequest {
                        task_id: task_id.clone(),
                        meta: client.meta(None),
                    }))
                    .await;
                let latency = call.elapsed();
                match answer {
                    Ok(response) => {
                        let running = response
                            .into_inner()
                            .task
                            .is_some_and(|t| t.pod_state == v1::PodState::Running as i32);
                        if running {
                            phase.latencies.record(latency);
                            if let Ok(mut l) = live.latencies.lock() {
                                l.record(latency);
                            }
                        } else {
                            phase.not_running += 1;
                        }
                    }
                    Err(status) => {
                        phase.errors += 1;
                        live.errors.fetch_add(1, Ordering::Relaxed);
                        phase.first_error.get_or_insert_with(|| {
                            format!("{:?}: {}", status.code(), status.message())
                        });
                    }
                }
                live.done.fetch_add(1, Ordering::Relaxed);
            }
            phase
        });
    }
    let mut phase = Phase::default();
    while let Some(joined) = callers.join_next().await {
        if let Ok(part) = joined {
            phase.latencies.merge(&part.latencies);
            phase.errors += part.errors;
            phase.not_running += part.not_running;
            if phase.first_error.is_none() {
                phase.first_error = part.first_error;
            }
        }
    }
    phase.elapsed = started.elapsed();
    progress.finish();
    phase
}

/// From each task's `pod_requested` to its `pod_started`, by the events'
/// `recorded_at` (their transactions' start times, on Postgres's clock).
async fn store_latencies(pool: &PgPool, ids: &[String]) -> Result<Latencies, BenchError> {
    let ids: Vec<uuid::Uuid> = ids.iter().filter_map(|id| id.parse().ok()).collect();
    let micros = inspect::requested_to_started_us(pool, &ids)
        .await
        .map_err(BenchError::store(
            "read pod_requested and pod_started events",
        ))?;
    let mut latencies = Latencies::new();
    for us in micros {
        latencies.record(Duration::from_micros(u64::try_from(us).unwrap_or(0)));
    }
    Ok(latencies)
}

/// Runs the scenario.
///
/// # Errors
/// When tasks cannot be created, or every timed call failed.
async fn run(target: &mut Target, args: StartArgs) -> Result<Report, BenchError> {
    let warmup = usize::try_from(args.warmup).unwrap_or(usize::MAX);
    let tasks = usize::try_from(args.tasks).unwrap_or(usize::MAX);
    let concurrency = usize::try_from(args.concurrency).unwrap_or(1);
    if let (Some(pool), Some(workers)) = (&target.pool, target.info.workers)
        && target.dev.is_some()
    {
        load::wait_partitions_spread(pool, workers, Duration::from_secs(30)).await?;
    }
    let mut idle_ids = Vec::new();
    if args.idle_pods > 0 {
        let pool = target.pool()?.clone();
        let before = load::running_pods(&pool).await?;
        let idle = usize::try_from(args.idle_pods).unwrap_or(usize::MAX);
        idle_ids = load::create_manual_tasks(&target.client, "start", idle, true)
            .await?
            .ids;
        let expected = before + i64::try_from(args.idle_pods).unwrap_or(i64::MAX);
        let took = load::wait_running(&pool, "start", expected, Duration::from_secs(300)).await?;
        say(format!(
            "start: {idle} idle pods running {:.2}s after the last batch",
            took.as_secs_f64()
        ));
    }
    let created = load::create_manual_tasks(&target.client, "start", warmup + tasks, false).await?;
    let ids = &created.ids;
    let (warm, timed) = ids.split_at(warmup.min(ids.len()));
    if !warm.is_empty() {
        let phase = start_pods(
            &target.client,
            Arc::new(warm.to_vec()),
            concurrency,
            "warm-up",
        )
        .await;
        say(format!(
            "start: warm-up of {} calls done in {:.2}s ({} errors)",
            warm.len(),
            phase.elapsed.as_secs_f64(),
            phase.errors
        ));
    }
    let phase = start_pods(
        &target.client,
        Arc::new(timed.to_vec()),
        concurrency,
        "started",
    )
    .await;
    let mut notes = Vec::new();
    if phase.latencies.count() == 0 {
        return Err(BenchError::Failed(format!(
            "start any pod: {} errors, {} not running; first error: {}",
            phase.errors,
            phase.not_running,
            phase.first_error.as_deref().unwrap_or("none")
        )));
    }
    if let Some(first) = &phase.first_error {
        notes.push(format!(
            "{} StartPod calls failed; the first: {first}",
            phase.errors
        ));
    }
    if phase.not_running > 0 {
        notes.push(format!(
            "{} StartPod calls returned before the pod ran (the server's wait limit); \
             they are not in the histogram",
            phase.not_running
        ));
    }

    let mut latencies: Vec<Summary> = vec![phase.latencies.summary(
        "start_to_running",
        "one StartPod call, from sending it until it returns with the pod running",
        phase.elapsed,
    )];
    if let Some(pool) = &target.pool {
        let store = store_latencies(pool, timed).await?;
        latencies.push(store.summary(
            "requested_to_started",
            "in the store: the pod_requested event's transaction to the pod_started one's",
            phase.elapsed,
        ));
    }
    latencies.push(created.summary());

    if target.dev.is_none() && !args.keep {
        let all: Vec<String> = ids.iter().chain(&idle_ids).cloned().collect();
        let failed = load::cancel_tasks(&target.client, &all, concurrency).await;
        say(format!(
            "start: cancelled the {} tasks ({failed} failed)",
            all.len()
        ));
    }

    Ok(Report {
        scenario: "start",
        parameters: vec![
            ("tasks", args.tasks.into()),
            ("concurrency", args.concurrency.into()),
            ("warmup", args.warmup.into()),
            ("idle_pods", args.idle_pods.into()),
        ],
        cluster: target.info.clone(),
        latencies,
        figures: vec![
            Figure::count(
                "timed_calls",
                "StartPod calls timed",
                phase.latencies.count(),
            ),
            Figure::count("errors", "StartPod calls that failed", phase.errors),
            Figure::count(
                "not_running",
                "StartPod calls that returned before the pod ran",
                phase.not_running,
            ),
        ],
        notes,
    })
}
