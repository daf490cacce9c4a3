//! One crash storm: a cluster under client load while a seeded schedule of faults
//! runs, then healing, the hang detector, and the checker. [`run`] returns what
//! happened and what the checker found; [`Plan`] reads which seeds and how long from
//! the environment (`TASKPOD_CHAOS_SEED`, `TASKPOD_CHAOS_SECS`, `TASKPOD_CHAOS_TASKS`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use uuid::Uuid;

use super::check::oracle::{Snapshot, clock};
use super::check::{self, Budget, Input, Report, Violation};
use super::history::History;
use super::inject::{self, Applied};
use super::laps::Laps;
use super::load::{Load, LoadConfig, Mix};
use super::overlap;
use super::programs::{EXEC_LOG, Program};
use super::schedule::{FaultKind, Schedule, Shape};
use super::watchers::{self, STORM_WATCHERS, Watchers};
use crate::cluster::{Cluster, ClusterSpec};
use crate::os;

/// Seeds to run, comma-separated (replays a failing run).
pub const SEED_ENV: &str = "TASKPOD_CHAOS_SEED";
/// Seconds of faults per seed (long mode: e.g. 1800).
pub const SECS_ENV: &str = "TASKPOD_CHAOS_SECS";
/// Tasks per seed (default: [`TASKS_PER_SECOND`] over the storm).
pub const TASKS_ENV: &str = "TASKPOD_CHAOS_TASKS";
/// `1`: one worker runs in a network namespace and the schedule draws real partitions
/// of it (`0`: never). Default: on in long mode (a storm longer than [`CI_SECS`]), off
/// in CI mode, so a CI seed replays the same schedule.
pub const CUTS_ENV: &str = "TASKPOD_CHAOS_CUTS";
/// Seconds of faults per seed in CI mode.
pub const CI_SECS: u64 = 45;
/// Seeds in CI mode.
pub const CI_SEEDS: usize = 2;
/// Creates per second of storm: 45 s gives more than 1,000 tasks per seed.
pub const TASKS_PER_SECOND: f64 = 24.0;

/// Which seeds, how long, how many tasks.
#[derive(Clone, Debug)]
pub struct Plan {
    pub seeds: Vec<u64>,
    pub storm: Duration,
    pub tasks: usize,
    /// False when the environment chose the seeds or the length.
    pub ci: bool,
    /// Real partitions of a worker in a network namespace ([`CUTS_ENV`]).
    pub cuts: bool,
}

impl Plan {
    /// CI mode unless the environment says otherwise: [`CI_SEEDS`] fresh seeds (from
    /// the clock, printed so they can be replayed) of [`CI_SECS`] each.
    ///
    /// # Errors
    /// When a variable does not parse.
    pub fn from_env() -> anyhow::Result<Self> {
        let seeds: Option<Vec<u64>> = std::env::var(SEED_ENV)
            .ok()
            .map(|s| {
                s.split(',')
                    .map(|x| x.trim().parse::<u64>())
                    .collect::<Result<_, _>>()
            })
            .transpose()
            .with_context(|| format!("{SEED_ENV} must be a comma-separated list of integers"))?;
        let secs: Option<u64> = std::env::var(SECS_ENV)
            .ok()
            .map(|s| s.trim().parse())
            .transpose()
            .with_context(|| format!("{SECS_ENV} must be a number of seconds"))?;
        let storm = Duration::from_secs(secs.unwrap_or(CI_SECS));
        let tasks: Option<usize> = std::env::var(TASKS_ENV)
            .ok()
            .map(|s| s.trim().parse())
            .transpose()
            .with_context(|| format!("{TASKS_ENV} must be a number"))?;
        let ci = seeds.is_none() && secs.is_none();
        let cuts = match std::env::var(CUTS_ENV).ok().as_deref().map(str::trim) {
            Some("1") => true,
            Some("0") => false,
            Some(other) => anyhow::bail!("{CUTS_ENV} must be 0 or 1, not {other:?}"),
            None => storm > Duration::from_secs(CI_SECS),
        };
        let seeds = seeds.unwrap_or_else(|| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or_default();
            let n = if secs.is_some() { 1 } else { CI_SEEDS };
            (0..n as u64).map(|i| now % 1_000_000 + i * 7_919).collect()
        });
        Ok(Self {
            seeds,
            storm,
            tasks: tasks.unwrap_or((storm.as_secs_f64() * TASKS_PER_SECOND) as usize),
            ci,
            cuts,
        })
    }
}

