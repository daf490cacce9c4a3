//! `taskpod bench e2e`: `sleep` tasks from creation to completion, sustained.
//!
//! The dev cluster's workers run the `sleep` handler without delays
//! (`TASKPOD_HANDLERS__SLEEP_PHASE_MS=0`), so a task's life is the platform's work
//! alone: create with auto_start, the worker's wake-up and mint, `pod_started`, three
//! phase moves, `task_completed`, `pod_stopped`, each its own transaction and bus
//! announcement. `--concurrency` creators send CreateTasks calls of `--batch` tasks
//! (single CreateTask calls with `--batch 1`), as long as fewer than `--in-flight`
//! tasks are created and not yet completed; a WatchTasks stream (opened first, for
//! finished `sleep` tasks created from now on) reports each completion and frees its
//! slot. After `--warmup` seconds the tasks created are timed; after `--duration`
//! more, creation stops and the tasks in flight are waited for.
//!
//! Then every task's stream is read from Postgres and checked: a completed task's
//! trail is exactly [`EXPECTED_TRAIL`] (or holds all of it, with more events between,
//! if its pod was restarted), with no version missing. A task that did not complete,
//! or an incomplete trail, fails the run.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use sqlx::PgPool;
use taskpod_core::store::inspect::{self, Trail as Stored};
use taskpod_proto::v1;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::cluster::Target;
use super::create::create_call;
use super::progress::{Progress, say};
use super::report::{Figure, Latencies, Report, format_us};
use super::timed::{self, Rng, Stretch};
use super::{BenchError, CommonArgs, Database, Needs, Scenario, Workers};

/// A `sleep` task's stream when nothing went wrong, in version order.
pub const EXPECTED_TRAIL: [&str; 8] = [
    "task_created",
    "pod_requested",
    "pod_started",
    "phase_changed",
    "phase_changed",
    "phase_changed",
    "task_completed",
    "pod_stopped",
];

/// How long the tasks in flight may take to complete once creation stopped.
const DRAIN: Duration = Duration::from_secs(60);
/// How long completed tasks may take to append their `pod_stopped`.
const SETTLE: Duration = Duration::from_secs(10);
/// Streams read per trail query.
const TRAIL_CHUNK: usize = 5000;
/// The seed of the creators' generators (titles only).
const SEED: u64 = 0x6532_6574_6173_6b73;

#[derive(Debug, clap::Args)]
pub struct E2eArgs {
    /// Tasks per create call: CreateTasks batches of N (1: single CreateTask calls)
    #[arg(long, value_name = "N", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub batch: u64,
    /// Create calls in flight at once
    #[arg(long, value_name = "C", default_value_t = 4,
          value_parser = clap::value_parser!(u64).range(1..=256))]
    pub concurrency: u64,
    /// Tasks created and not yet completed, at most (more only queues: the latency
    /// grows, the rate does not)
    #[arg(long, value_name = "N", default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub in_flight: u64,
    #[command(flatten)]
    pub stretch: Stretch,
    #[command(flatten)]
    pub common: CommonArgs,
}

impl Scenario for E2eArgs {
    fn name(&self) -> &'static str {
        "e2e"
    }

    fn common(&self) -> &CommonArgs {
        &self.common
    }

    fn needs(&self) -> Needs {
        Needs {
            dev_only: false,
            database: Database::Required,
            workers: Workers::Default(2),
            replicas: 1,
            worker_env: &[("TASKPOD_HANDLERS__SLEEP_PHASE_MS", "0")],
        }
    }

    /// A batch larger than what may be in flight.
    fn check(&self) -> Result<(), String> {
        if self.batch > self.in_flight {
            return Err(format!(
                "--batch {} is more than --in-flight {}: no batch could ever be sent",
                self.batch, self.in_flight
            ));
        }
        Ok(())
    }

    async fn run(self, target: &mut Target) -> Result<Report, BenchError> {
        run(target, self).await
    }
}

/// What one task's stream says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trail {
    /// Exactly [`EXPECTED_TRAIL`].
    Complete,
    /// All of [`EXPECTED_TRAIL`] and more (a restarted pod, say).
    Extra,
    /// Something is missing: what, for the error.
    Incomplete(String),
}

