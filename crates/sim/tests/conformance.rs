//! Conformance of the real store to the protocol's model: the same seeded sequences of
//! claims, mints, fenced appends, crash records, releases, commands, lock calls and
//! sessions dying, against `taskpod_sim::model::Model` and against Postgres (through
//! `taskpod_core::store::Store` and dedicated lock sessions), compared step by step:
//! the answers, the heads and partition rows after each step, and each side's history
//! oracle. See `taskpod_sim::conformance`.
//!
//! `TASKPOD_CONFORMANCE_SEEDS=N` runs seeds `1..=N` (6 by default). Every mismatch is
//! reported with the steps that led to it, and a summary groups them by kind.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::collections::BTreeMap;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use taskpod_sim::conformance::conform;

/// Steps per seed.
const STEPS: usize = 70;

/// A mismatch's kind: its first finding, numbers left out.
fn kind(what: &str) -> String {
    let first = what.split(';').next().unwrap_or_default();
    let mut out = String::with_capacity(first.len());
    let mut digits = false;
    for c in first.chars() {
        if c.is_ascii_digit() {
            if !digits {
                out.push('N');
            }
            digits = true;
        } else {
            digits = false;
            out.push(c);
        }
    }
    out
}

#[sqlx::test(migrations = "../../migrations")]
async fn the_model_and_postgres_agree_step_by_step(_pool: PgPoolOptions, opts: PgConnectOptions) {
    let seeds: u64 = std::env::var("TASKPOD_CONFORMANCE_SEEDS")
        .ok()
        .map(|s| {
            s.trim()
                .parse()
                .expect("TASKPOD_CONFORMANCE_SEEDS is a number")
        })
        .unwrap_or(6);
    let mut mismatches = Vec::new();
    let mut steps = 0;
    for seed in 1..=seeds {
        // Seeds share the database: each starts from the partition rows the previous
        // one left, with tasks and nodes of its own.
        let report = conform(seed, STEPS, opts.clone())
            .await
            .unwrap_or_else(|m| panic!("{m}"));
        steps += report.steps;
        mismatches.extend(report.mismatches);
    }
    eprintln!("{seeds} seeds, {steps} steps compared");
    if mismatches.is_empty() {
        return;
    }
    let mut kinds: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in &mismatches {
        eprintln!("{m}");
        kinds
            .entry(kind(&m.what))
            .or_default()
            .push(format!("seed {} step {}", m.seed, m.step));
    }
    let summary: Vec<String> = kinds
        .iter()
        .map(|(what, at)| format!("{}x {what} (first: {})", at.len(), at[0]))
        .collect();
    panic!(
        "{} mismatches between the model and Postgres in {steps} steps:\n{}",
        mismatches.len(),
        summary.join("\n")
    );
}