/// Everything one storm needs.
#[derive(Clone, Debug)]
pub struct StormConfig {
    pub seed: u64,
    pub storm: Duration,
    pub tasks: usize,
    pub workers: usize,
    pub apis: usize,
    /// The hang detector: every task must be terminal this long after healing.
    pub settle_timeout: Duration,
    /// The workers' lock-session `idle_session_timeout`, low so a paused worker loses
    /// its partitions within the pause.
    pub idle_session_timeout_ms: u64,
    pub budget: Budget,
    pub sleep_phase_ms: u64,
    /// The second worker runs in a network namespace and the schedule draws real
    /// partitions of it.
    pub cuts: bool,
}

impl StormConfig {
    /// 3 workers, 2 replicas, a generous restart policy, a 120 s hang detector.
    pub fn new(seed: u64, storm: Duration, tasks: usize) -> Self {
        Self {
            seed,
            storm,
            tasks,
            workers: 3,
            apis: 2,
            settle_timeout: Duration::from_secs(120),
            idle_session_timeout_ms: 3_000,
            budget: Budget {
                max_restart_attempts: 20,
                restart_window: Duration::from_secs(3_600),
                max_node_losses: 30,
            },
            sleep_phase_ms: 300,
            cuts: false,
        }
    }

    /// The worker in a network namespace, when cuts are on: the second (the last one
    /// reaches Postgres through a fault proxy).
    fn netns_worker(&self) -> Option<usize> {
        (self.cuts && self.workers >= 3).then_some(1)
    }

    fn cluster_spec(&self) -> ClusterSpec {
        let mut spec = worker_settings(
            ClusterSpec::new(self.workers, self.apis),
            Some(self.idle_session_timeout_ms),
            &self.budget,
            self.sleep_phase_ms,
        );
        // The last worker and the last replica reach Postgres through fault proxies,
        // for the network faults.
        if let Some(last) = self.workers.checked_sub(1) {
            spec = spec.worker_via_proxy(last);
        }
        if let Some(last) = self.apis.checked_sub(1) {
            spec = spec.api_via_proxy(last);
        }
        if let Some(index) = self.netns_worker() {
            spec = spec.worker_in_netns(index);
        }
        // Unequal capacities: shares are weighted by them.
        for (i, capacity) in [400, 400, 200].iter().enumerate().take(self.workers) {
            spec = spec.one_worker_env(i, "TASKPOD_CAPACITY", capacity);
        }
        for program in Program::ALL {
            spec.programs.push(program.spec());
        }
        // Heartbeats often enough that the watchers' last resume check is quick.
        spec.api_env("TASKPOD_WATCH__HEARTBEAT_INTERVAL_MS", 2_000)
    }
}

/// The workers' settings of a chaos run: the restart `budget` (auto restart on, short
/// backoffs), `sleep` phases of `sleep_phase_ms`, and the lock session's
/// `idle_session_timeout` when given (else the product's default).
pub fn worker_settings(
    spec: ClusterSpec,
    idle_session_timeout_ms: Option<u64>,
    budget: &Budget,
    sleep_phase_ms: u64,
) -> ClusterSpec {
    let mut spec = spec
        .worker_env("TASKPOD_RESTART__AUTO_RESTART", "true")
        .worker_env(
            "TASKPOD_RESTART__MAX_RESTART_ATTEMPTS",
            budget.max_restart_attempts,
        )
        .worker_env(
            "TASKPOD_RESTART__RESTART_WINDOW_SECONDS",
            budget.restart_window.as_secs(),
        )
        .worker_env("TASKPOD_RESTART__BACKOFF_BASE_MS", 50)
        .worker_env("TASKPOD_RESTART__BACKOFF_MAX_MS", 1_000)
        .worker_env("TASKPOD_RESTART__MAX_NODE_LOSSES", budget.max_node_losses)
        .worker_env("TASKPOD_HANDLERS__SLEEP_PHASE_MS", sleep_phase_ms);
    if let Some(ms) = idle_session_timeout_ms {
        spec = spec.worker_env("TASKPOD_LOCK__IDLE_SESSION_TIMEOUT_MS", ms);
    }
    spec
}