/// Checks a completed task's stream: `types` in version order, the head at
/// `head_version`.
pub fn check_trail(head_version: i64, types: &[String]) -> Trail {
    if i64::try_from(types.len()).ok() != Some(head_version) {
        return Trail::Incomplete(format!(
            "{} events stored, the head is at version {head_version}",
            types.len()
        ));
    }
    if types.iter().map(String::as_str).eq(EXPECTED_TRAIL) {
        return Trail::Complete;
    }
    let mut missing = Vec::new();
    let mut checked: Vec<&str> = Vec::new();
    for ty in EXPECTED_TRAIL {
        if checked.contains(&ty) {
            continue;
        }
        checked.push(ty);
        let want = EXPECTED_TRAIL.iter().filter(|t| **t == ty).count();
        let have = types.iter().filter(|t| *t == ty).count();
        if have < want {
            missing.push(format!("{ty} x{}", want - have));
        }
    }
    if missing.is_empty() {
        Trail::Extra
    } else {
        Trail::Incomplete(format!("missing {}", missing.join(", ")))
    }
}

/// A task created and not yet seen completed.
#[derive(Debug, Clone, Copy)]
struct Pending {
    sent: Instant,
    timed: bool,
}

#[derive(Debug, Default)]
struct Shared {
    pending: HashMap<String, Pending>,
    /// Completions seen before their create call returned (the worker can be faster
    /// than the response): matched when it does.
    early: HashMap<String, (Instant, bool)>,
    /// Every task created, and whether it was created in the timed stretch.
    created: Vec<(String, bool)>,
    create_to_completed: Latencies,
    calls: Latencies,
    first_error: Option<String>,
    /// Set when the watch stream fails: the run cannot tell completions any more.
    stream_failed: Option<String>,
}

#[derive(Debug, Default)]
struct Counters {
    created: AtomicU64,
    completed: AtomicU64,
    /// Completions seen in the timed stretch.
    completed_timed: AtomicU64,
    /// Finished, but not completed (failed or cancelled).
    unsuccessful: AtomicU64,
    errors: AtomicU64,
}

/// When the timed stretch starts and ends.
#[derive(Debug, Clone, Copy)]
struct Window {
    from: Instant,
    until: Instant,
}

impl Window {
    fn holds(&self, at: Instant) -> bool {
        at >= self.from && at < self.until
    }
}

/// Records a completion of `task` seen at `at`; returns whether it was pending (so
/// its slot is freed).
fn complete(
    s: &mut Shared,
    counters: &Counters,
    window: Window,
    task: &str,
    at: Instant,
    success: bool,
) -> bool {
    let Some(pending) = s.pending.remove(task) else {
        return false;
    };
    counters.completed.fetch_add(1, Ordering::Relaxed);
    if window.holds(at) {
        counters.completed_timed.fetch_add(1, Ordering::Relaxed);
    }
    if !success {
        counters.unsuccessful.fetch_add(1, Ordering::Relaxed);
    }
    if pending.timed && success {
        s.create_to_completed
            .record(at.saturating_duration_since(pending.sent));
    }
    true
}

/// The trails of `ids`' tasks, with their heads (`created_to_updated_us` is the
/// completion's transaction for a completed task).
async fn read_trails(pool: &PgPool, ids: &[String]) -> Result<Vec<Stored>, BenchError> {
    let ids: Vec<uuid::Uuid> = ids.iter().filter_map(|id| id.parse().ok()).collect();
    let mut all = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(TRAIL_CHUNK) {
        all.extend(
            inspect::trails(pool, chunk)
                .await
                .map_err(BenchError::store("read the tasks' event trails"))?,
        );
    }
    if all.len() != ids.len() {
        return Err(BenchError::Failed(format!(
            "find every task created: {} of {} are in the store",
            all.len(),
            ids.len()
        )));
    }
    Ok(all)
}

