//! `taskpod bench watch`: commit -> watcher latency across two API replicas.
//!
//! Creates `--tasks` inactive `manual` tasks through replica A and moves each to
//! `development` (two TransitionPhase calls). A WatchTasks stream on replica B follows
//! `kind = manual`; once its snapshot is done, the bench drives `--rate` updates/s
//! through replica A for `--warmup` + `--duration` seconds: TransitionPhase back and
//! forth between `development` and `review`, round-robin over the tasks (each task has
//! at most one update in flight, and at most [`MAX_IN_FLIGHT`] in all). Every change
//! the watcher receives is matched to its update by (task, version), and timed twice:
//! - `send_to_watcher`: from the bench sending TransitionPhase to A until B's stream
//!   delivers the change, both on this process's monotonic clock (an upper bound of
//!   commit -> watcher: it adds the client -> API hop and the transaction itself);
//! - `commit_to_watcher`: from the task's `updated_at` until delivery, on the wall
//!   clock (same machine). `updated_at` is the writing transaction's start time
//!   (`now()`), so this overstates commit -> watcher by the transaction's length.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use taskpod_proto::v1;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::cluster::Target;
use super::load;
use super::progress::{Progress, say};
use super::report::{Figure, Latencies, Report, Unit, format_us};
use super::timed::Stretch;
use super::{BenchError, CommonArgs, Database, Needs, Scenario, Workers};
use taskpod_client::client::Client;

/// Updates in flight at once, across all tasks.
pub const MAX_IN_FLIGHT: usize = 256;
/// How long to wait after the last update for the watcher to catch up.
const DRAIN: Duration = Duration::from_secs(3);
/// The driver's tick: each tick sends what is due.
const TICK: Duration = Duration::from_millis(1);

#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// Updates per second driven through replica A
    #[arg(long, value_name = "R", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub rate: u64,
    /// Tasks the updates are spread over (round-robin)
    #[arg(long, value_name = "N", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub tasks: u64,
    #[command(flatten)]
    pub stretch: Stretch,
    #[command(flatten)]
    pub common: CommonArgs,
}

impl Scenario for WatchArgs {
    fn name(&self) -> &'static str {
        "watch"
    }

    fn common(&self) -> &CommonArgs {
        &self.common
    }

    fn needs(&self) -> Needs {
        Needs {
            dev_only: true,
            database: Database::Optional,
            workers: Workers::Default(1),
            replicas: 2,
            worker_env: &[],
        }
    }

    async fn run(self, target: &mut Target) -> Result<Report, BenchError> {
        run(target, self).await
    }
}

/// Updates due after `elapsed` at `rate` per second (the driver sends the difference
/// to what it has sent, so a late tick catches up).
pub fn due(elapsed: Duration, rate: u64) -> u64 {
    (elapsed.as_secs_f64() * rate as f64) as u64
}

/// The phase an update moves a task to: back and forth between development and review.
pub fn toggled(phase: v1::TaskPhase) -> v1::TaskPhase {
    if phase == v1::TaskPhase::Development {
        v1::TaskPhase::Review
    } else {
        v1::TaskPhase::Development
    }
}

/// The next free task from `cursor` on (round-robin), or `None` when all are busy.
pub fn next_free(busy: &[bool], cursor: usize) -> Option<usize> {
    let n = busy.len();
    (0..n).map(|k| (cursor + k) % n).find(|&i| !busy[i])
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    phase: v1::TaskPhase,
    version: i64,
}

/// An update sent and not yet seen by the watcher.
#[derive(Debug, Clone, Copy)]
struct Sent {
    at: Instant,
    timed: bool,
}

#[derive(Debug, Default)]
struct Shared {
    /// The tasks' last known state; `None` while an update is in flight, or for a task
    /// dropped after a failed update.
    slots: Vec<Option<Slot>>,
    /// Keyed by (task index, the version the update makes).
    sent: HashMap<(usize, i64), Sent>,
    send_to_watcher: Latencies,
    commit_to_watcher: Latencies,
    call: Latencies,
}

#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    acked_timed: AtomicU64,
    errors: AtomicU64,
    received: AtomicU64,
    unmatched: AtomicU64,
    behind: AtomicU64,
}