/// What a storm did and what the checker found.
#[derive(Debug)]
pub struct StormOutcome {
    pub seed: u64,
    pub storm: Duration,
    /// Whether real partitions were drawn.
    pub cuts: bool,
    pub schedule: Schedule,
    /// When the first quiet period began (fault times are relative to it).
    pub storm_start_unix_ms: i64,
    pub applied: Vec<Applied>,
    pub history: String,
    pub acked: usize,
    pub unresolved: usize,
    pub timings: Laps,
    pub report: Report,
}

impl StormOutcome {
    /// The fault kinds that really happened.
    pub fn effective_kinds(&self) -> BTreeSet<FaultKind> {
        self.applied
            .iter()
            .filter(|a| a.effective)
            .map(|a| a.fault.kind())
            .collect()
    }

    pub fn total(&self) -> Duration {
        self.timings.total()
    }

    /// The whole story, readable: seed and how to replay it, the schedule and what
    /// each fault did, the client history, timings, figures and every violation.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let verdict = if self.report.is_clean() {
            "clean".to_owned()
        } else {
            format!("{} violation(s)", self.report.violations.len())
        };
        let _ = writeln!(
            out,
            "\n======== crash storm, seed {}: {verdict} ========",
            self.seed
        );
        let _ = writeln!(
            out,
            "replay: {SEED_ENV}={} {SECS_ENV}={} {CUTS_ENV}={} cargo nextest run -p taskpod-e2e --test crash_storm",
            self.seed,
            self.storm.as_secs(),
            u8::from(self.cuts)
        );
        let _ = write!(out, "{}", self.schedule);
        let _ = writeln!(
            out,
            "applied (storm began at {} UTC):",
            clock(self.storm_start_unix_ms)
        );
        let at = |ms: u64| clock(self.storm_start_unix_ms + i64::try_from(ms).unwrap_or(0));
        for a in &self.applied {
            let _ = writeln!(
                out,
                "  {:>3}. {}..{} {}{}: {}",
                a.index,
                at(a.started_ms),
                at(a.ended_ms),
                a.fault,
                if a.effective { "" } else { " (NOT EFFECTIVE)" },
                a.note
            );
        }
        let _ = writeln!(out, "client history: {}", self.history);
        let _ = writeln!(
            out,
            "creates acknowledged during the storm: {}; calls still unresolved after healing: {}",
            self.acked, self.unresolved
        );
        let _ = writeln!(out, "timings: {}", self.timings.render());
        out.push_str(&self.report.render(5));
        out
    }
}

