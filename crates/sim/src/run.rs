//! Running seeds: a run is `fault_steps` steps of faults and commands, then the cluster
//! heals and must settle within `quiet_bound` steps (every active task placed), and
//! then, within as many, leave no pod behind. The step invariants are checked after
//! every step of every phase.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::invariants;
use crate::stats::Stats;
use crate::trace::Trace;
use crate::world::World;

/// A seed that broke an invariant.
#[derive(Clone, Debug)]
pub struct Failure {
    pub seed: u64,
    pub step: u64,
    pub now: u64,
    pub what: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} failed at step {} ({}ms): {}",
            self.seed, self.step, self.now, self.what
        )
    }
}

/// Runs `seed`, with the trace on or off; the same seed gives the same run.
pub fn run_seed(seed: u64, trace: bool) -> (Result<Stats, Failure>, Trace) {
    let mut w = World::new(seed, trace);
    let outcome = drive(&mut w, seed);
    let mut stats = std::mem::take(&mut w.stats);
    stats.steps = w.steps;
    (
        outcome.map(|settle| {
            stats.slowest_settle = settle;
            stats
        }),
        w.trace,
    )
}

fn drive(w: &mut World, seed: u64) -> Result<u64, Failure> {
    let fail = |w: &World, what: String| Failure {
        seed,
        step: w.steps,
        now: w.now,
        what,
    };
    invariants::check(w).map_err(|e| fail(w, e))?;
    for _ in 0..w.cfg.fault_steps {
        w.step(true, true);
        invariants::check(w).map_err(|e| fail(w, e))?;
    }
    w.heal();
    let settle = quiet(w, seed, invariants::placed)?;
    quiet(w, seed, invariants::no_phantoms)?;
    Ok(settle)
}

/// Steps without faults until `done` holds, checking the invariants; the steps it took.
fn quiet(w: &mut World, seed: u64, done: fn(&World) -> Result<(), String>) -> Result<u64, Failure> {
    let mut last = done(w);
    let mut steps = 0;
    while last.is_err() && steps < w.cfg.quiet_bound {
        w.step(false, false);
        steps += 1;
        invariants::check(w).map_err(|what| Failure {
            seed,
            step: w.steps,
            now: w.now,
            what,
        })?;
        last = done(w);
    }
    match last {
        Ok(()) => {
            w.trace.note(w.now, |_| "settled".to_owned());
            Ok(steps)
        }
        Err(what) => Err(Failure {
            seed,
            step: w.steps,
            now: w.now,
            what: format!(
                "{what}, {} steps after the faults stopped",
                w.cfg.quiet_bound
            ),
        }),
    }
}

/// Runs every seed of `seeds` on `threads` threads; returns the merged counters and
/// the failures, by seed.
pub fn run_many(seeds: &[u64], threads: usize) -> (Stats, Vec<Failure>) {
    let next = AtomicU64::new(0);
    let total = Mutex::new(Stats::default());
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let mut mine = Stats::default();
                let mut failed = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(&seed) = seeds.get(i) else {
                        break;
                    };
                    match run_seed(seed, false).0 {
                        Ok(stats) => mine.merge(&stats),
                        Err(f) => failed.push(f),
                    }
                }
                if let Ok(mut t) = total.lock() {
                    t.merge(&mine);
                }
                if let Ok(mut f) = failures.lock() {
                    f.extend(failed);
                }
            });
        }
    });
    let mut failures = failures.into_inner().unwrap_or_default();
    failures.sort_by_key(|f| f.seed);
    (total.into_inner().unwrap_or_default(), failures)
}
