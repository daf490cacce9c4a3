//! Counters of what a run exercised, so a green run can show it was not vacuous:
//! faults injected, claims, mints, crash records by kind, and refusals by fence.

use std::collections::BTreeMap;

use taskpod_core::domain::restart::CrashKind;

use crate::model::Refusal;

#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub seeds: u64,
    pub steps: u64,
    pub claims: u64,
    /// Partitions handed back (released, then unlocked).
    pub handbacks: u64,
    pub mints: u64,
    pub pod_appends: u64,
    pub self_fences: u64,
    pub node_crashes: u64,
    pub pauses: u64,
    pub idle_expiries: u64,
    pub session_kills: u64,
    pub lost_wakeups: u64,
    pub skews: u64,
    /// Crash records accepted, by kind.
    pub recorded: BTreeMap<&'static str, u64>,
    /// Refused calls, by reason.
    pub refusals: BTreeMap<String, u64>,
    /// Steps from the end of the faults until every active task had a pod: the worst.
    pub slowest_settle: u64,
}

impl Stats {
    pub fn refused(&mut self, why: &Refusal) {
        let key = match why {
            Refusal::Illegal(_) => "illegal".to_owned(),
            other => other.to_string(),
        };
        *self.refusals.entry(key).or_default() += 1;
    }

    pub fn recorded(&mut self, kind: CrashKind) {
        *self.recorded.entry(kind.as_str()).or_default() += 1;
    }

    /// Adds another run's counters.
    pub fn merge(&mut self, o: &Stats) {
        self.seeds += o.seeds;
        self.steps += o.steps;
        self.claims += o.claims;
        self.handbacks += o.handbacks;
        self.mints += o.mints;
        self.pod_appends += o.pod_appends;
        self.self_fences += o.self_fences;
        self.node_crashes += o.node_crashes;
        self.pauses += o.pauses;
        self.idle_expiries += o.idle_expiries;
        self.session_kills += o.session_kills;
        self.lost_wakeups += o.lost_wakeups;
        self.skews += o.skews;
        for (k, v) in &o.recorded {
            *self.recorded.entry(k).or_default() += v;
        }
        for (k, v) in &o.refusals {
            *self.refusals.entry(k.clone()).or_default() += v;
        }
        self.slowest_settle = self.slowest_settle.max(o.slowest_settle);
    }
}
