//! The crash storm: 3 workers and 2 API replicas on their own Postgres and Redis,
//! clients creating `sleep` and `exec` tasks (and cancelling a few), and a seeded
//! schedule of faults: workers SIGKILLed and restarted, paused past takeover and
//! resumed, their lock sessions terminated; Postgres stopped `-m immediate` and
//! restarted; Redis and API replicas SIGKILLed and restarted; Redis paused, its
//! subscribers killed and its pubsub buffers shrunk; a transaction held open in another
//! database; and, through fault proxies, a worker's or a replica's link to Postgres
//! silenced, a replica's connections reset and its commits made ambiguous (committed,
//! answer lost). WatchTasks clients follow it all, resuming on another replica when a
//! stream fails. Then everything is healed and the checker holds the store to what
//! clients were told and to the design's invariants (`taskpod_e2e::chaos::check`), and
//! every watcher's history to the stream's promises (`taskpod_e2e::chaos::watchers`).
//!
//! - CI mode (no variables): two fresh seeds of 45 s of faults each, every fault kind
//!   at least once per seed, more than 2,000 tasks in all.
//! - Replay: `TASKPOD_CHAOS_SEED=<seed>[,<seed>...]` (with the `TASKPOD_CHAOS_SECS` the
//!   failing run printed) runs the same faults in the same order.
//! - Long mode: `TASKPOD_CHAOS_SECS=1800` runs faults for that long (one seed unless
//!   given); `TASKPOD_CHAOS_TASKS` overrides the task count. Long mode also puts the
//!   second worker in a network namespace and draws real partitions of it at random
//!   (full, Postgres only, Redis only, one way each: `CutWorker`), as
//!   `TASKPOD_CHAOS_CUTS=1` does in any mode (`=0` turns them off).
//! - `TASKPOD_CHAOS_KEEP=1` keeps each cluster's folder (logs, data, the `exec` log).
//!
//! A failure prints, per seed: how to replay it, the schedule and what each fault did,
//! the client history's counts, timings, and each broken invariant with its evidence
//! rows.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Instant;

use taskpod_e2e::chaos::schedule::FaultKind;
use taskpod_e2e::chaos::storm::{self, Plan, StormConfig};

/// The fewest tasks a CI run must create, over all its seeds.
const CI_MIN_TASKS: usize = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_storm_ci_seeds() {
    let plan = Plan::from_env().unwrap();
    eprintln!(
        "crash storm: seeds {:?}, {:?} of faults and {} tasks per seed{}{}",
        plan.seeds,
        plan.storm,
        plan.tasks,
        if plan.ci { " (CI mode)" } else { "" },
        if plan.cuts {
            ", real partitions of a namespaced worker"
        } else {
            ""
        }
    );
    let started = Instant::now();
    let mut outcomes = Vec::new();
    for seed in &plan.seeds {
        let config = StormConfig {
            cuts: plan.cuts,
            ..StormConfig::new(*seed, plan.storm, plan.tasks)
        };
        let outcome = storm::run(&config)
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: the storm could not run: {e:#}"));
        eprintln!("{}", outcome.render());
        outcomes.push(outcome);
    }

    let mut problems = Vec::new();
    for o in &outcomes {
        let missing: Vec<FaultKind> = FaultKind::REQUIRED
            .into_iter()
            .filter(|k| !o.effective_kinds().contains(k))
            .collect();
        if !missing.is_empty() {
            problems.push(format!(
                "seed {}: faults that never took effect: {missing:?}",
                o.seed
            ));
        }
    }
    let acked: usize = outcomes.iter().map(|o| o.acked).sum();
    if plan.ci && acked < CI_MIN_TASKS {
        problems.push(format!(
            "only {acked} tasks acknowledged, CI needs {CI_MIN_TASKS}"
        ));
    }
    let mut summary = format!(
        "crash storm: {} seed(s), {acked} creates acknowledged, {:.0?} in all\n",
        outcomes.len(),
        started.elapsed()
    );
    for o in &outcomes {
        let mut by_invariant: BTreeMap<&str, usize> = BTreeMap::new();
        for v in &o.report.violations {
            *by_invariant.entry(v.invariant).or_default() += 1;
        }
        summary.push_str(&format!(
            "  seed {}: {} faults, {:.0?}, violations {by_invariant:?}\n",
            o.seed,
            o.applied.len(),
            o.total()
        ));
    }
    eprintln!("{summary}");
    let clean = outcomes.iter().all(|o| o.report.is_clean());
    assert!(
        problems.is_empty() && clean,
        "{summary}{}\n(each seed's report, with its evidence, is printed above)",
        problems.join("\n")
    );
}