/// Runs one storm end to end.
///
/// # Errors
/// When the cluster cannot be started or put back together (not when an invariant
/// breaks: that is in the report).
pub async fn run(config: &StormConfig) -> anyhow::Result<StormOutcome> {
    let mut timings = Laps::new();

    let mut cluster = Cluster::start(config.cluster_spec())
        .await
        .context("start the cluster")?;
    timings.lap("start");

    let shape = Shape {
        workers: config.workers,
        apis: config.apis,
        idle_session_timeout_ms: config.idle_session_timeout_ms,
        proxied_worker: config.workers.checked_sub(1),
        proxied_api: config.apis.checked_sub(1),
        netns_worker: config.netns_worker(),
    };
    let schedule = Schedule::generate(config.seed, config.storm, &shape);
    let history = Arc::new(History::new());
    let replicas = cluster
        .apis()
        .iter()
        .map(|m| Ok((m.name().to_owned(), m.client()?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let load = Load::new(
        LoadConfig {
            seed: config.seed,
            tasks: config.tasks,
            duration: schedule.planned(),
            clients: 16,
            exec_percent: 15,
            mix: Mix::Storm,
            cancel_percent: 5,
            call_timeout: Duration::from_secs(5),
            retry_grace: Duration::from_secs(10),
        },
        replicas,
        Arc::clone(&history),
    );
    let watchers = Watchers::start(
        &STORM_WATCHERS,
        cluster.clients().context("watchers' clients")?,
    );
    let running = {
        let load = Arc::clone(&load);
        tokio::spawn(async move { load.run().await })
    };
    let nodes = NodeWatch::start(cluster.pool().clone());

    let storm_start = Instant::now();
    let storm_start_unix_ms = unix_ms();
    let ms = |t: Instant| u64::try_from(t.duration_since(storm_start).as_millis()).unwrap_or(0);
    let mut applied = Vec::new();
    // Members that died by themselves: (fault index, name, status, log tail).
    let mut exits = Vec::new();
    for (index, step) in schedule.steps.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(step.quiet_ms)).await;
        let started = Instant::now();
        let (effective, note) = inject::apply(&mut cluster, &step.fault)
            .await
            .with_context(|| {
                format!(
                    "fault {index} ({}) of seed {} could not be carried out\n{schedule}",
                    step.fault, config.seed
                )
            })?;
        exits.extend(
            cluster
                .unexpected_exits()
                .into_iter()
                .map(|(name, status, log)| (index, name, status, log)),
        );
        applied.push(Applied {
            index,
            fault: step.fault.clone(),
            started_ms: ms(started),
            ended_ms: ms(Instant::now()),
            effective,
            note,
        });
    }
    let acked = running.await.unwrap_or(0);
    timings.lap("storm");

    exits.extend(
        cluster
            .unexpected_exits()
            .into_iter()
            .map(|(name, status, log)| (schedule.steps.len(), name, status, log)),
    );
    cluster.heal().await.context("heal the cluster")?;
    let unresolved = load.resolve(20).await;
    timings.lap("heal+resolve");

    settle(&cluster, config.settle_timeout, POD_STOP_GRACE).await;
    // Orphaned program trees log until their loop ends; the overlap needs all of it.
    wait_for_programs(&cluster, Duration::from_secs(40)).await;
    timings.lap("settle");

    let watched = check_watchers(&cluster, watchers).await?;
    timings.lap("watchers");

    let mut snapshot = Snapshot::load(cluster.pool()).await?;
    snapshot.node_names.extend(nodes.stop());
    let log = std::fs::read_to_string(cluster.programs_dir().join(EXEC_LOG)).unwrap_or_default();
    let (exec_lines, torn) = overlap::parse(&log);
    let intents = history.intents();
    let store_outages: Vec<(i64, i64)> = applied
        .iter()
        .filter(|a| a.fault.kind() == FaultKind::CrashPostgres)
        .map(|a| {
            let at = |ms: u64| storm_start_unix_ms + i64::try_from(ms).unwrap_or(0);
            (at(a.started_ms), at(a.ended_ms))
        })
        .collect();
    let mut report = check::check(&Input {
        snapshot: &snapshot,
        intents: &intents,
        exec_lines: &exec_lines,
        budget: &config.budget,
        settle_timeout: config.settle_timeout,
        store_outages: &store_outages,
        exec_overlap_bound: overlap::EXEC_OVERLAP_BOUND,
    });
    report
        .figures
        .insert("exec log lines torn by a kill", torn.to_string());
    report.figures.insert("watchers", watched.figures);
    report.violations.extend(watched.violations);
    for (index, name, status, log) in exits {
        report.violations.push(
            Violation::new(
                "member-exited",
                None,
                format!("{name} exited on its own ({status}), noticed after fault {index}"),
            )
            .with(log.lines().map(|l| format!("  {l}"))),
        );
    }
    timings.lap("check");
    drop(cluster);
    timings.lap("teardown");

    Ok(StormOutcome {
        seed: config.seed,
        storm: config.storm,
        cuts: config.netns_worker().is_some(),
        schedule,
        storm_start_unix_ms,
        applied,
        history: history.summary(),
        acked,
        unresolved,
        timings,
        report,
    })
}

/// What the watchers saw, checked.
struct Watched {
    figures: String,
    violations: Vec<Violation>,
}

/// How long the watchers get to show the final state once every task ended.
const WATCHERS_CONVERGE: Duration = Duration::from_secs(60);

/// Waits for every watcher's view to reach what the store holds, stops them, and
/// checks each history, then one more resume from each last token.
async fn check_watchers(cluster: &Cluster, watchers: Watchers) -> anyhow::Result<Watched> {
    let expected = watchers::expected_views(cluster.pool(), &STORM_WATCHERS).await?;
    watchers.converge(&expected, WATCHERS_CONVERGE).await;
    let histories = watchers.stop().await;
    let mut client = cluster
        .clients()?
        .into_iter()
        .next()
        .context("no API replica")?;
    let mut violations = Vec::new();
    let mut figures = Vec::new();
    for (history, want) in histories.iter().zip(&expected) {
        violations.extend(watchers::check(history, want));
        violations
            .extend(watchers::check_resume(history, &mut client, Duration::from_secs(30)).await);
        figures.push(format!(
            "{}: {} entries, {} resumes, {} tasks in view",
            history.spec.name,
            history.seen.len(),
            history.resumes(),
            history.view().len()
        ));
    }
    Ok(Watched {
        figures: figures.join("; "),
        violations,
    })
}

/// How long a terminal task's pod gets to acknowledge its stop (`pod_state` back to
/// `none`) once every task is terminal.
pub const POD_STOP_GRACE: Duration = Duration::from_secs(20);

/// The hang detector's wait: until every task is terminal (at most `timeout`), then
/// until no terminal task has a pod left (at most `grace` more). What is still open
/// then is reported by the checker.
pub async fn settle(cluster: &Cluster, timeout: Duration, grace: Duration) {
    let open = |sql: &'static str| async move {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(cluster.pool())
            .await
            .ok()
    };
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline
        && open("SELECT count(*) FROM task_heads WHERE status NOT IN ('completed', 'cancelled', 'failed')")
            .await
            != Some(0)
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline
        && open("SELECT count(*) FROM task_heads WHERE pod_state <> 'none'").await != Some(0)
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Now, in unix milliseconds (the clock Postgres's timestamps and the `exec` log use
/// on this one machine).
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// Watches `nodes` during the storm, so evidence can name every worker incarnation
/// (`w2#3`: w2's third), including those whose rows were deleted as dead.
#[derive(Debug)]
pub struct NodeWatch {
    seen: Arc<std::sync::Mutex<BTreeMap<Uuid, String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl NodeWatch {
    pub fn start(pool: sqlx::PgPool) -> Self {
        let seen = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let task = {
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let mut per_name: BTreeMap<String, usize> = BTreeMap::new();
                loop {
                    let rows: Vec<(Uuid, String)> =
                        sqlx::query_as("SELECT node_id, name FROM nodes ORDER BY started_at")
                            .fetch_all(&pool)
                            .await
                            .unwrap_or_default();
                    if let Ok(mut seen) = seen.lock() {
                        for (id, name) in rows {
                            if let std::collections::btree_map::Entry::Vacant(slot) = seen.entry(id)
                            {
                                let n = per_name.entry(name.clone()).or_default();
                                *n += 1;
                                slot.insert(format!("{name}#{n}"));
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            })
        };
        Self { seen, task }
    }

    pub fn stop(self) -> BTreeMap<Uuid, String> {
        self.task.abort();
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Waits until no `exec` program process is left (at most `timeout`).
pub async fn wait_for_programs(cluster: &Cluster, timeout: Duration) {
    let Some(dir) = cluster.programs_dir().to_str() else {
        return;
    };
    let deadline = tokio::time::Instant::now() + timeout;
    while !os::pids_with_cmdline(dir).is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