/// Reads the trails until no completed task's pod is still stopping (or [`SETTLE`]
/// passed).
async fn settled_trails(pool: &PgPool, ids: &[String]) -> Result<Vec<Stored>, BenchError> {
    let started = Instant::now();
    loop {
        let trails = read_trails(pool, ids).await?;
        let stopping = trails
            .iter()
            .filter(|t| t.status == "completed" && t.pod_state != "none")
            .count();
        if stopping == 0 || started.elapsed() > SETTLE {
            return Ok(trails);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The verdict on every task's trail.
#[derive(Debug, Default)]
struct Verdict {
    complete: u64,
    extra: u64,
    not_completed: Vec<String>,
    incomplete: Vec<String>,
    store: Latencies,
}

fn judge(trails: &[Stored], timed: &HashSet<uuid::Uuid>) -> Verdict {
    let mut verdict = Verdict::default();
    for stored in trails {
        if stored.status != "completed" {
            verdict.not_completed.push(format!(
                "{}: {} (pod {}, version {})",
                stored.task_id, stored.status, stored.pod_state, stored.version
            ));
            continue;
        }
        match check_trail(stored.version, &stored.types) {
            Trail::Complete => verdict.complete += 1,
            Trail::Extra => verdict.extra += 1,
            Trail::Incomplete(why) => verdict.incomplete.push(format!(
                "{}: {why} ({})",
                stored.task_id,
                stored.types.join(", ")
            )),
        }
        if timed.contains(&stored.task_id)
            && let Some(us) = stored.created_to_updated_us
        {
            verdict
                .store
                .record(Duration::from_micros(u64::try_from(us).unwrap_or(0)));
        }
    }
    verdict
}

/// The WatchTasks filter for finished `sleep` tasks created at or after `since`.
pub fn finished_filter(since: chrono::DateTime<chrono::Utc>) -> String {
    format!(
        "kind = sleep AND created_at >= \"{}\" AND (status = completed OR status = failed \
         OR status = cancelled)",
        since.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    )
}

/// Runs the scenario.
///
/// # Errors
/// A failed set-up step, the watch stream failing, tasks that do not complete, or an
/// incomplete event trail.
async fn run(target: &mut Target, args: E2eArgs) -> Result<Report, BenchError> {
    let pool = target.pool()?.clone();
    let client = target.client.clone();
    // Postgres's clock decides created_at, so it also dates the filter; a second of
    // margin, since nothing of ours was created before this run anyway.
    let now = inspect::clock(&pool)
        .await
        .map_err(BenchError::store("read the database's clock"))?;
    let since = now - chrono::Duration::seconds(1);
    let mut stream = client
        .grpc()
        .watch_tasks(client.stream_request(v1::WatchTasksRequest {
            filter: finished_filter(since),
            ..v1::WatchTasksRequest::default()
        }))
        .await
        .map_err(BenchError::rpc("open WatchTasks for finished sleep tasks"))?
        .into_inner();
    loop {
        let message = stream
            .next()
            .await
            .ok_or_else(|| BenchError::Failed("read the watch snapshot: stream ended".into()))?
            .map_err(BenchError::rpc("read the watch snapshot"))?;
        if let Some(v1::watch_tasks_response::Kind::SnapshotDone(_)) = message.kind {
            break;
        }
    }

    let in_flight = usize::try_from(args.in_flight).unwrap_or(usize::MAX);
    let batch = u32::try_from(args.batch).unwrap_or(1);
    let permits = Arc::new(Semaphore::new(in_flight));
    let shared = Arc::new(Mutex::new(Shared::default()));
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let started = Instant::now();
    let window = Window {
        from: started + args.stretch.warmup(),
        until: started + args.stretch.warmup() + args.stretch.duration(),
    };

    let watcher = {
        let (shared, counters, permits, stop) = (
            Arc::clone(&shared),
            Arc::clone(&counters),
            Arc::clone(&permits),
            stop.clone(),
        );
        tokio::spawn(async move {
            let failure = loop {
                let message = tokio::select! {
                    () = stop.cancelled() => break None,
                    message = stream.next() => message,
                };
                let task = match message {
                    None => break Some("the stream ended".to_owned()),
                    Some(Err(status)) => break Some(timed::describe(status)),
                    Some(Ok(v1::WatchTasksResponse {
                        kind: Some(v1::watch_tasks_response::Kind::Task(task)),
                        ..
                    })) => task,
                    Some(Ok(_)) => continue,
                };
                let at = Instant::now();
                let success = task.status == v1::TaskStatus::Completed as i32;
                let Ok(mut s) = shared.lock() else { break None };
                if complete(&mut s, &counters, window, &task.task_id, at, success) {
                    permits.add_permits(1);
                } else {
                    // Not created yet as far as we know: kept for the creator. A later
                    // sighting of a finished task (its pod_stopped) lands here too and
                    // is never asked for: one small entry per task, for one run.
                    s.early.entry(task.task_id).or_insert((at, success));
                }
            };
            if let Some(failure) = failure
                && let Ok(mut s) = shared.lock()
            {
                s.stream_failed = Some(failure);
            }
        })
    };

    let progress = {
        let (counters, shared) = (Arc::clone(&counters), Arc::clone(&shared));
        Progress::start("e2e", move || {
            let now = Instant::now();
            let (p50, p99, pending) = shared
                .lock()
                .map(|s| {
                    (
                        s.create_to_completed.quantile_us(0.5),
                        s.create_to_completed.quantile_us(0.99),
                        s.pending.len(),
                    )
                })
                .unwrap_or_default();
            let timed = now.saturating_duration_since(window.from).as_secs_f64();
            format!(
                "{}created {}, completed {} ({:.0}/s timed), in flight {pending}, \
                 create->completed p50 {} p99 {}, errors {}",
                if now < window.from {
                    "warm-up: "
                } else if now >= window.until {
                    "draining: "
                } else {
                    ""
                },
                counters.created.load(Ordering::Relaxed),
                counters.completed.load(Ordering::Relaxed),
                counters.completed_timed.load(Ordering::Relaxed) as f64 / timed.max(1e-3),
                format_us(p50),
                format_us(p99),
                counters.errors.load(Ordering::Relaxed),
            )
        })
    };

    let mut creators = tokio::task::JoinSet::new();
    let size = (args.batch > 1).then_some(args.batch);
    for creator in 0..args.concurrency {
        let (client, shared, counters, permits, stop) = (
            client.clone(),
            Arc::clone(&shared),
            Arc::clone(&counters),
            Arc::clone(&permits),
            stop.clone(),
        );
        let mut rng = Rng::new(SEED.wrapping_add(creator + 1));
        creators.spawn(async move {
            loop {
                let acquired = tokio::select! {
                    () = stop.cancelled() => break,
                    acquired = Arc::clone(&permits).acquire_many_owned(batch) => acquired,
                };
                let Ok(acquired) = acquired else { break };
                let sent = Instant::now();
                if sent >= window.until {
                    break;
                }
                // From here on the slots are returned one by one, as tasks complete.
                acquired.forget();
                let timed = window.holds(sent);
                let answer = create_call(&client, size, rng.next_u64(), true, "sleep").await;
                let latency = sent.elapsed();
                let Ok(mut s) = shared.lock() else { break };
                match answer {
                    Ok(ids) => {
                        if timed {
                            s.calls.record(latency);
                        }
                        counters
                            .created
                            .fetch_add(ids.len() as u64, Ordering::Relaxed);
                        for id in ids {
                            s.created.push((id.clone(), timed));
                            s.pending.insert(id.clone(), Pending { sent, timed });
                            if let Some((at, success)) = s.early.remove(&id)
                                && complete(&mut s, &counters, window, &id, at, success)
                            {
                                permits.add_permits(1);
                            }
                        }
                    }
                    Err(status) => {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                        s.first_error.get_or_insert(timed::describe(status));
                        permits.add_permits(batch as usize);
                    }
                }
            }
        });
    }

    // Drive until the end of the timed stretch, failing early if the stream does.
    loop {
        let now = Instant::now();
        if now >= window.until {
            break;
        }
        if let Some(failure) = shared.lock().ok().and_then(|s| s.stream_failed.clone()) {
            stop.cancel();
            return Err(BenchError::Failed(format!(
                "follow completions: the watch stream failed: {failure}"
            )));
        }
        tokio::time::sleep((window.until - now).min(Duration::from_millis(100))).await;
    }
    while creators.join_next().await.is_some() {}
    let created_all = counters.created.load(Ordering::Relaxed);
    let drain = Instant::now();
    loop {
        let (pending, failed) = shared
            .lock()
            .map(|s| (s.pending.len(), s.stream_failed.clone()))
            .unwrap_or_default();
        if pending == 0 || failed.is_some() || drain.elapsed() > DRAIN {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = drain.elapsed();
    stop.cancel();
    let _ = watcher.await;
    progress.finish();

    let (created, calls, create_to_completed, first_error, pending, stream_failed) = {
        let mut s = shared
            .lock()
            .map_err(|_| BenchError::Failed("read the results".into()))?;
        (
            std::mem::take(&mut s.created),
            s.calls.clone(),
            s.create_to_completed.clone(),
            s.first_error.clone(),
            s.pending.len(),
            s.stream_failed.clone(),
        )
    };
    say(format!(
        "e2e: {created_all} tasks created; {pending} still in flight after {:.1}s; \
         checking their event trails",
        drained.as_secs_f64()
    ));
    let ids: Vec<String> = created.iter().map(|(id, _)| id.clone()).collect();
    let timed_ids: HashSet<uuid::Uuid> = created
        .iter()
        .filter(|(_, timed)| *timed)
        .filter_map(|(id, _)| id.parse().ok())
        .collect();
    let verdict = judge(&settled_trails(&pool, &ids).await?, &timed_ids);
    let timed_list: Vec<uuid::Uuid> = timed_ids.iter().copied().collect();
    // Where a task's time goes: for each version of the trail, the time from the event
    // before it to it, p50 and p99 over the timed tasks.
    let steps = inspect::steps(&pool, &timed_list)
        .await
        .map_err(BenchError::store("read the time between the tasks' events"))?;

    if !verdict.incomplete.is_empty() {
        return Err(BenchError::Failed(format!(
            "verify the event trails: {} of {} completed tasks have an incomplete trail; \
             the first: {}",
            verdict.incomplete.len(),
            verdict.complete + verdict.extra + verdict.incomplete.len() as u64,
            verdict.incomplete[0]
        )));
    }
    if !verdict.not_completed.is_empty() {
        return Err(BenchError::Failed(format!(
            "complete every task: {} of {created_all} did not complete{}; the first: {}",
            verdict.not_completed.len(),
            stream_failed
                .map(|f| format!(" (the watch stream failed: {f})"))
                .unwrap_or_default(),
            verdict.not_completed[0]
        )));
    }
    if create_to_completed.count() == 0 {
        return Err(BenchError::Failed(format!(
            "complete any task in the timed stretch: {} create calls failed; first: {}",
            counters.errors.load(Ordering::Relaxed),
            first_error.as_deref().unwrap_or("none")
        )));
    }

    let duration = args.stretch.duration();
    let mut notes = vec![
        "create_to_completed: the create call sent -> the completion on a WatchTasks stream \
         of the same replica, for tasks created in the timed stretch"
            .to_owned(),
        "store_created_to_completed: the task's created_at -> its updated_at (the \
         completing transaction's start), on Postgres's clock"
            .to_owned(),
        "step_N_*: from the event before version N to version N, by the events' \
         recorded_at (their transactions' starts), over the tasks created in the timed \
         stretch: where a task's time goes"
            .to_owned(),
    ];
    if target.dev.is_none() {
        notes.push(
            "on a remote cluster the workers' own sleep_phase_ms applies (0 with --dev)".into(),
        );
    }
    if let Some(first) = &first_error {
        notes.push(format!(
            "{} create calls failed; the first: {first}",
            counters.errors.load(Ordering::Relaxed)
        ));
    }
    let completed_timed = counters.completed_timed.load(Ordering::Relaxed);
    Ok(Report {
        scenario: "e2e",
        parameters: [
            &[
                ("batch", args.batch.into()),
                ("concurrency", args.concurrency.into()),
                ("in_flight", args.in_flight.into()),
            ],
            args.stretch.parameters().as_slice(),
        ]
        .concat(),
        cluster: target.info.clone(),
        latencies: vec![
            create_to_completed.summary(
                "create_to_completed",
                "a sleep task from its create call to its completion on a watch stream",
                duration,
            ),
            verdict.store.summary(
                "store_created_to_completed",
                "in the store: created_at -> updated_at of the completed task",
                duration,
            ),
            calls.summary(
                "create_call",
                "one create call (CreateTasks of --batch, or CreateTask)",
                duration,
            ),
        ],
        figures: vec![
            Figure::rate(
                "completed",
                "tasks completed per second (timed stretch)",
                completed_timed,
                duration,
            ),
            Figure::count(
                "completed_timed",
                "tasks completed in the timed stretch",
                completed_timed,
            ),
            Figure::count("tasks_created", "tasks created in all", created_all),
            Figure::count(
                "trails_complete",
                "trails exactly task_created .. pod_stopped (8 events)",
                verdict.complete,
            ),
            Figure::count(
                "trails_with_extra_events",
                "complete trails with more events (a restarted pod)",
                verdict.extra,
            ),
            Figure::count("trails_incomplete", "incomplete trails", 0),
            Figure::count(
                "errors",
                "create calls that failed",
                counters.errors.load(Ordering::Relaxed),
            ),
            Figure::millis("drain", "waiting for the last tasks to complete", drained),
        ]
        .into_iter()
        .chain(steps.iter().flat_map(|step| {
            let (version, ty) = (step.version, &step.event_type);
            let us = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
            [
                Figure::millis(
                    format!("step_{version}_{ty}_p50"),
                    format!("previous event -> v{version} {ty}, p50"),
                    us(step.p50_us),
                ),
                Figure::millis(
                    format!("step_{version}_{ty}_p99"),
                    format!("previous event -> v{version} {ty}, p99"),
                    us(step.p99_us),
                ),
            ]
        }))
        .collect(),
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn types(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_expected_trail_is_complete() {
        assert_eq!(check_trail(8, &types(&EXPECTED_TRAIL)), Trail::Complete);
    }

    #[test]
    fn a_missing_event_is_an_incomplete_trail() {
        let mut short = types(&EXPECTED_TRAIL);
        short.pop();
        // The head says 8, the stream has 7: an event was lost.
        let Trail::Incomplete(why) = check_trail(8, &short) else {
            panic!("accepted");
        };
        assert!(why.contains("7 events stored"), "{why}");
        // The head agrees with the stream, but pod_stopped never came.
        let Trail::Incomplete(why) = check_trail(7, &short) else {
            panic!("accepted");
        };
        assert!(why.contains("pod_stopped x1"), "{why}");
        let mut no_phase = types(&EXPECTED_TRAIL);
        no_phase.remove(4);
        let Trail::Incomplete(why) = check_trail(7, &no_phase) else {
            panic!("accepted");
        };
        assert!(why.contains("phase_changed x1"), "{why}");
    }

    #[test]
    fn a_restarted_pod_adds_events_without_making_the_trail_incomplete() {
        let restarted = types(&[
            "task_created",
            "pod_requested",
            "pod_started",
            "phase_changed",
            "pod_crashed",
            "pod_started",
            "phase_changed",
            "phase_changed",
            "task_completed",
            "pod_stopped",
        ]);
        assert_eq!(check_trail(10, &restarted), Trail::Extra);
    }

    #[test]
    fn the_filter_names_finished_sleep_tasks_since_a_time() {
        let since = chrono::DateTime::parse_from_rfc3339("2026-11-25T18:06:07.123456Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let filter = finished_filter(since);
        assert!(
            filter.contains("created_at >= \"2026-11-25T18:06:07.123456Z\""),
            "{filter}"
        );
        taskpod_core::domain::filter::parse(&filter).unwrap();
    }
}