/// Moves each task to `development` (spec_clarification -> planning -> development);
/// returns their states.
async fn to_development(client: &Client, ids: &[String]) -> Result<Vec<Slot>, BenchError> {
    let calls = ids.iter().map(|task_id| async move {
        let mut last = None;
        for phase in [v1::TaskPhase::Planning, v1::TaskPhase::Development] {
            let response = client
                .grpc()
                .transition_phase(client.request(v1::TransitionPhaseRequest {
                    task_id: task_id.clone(),
                    to_phase: phase as i32,
                    meta: client.meta(None),
                }))
                .await
                .map_err(BenchError::rpc(format!("move {task_id} to {phase:?}")))?;
            last = response.into_inner().task;
        }
        let task = last.ok_or_else(|| BenchError::Failed("read a moved task".into()))?;
        Ok::<_, BenchError>(Slot {
            phase: v1::TaskPhase::try_from(task.phase).unwrap_or(v1::TaskPhase::Development),
            version: task.version,
        })
    });
    futures::stream::iter(calls)
        .buffered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// Runs the scenario.
///
/// # Errors
/// A failed set-up step, the watch stream failing, or nothing measured.
async fn run(target: &mut Target, args: WatchArgs) -> Result<Report, BenchError> {
    let (Some(a), Some(b)) = (target.replicas.first(), target.replicas.get(1)) else {
        return Err(BenchError::Failed("find two API replicas".into()));
    };
    let (a, b) = (a.clone(), b.clone());
    let tasks = usize::try_from(args.tasks).unwrap_or(usize::MAX);
    let created = load::create_manual_tasks(&a, "watch", tasks, false).await?;
    let ids = created.ids.clone();
    let setup = Instant::now();
    let slots = to_development(&a, &ids).await?;
    say(format!(
        "watch: {tasks} tasks moved to development in {:.2}s",
        setup.elapsed().as_secs_f64()
    ));
    let index: Arc<HashMap<String, usize>> = Arc::new(
        ids.iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i))
            .collect(),
    );

    let shared = Arc::new(Mutex::new(Shared {
        slots: slots.into_iter().map(Some).collect(),
        ..Shared::default()
    }));
    let counters = Arc::new(Counters::default());

    // The watcher on replica B: snapshot first, then every change.
    let mut stream = b
        .grpc()
        .watch_tasks(b.stream_request(v1::WatchTasksRequest {
            filter: "kind = manual".into(),
            ..v1::WatchTasksRequest::default()
        }))
        .await
        .map_err(BenchError::rpc("open WatchTasks on replica B"))?
        .into_inner();
    let mut snapshot = 0u64;
    loop {
        let message = stream
            .next()
            .await
            .ok_or_else(|| BenchError::Failed("read the watch snapshot: stream ended".into()))?
            .map_err(BenchError::rpc("read the watch snapshot"))?;
        match message.kind {
            Some(v1::watch_tasks_response::Kind::SnapshotDone(_)) => break,
            Some(v1::watch_tasks_response::Kind::Task(_)) => snapshot += 1,
            _ => {}
        }
    }
    say(format!("watch: replica B's snapshot had {snapshot} tasks"));
    let stream_error: Arc<Mutex<Option<String>>> = Arc::default();
    let watcher = {
        let (shared, counters, index, stream_error) = (
            Arc::clone(&shared),
            Arc::clone(&counters),
            Arc::clone(&index),
            Arc::clone(&stream_error),
        );
        tokio::spawn(async move {
            while let Some(message) = stream.next().await {
                let message = match message {
                    Ok(message) => message,
                    Err(status) => {
                        if let Ok(mut e) = stream_error.lock() {
                            *e = Some(format!("{:?}: {}", status.code(), status.message()));
                        }
                        break;
                    }
                };
                let Some(v1::watch_tasks_response::Kind::Task(task)) = message.kind else {
                    continue;
                };
                let now = Instant::now();
                let wall = SystemTime::now();
                counters.received.fetch_add(1, Ordering::Relaxed);
                let Some(&i) = index.get(&task.task_id) else {
                    counters.unmatched.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let committed = task
                    .updated_at
                    .and_then(|t| SystemTime::try_from(t).ok())
                    .and_then(|t| wall.duration_since(t).ok());
                let Ok(mut s) = shared.lock() else { break };
                match s.sent.remove(&(i, task.version)) {
                    Some(sent) if sent.timed => {
                        s.send_to_watcher.record(now - sent.at);
                        if let Some(d) = committed {
                            s.commit_to_watcher.record(d);
                        }
                    }
                    Some(_) => {}
                    None => {
                        counters.unmatched.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };

    // The driver, through replica A.
    let warmup = args.stretch.warmup();
    let duration = args.stretch.duration();
    let progress = {
        let (counters, shared) = (Arc::clone(&counters), Arc::clone(&shared));
        let started = Instant::now();
        Progress::start("watch", move || {
            let (p50, p99) = shared
                .lock()
                .map(|s| {
                    (
                        s.send_to_watcher.quantile_us(0.5),
                        s.send_to_watcher.quantile_us(0.99),
                    )
                })
                .unwrap_or_default();
            format!(
                "{}{} sent ({:.0}/s), {} seen by B, send->watcher p50 {} p99 {}, errors {}",
                if started.elapsed() < warmup {
                    "warm-up: "
                } else {
                    ""
                },
                counters.sent.load(Ordering::Relaxed),
                counters.sent.load(Ordering::Relaxed) as f64
                    / started.elapsed().as_secs_f64().max(1e-3),
                counters.received.load(Ordering::Relaxed),
                format_us(p50),
                format_us(p99),
                counters.errors.load(Ordering::Relaxed),
            )
        })
    };
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let started = Instant::now();
    let measure_from = started + warmup;
    let until = measure_from + duration;
    let mut issued = 0u64;
    let mut cursor = 0usize;
    let mut calls = tokio::task::JoinSet::new();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        ticker.tick().await;
        let now = Instant::now();
        if now >= until {
            break;
        }
        let timed = now >= measure_from;
        let target_count = due(now - started, args.rate);
        while issued < target_count {
            let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                counters.behind.fetch_add(1, Ordering::Relaxed);
                break;
            };
            // Claim a free task and register the update before sending it.
            let claimed = {
                let Ok(mut s) = shared.lock() else { break };
                let busy: Vec<bool> = s.slots.iter().map(Option::is_none).collect();
                match next_free(&busy, cursor) {
                    Some(i) => {
                        cursor = (i + 1) % busy.len();
                        let slot = s.slots[i].take();
                        slot.map(|slot| {
                            s.sent
                                .insert((i, slot.version + 1), Sent { at: now, timed });
                            (i, slot)
                        })
                    }
                    None => None,
                }
            };
            let Some((i, slot)) = claimed else {
                counters.behind.fetch_add(1, Ordering::Relaxed);
                break;
            };
            issued += 1;
            counters.sent.fetch_add(1, Ordering::Relaxed);
            let (client, shared, counters) =
                (a.clone(), Arc::clone(&shared), Arc::clone(&counters));
            let task_id = ids[i].clone();
            calls.spawn(async move {
                let _permit = permit;
                let call = Instant::now();
                let answer = client
                    .grpc()
                    .transition_phase(client.request(v1::TransitionPhaseRequest {
                        task_id,
                        to_phase: toggled(slot.phase) as i32,
                        meta: client.meta(None),
                    }))
                    .await;
                let latency = call.elapsed();
                let Ok(mut s) = shared.lock() else { return };
                match answer.map(|r| r.into_inner().task) {
                    Ok(Some(task)) => {
                        if timed {
                            s.call.record(latency);
                            counters.acked_timed.fetch_add(1, Ordering::Relaxed);
                        }
                        s.slots[i] = Some(Slot {
                            phase: v1::TaskPhase::try_from(task.phase)
                                .unwrap_or(toggled(slot.phase)),
                            version: task.version,
                        });
                    }
                    _ => {
                        // The task is dropped: its state is no longer known.
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                        s.sent.remove(&(i, slot.version + 1));
                    }
                }
            });
        }
        // Reap finished calls so the set stays small.
        while calls.try_join_next().is_some() {}
    }
    let driven = started.elapsed();
    while calls.join_next().await.is_some() {}
    // Let the watcher catch up with what was sent.
    let drain = Instant::now();
    while drain.elapsed() < DRAIN {
        let pending = shared.lock().map(|s| s.sent.len()).unwrap_or(0);
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    progress.finish();
    watcher.abort();
    let s = shared
        .lock()
        .map_err(|_| BenchError::Failed("read the results".into()))?;
    let missing_timed = s.sent.values().filter(|sent| sent.timed).count() as u64;
    let acked = counters.acked_timed.load(Ordering::Relaxed);
    let errors = counters.errors.load(Ordering::Relaxed);
    if s.send_to_watcher.count() == 0 {
        return Err(BenchError::Failed(format!(
            "see any update on replica B: {acked} updates acknowledged, {errors} failed, \
             stream error: {}",
            stream_error
                .lock()
                .ok()
                .and_then(|e| e.clone())
                .unwrap_or_else(|| "none".into())
        )));
    }
    let achieved = acked as f64 / duration.as_secs_f64();
    let mut notes = vec![
        "send_to_watcher: TransitionPhase sent to replica A -> the change read from \
         replica B's WatchTasks stream, on one monotonic clock (includes the call's own \
         hop and transaction)"
            .to_owned(),
        "commit_to_watcher: the task's updated_at -> delivery on B, wall clock; \
         updated_at is the writing transaction's start time, so this overstates \
         commit -> watcher by the transaction's length"
            .to_owned(),
    ];
    if achieved < args.rate as f64 * 0.98 {
        notes.push(format!(
            "the bench drove {achieved:.0} updates/s, not the {} asked for \
             ({} times no permit or no free task)",
            args.rate,
            counters.behind.load(Ordering::Relaxed)
        ));
    }
    if missing_timed > 0 {
        notes.push(format!(
            "{missing_timed} timed updates were not seen on replica B within {DRAIN:?}"
        ));
    }
    if let Some(e) = stream_error.lock().ok().and_then(|e| e.clone()) {
        notes.push(format!("the watch stream failed: {e}"));
    }
    Ok(Report {
        scenario: "watch",
        parameters: [
            &[("rate", args.rate.into()), ("tasks", args.tasks.into())],
            args.stretch.parameters().as_slice(),
        ]
        .concat(),
        cluster: target.info.clone(),
        latencies: vec![
            s.send_to_watcher.summary(
                "send_to_watcher",
                "TransitionPhase sent to replica A -> change on replica B's WatchTasks",
                duration,
            ),
            s.commit_to_watcher.summary(
                "commit_to_watcher",
                "the change's updated_at (its transaction's start) -> on replica B",
                duration,
            ),
            s.call.summary(
                "transition_call",
                "one TransitionPhase call through replica A",
                duration,
            ),
            created.summary(),
        ],
        figures: vec![
            Figure::new(
                "achieved_rate",
                "updates/s acknowledged in the timed stretch",
                (achieved * 10.0).round() / 10.0,
                Unit::Count,
            ),
            Figure::count("updates_timed", "timed updates acknowledged", acked),
            Figure::count("errors", "updates that failed", errors),
            Figure::count(
                "missing",
                "timed updates never seen on replica B",
                missing_timed,
            ),
            Figure::count(
                "unmatched",
                "changes on B matching no update sent",
                counters.unmatched.load(Ordering::Relaxed),
            ),
            Figure::millis("driven", "driving time, warm-up included", driven),
        ],
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_follows_the_rate() {
        assert_eq!(due(Duration::ZERO, 1000), 0);
        assert_eq!(due(Duration::from_millis(1), 1000), 1);
        assert_eq!(due(Duration::from_millis(2500), 1000), 2500);
        assert_eq!(due(Duration::from_millis(999), 1), 0);
        assert_eq!(due(Duration::from_secs(3), 7), 21);
    }

    #[test]
    fn updates_go_back_and_forth_between_development_and_review() {
        use v1::TaskPhase::*;
        assert_eq!(toggled(Development), Review);
        assert_eq!(toggled(Review), Development);
        assert_eq!(toggled(toggled(Development)), Development);
    }

    #[test]
    fn the_next_free_task_is_round_robin_and_skips_busy_ones() {
        assert_eq!(next_free(&[false, false, false], 0), Some(0));
        assert_eq!(next_free(&[false, false, false], 2), Some(2));
        assert_eq!(next_free(&[false, true, true], 1), Some(0));
        assert_eq!(next_free(&[true, true, false], 0), Some(2));
        assert_eq!(next_free(&[true, true], 1), None);
        assert_eq!(next_free(&[], 0), None);
    }
}
