//! The checker: after a chaos run has been healed and has settled, holds the store (the
//! oracle, [`oracle::Snapshot`]) to what clients were told
//! ([`super::history::History`]) and to the invariants of the design, and reports every
//! violation with its evidence rows.
//!
//! One module per family of invariants:
//! - [`clients`]: acknowledged creates exist, no request id made two tasks, refused
//!   creates made none, acknowledged cancels hold;
//! - [`streams`]: versions 1..N without gap or repeat, the head's version is N, the
//!   listing row agrees with the head, the stream's terminal event agrees with both;
//! - [`epochs`]: pod epochs unique and increasing, nothing written under an epoch after
//!   its `pod_crashed`, crash rows and `pod_crashed` events agree;
//! - [`liveness`]: every task terminal in time with no pod left, crash budgets kept,
//!   losses charged to no budget only across a store outage;
//! - [`exec`]: two epochs' `exec` runs of one task overlap at most the bound for the
//!   run's settings;
//! - `member-exited`, reported by the storm (which watches the processes, not the
//!   store): no worker or API replica exits on its own under any fault.
//!
//! Invariant names are stable identifiers (`no-write-after-crash`, ...), so a report
//! can be grepped and compared across runs.

pub mod clients;
pub mod epochs;
pub mod exec;
pub mod liveness;
pub mod oracle;
pub mod streams;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use self::oracle::Snapshot;
use super::history::Intent;
use super::overlap::LogLine;

/// One broken invariant, for one task when it is about one.
#[derive(Clone, Debug)]
pub struct Violation {
    pub invariant: &'static str,
    pub task: Option<String>,
    pub summary: String,
    /// Rows and history entries that show it, one per line.
    pub evidence: Vec<String>,
}

impl Violation {
    pub fn new(invariant: &'static str, task: Option<String>, summary: impl Into<String>) -> Self {
        Self {
            invariant,
            task,
            summary: summary.into(),
            evidence: Vec::new(),
        }
    }

    #[must_use]
    pub fn with(mut self, evidence: impl IntoIterator<Item = String>) -> Self {
        self.evidence.extend(evidence);
        self
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.task {
            Some(task) => writeln!(f, "[{}] task {task}: {}", self.invariant, self.summary)?,
            None => writeln!(f, "[{}] {}", self.invariant, self.summary)?,
        }
        for line in &self.evidence {
            writeln!(f, "    {line}")?;
        }
        Ok(())
    }
}

/// The workers' restart settings, which crash counts are held to.
#[derive(Clone, Debug)]
pub struct Budget {
    pub max_restart_attempts: u32,
    pub restart_window: Duration,
    pub max_node_losses: u32,
}

/// What the checker is given.
#[derive(Debug)]
pub struct Input<'a> {
    pub snapshot: &'a Snapshot,
    pub intents: &'a [Intent],
    pub exec_lines: &'a [LogLine],
    pub budget: &'a Budget,
    /// The hang detector's limit, for the message.
    pub settle_timeout: Duration,
    /// When Postgres was down (unix ms, from the crash to the restart): the only
    /// time pods may be lost as `interrupted`.
    pub store_outages: &'a [(i64, i64)],
    /// The longest two epochs' `exec` runs of one task may overlap: the documented
    /// bound for the run's settings plus slack
    /// ([`super::overlap::EXEC_OVERLAP_BOUND`] for the storm's).
    pub exec_overlap_bound: Duration,
}

/// Every violation found, and figures about the run.
#[derive(Debug, Default)]
pub struct Report {
    pub violations: Vec<Violation>,
    pub figures: BTreeMap<&'static str, String>,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }

    /// Violations grouped by invariant: a count, then up to `examples` of each.
    pub fn render(&self, examples: usize) -> String {
        let mut by_invariant: BTreeMap<&str, Vec<&Violation>> = BTreeMap::new();
        for v in &self.violations {
            by_invariant.entry(v.invariant).or_default().push(v);
        }
        let mut out = String::new();
        for (name, value) in &self.figures {
            out.push_str(&format!("  {name}: {value}\n"));
        }
        if by_invariant.is_empty() {
            out.push_str("no invariant violated\n");
        }
        for (invariant, found) in by_invariant {
            out.push_str(&format!(
                "\n=== invariant `{invariant}` violated {} time(s); {} shown ===\n",
                found.len(),
                found.len().min(examples)
            ));
            for v in found.iter().take(examples) {
                out.push_str(&v.to_string());
            }
        }
        out
    }
}

/// Runs every check.
pub fn check(input: &Input<'_>) -> Report {
    let mut report = Report::default();
    report.violations.extend(clients::check(input));
    report.violations.extend(streams::check(input));
    report.violations.extend(epochs::check(input));
    report.violations.extend(liveness::check(input));
    let (violations, figures) = exec::check(input);
    report.violations.extend(violations);
    report.figures.extend(figures);
    let snapshot = input.snapshot;
    report
        .figures
        .insert("tasks in the store", snapshot.tasks.len().to_string());
    let mut statuses: BTreeMap<&str, usize> = BTreeMap::new();
    for task in snapshot.tasks.values() {
        *statuses.entry(task.status.as_str()).or_default() += 1;
    }
    report.figures.insert("statuses", format!("{statuses:?}"));
    let mut crash_kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for crash in snapshot.crashes.values().flatten() {
        *crash_kinds.entry(crash.kind.as_str()).or_default() += 1;
    }
    report
        .figures
        .insert("crash rows", format!("{crash_kinds:?}"));
    report.figures.insert(
        "events",
        snapshot
            .events
            .values()
            .map(Vec::len)
            .sum::<usize>()
            .to_string(),
    );
    report
}
