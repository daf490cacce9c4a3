//! The ownership simulation, over many seeds: the worker's planner on simulated nodes,
//! the model store, seeded faults, invariants after every step (see
//! `taskpod_sim::invariants`).
//!
//! `TASKPOD_SIM_SEEDS=N` runs seeds `0..N` (1,000 by default); `TASKPOD_SIM_SEED=S`
//! replays seed `S` alone and prints its whole trace. A failing seed prints its
//! violation and the end of its trace, and writes the whole trace to a file.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::collections::BTreeMap;

use taskpod_sim::{run_many, run_seed};

/// How many failing seeds get their trace printed.
const TRACES_SHOWN: usize = 2;
/// How many trace lines before the violation are printed.
const TRACE_TAIL: usize = 120;

/// The seeds to run, and whether one seed is being replayed.
fn seeds() -> (Vec<u64>, bool) {
    if let Ok(s) = std::env::var("TASKPOD_SIM_SEED") {
        let seed = s.trim().parse().expect("TASKPOD_SIM_SEED is a number");
        return (vec![seed], true);
    }
    let n: u64 = std::env::var("TASKPOD_SIM_SEEDS")
        .ok()
        .map(|s| s.trim().parse().expect("TASKPOD_SIM_SEEDS is a number"))
        .unwrap_or(1_000);
    ((0..n).collect(), false)
}

/// Runs the seeds; panics with every failing seed, the traces of the first ones, and
/// a summary by kind of violation.
fn check_seeds() -> taskpod_sim::stats::Stats {
    let (seeds, replay) = seeds();
    if replay {
        let (outcome, trace) = run_seed(seeds[0], true);
        for line in trace.lines() {
            eprintln!("{line}");
        }
        if let Err(f) = outcome {
            panic!("{f}");
        }
        return taskpod_sim::stats::Stats::default();
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (stats, failures) = run_many(&seeds, threads);
    eprintln!(
        "{} seeds passed, {} steps: {stats:?}",
        stats.seeds, stats.steps
    );
    if failures.is_empty() {
        return stats;
    }
    let mut kinds: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for f in &failures {
        kinds.entry(kind(&f.what)).or_default().push(f.seed);
    }
    for seeds in kinds.values().take(TRACES_SHOWN) {
        let f = failures.iter().find(|f| f.seed == seeds[0]).unwrap();
        let (again, trace) = run_seed(f.seed, true);
        let path = std::env::temp_dir().join(format!("taskpod-sim-seed-{}.txt", f.seed));
        std::fs::write(&path, trace.lines().join("\n")).ok();
        eprintln!(
            "\n==== {f}\n---- last {TRACE_TAIL} lines (whole trace: {})",
            path.display()
        );
        let lines = trace.lines();
        for line in &lines[lines.len().saturating_sub(TRACE_TAIL)..] {
            eprintln!("{line}");
        }
        assert_eq!(
            again.err().map(|a| (a.step, a.what)),
            Some((f.step, f.what.clone())),
            "seed {} did not replay exactly",
            f.seed
        );
    }
    eprintln!();
    for f in &failures {
        eprintln!("{f}");
    }
    let summary: Vec<String> = kinds
        .iter()
        .map(|(k, s)| format!("{} seeds: {k} (e.g. seed {})", s.len(), s[0]))
        .collect();
    panic!(
        "{} of {} seeds broke an invariant (replay one with TASKPOD_SIM_SEED=S):\n{}",
        failures.len(),
        seeds.len(),
        summary.join("\n")
    );
}

/// Safety after every step (one live epoch per task, no write accepted under a stale
/// epoch or generation, claims locked, bounded zombies); once the faults stop, every
/// active task placed within a bound, and then no pod left behind.
#[test]
fn every_seed_keeps_the_ownership_invariants() {
    let stats = check_seeds();
    if stats.seeds >= 200 {
        // Not vacuous: the faults the protocol must survive did happen, and fences
        // did refuse what came too late.
        assert!(stats.self_fences > 0 && stats.idle_expiries > 0 && stats.pauses > 0);
        assert!(stats.recorded.get("node_lost").copied().unwrap_or(0) > 0);
        assert!(stats.recorded.get("handler").copied().unwrap_or(0) > 0);
        assert!(stats.refusals.contains_key("stale epoch"));
        assert!(stats.refusals.contains_key("epoch retired"));
        assert!(stats.refusals.contains_key("node lock lost"));
        assert!(stats.lost_wakeups > 0 && stats.skews > 0);
        assert!(
            stats.handbacks > 0,
            "membership settled and partitions moved"
        );
    }
}

/// A violation's kind: the text before its first colon, numbers left out.
fn kind(what: &str) -> String {
    let first = what.split(':').next().unwrap_or_default();
    let mut out = String::with_capacity(first.len());
    for c in first.chars() {
        if c.is_ascii_digit() {
            if !out.ends_with('N') {
                out.push('N');
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn a_seed_replays_exactly() {
    let (a, trace_a) = run_seed(42, true);
    let (b, trace_b) = run_seed(42, true);
    assert_eq!(trace_a.lines(), trace_b.lines());
    assert_eq!(a.is_ok(), b.is_ok());
    assert!(trace_a.lines().len() > 100, "the trace says what happened");
}
