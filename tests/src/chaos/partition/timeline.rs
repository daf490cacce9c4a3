//! The timeline of one cut (issue 19, item 6), in milliseconds from the moment the
//! cut was put in force, each from the witness that knows it best:
//! - **lock released**: the cut worker's lock session is gone from
//!   `pg_stat_activity` (Postgres ended it: the server side);
//! - **re-claimed**: the first, then the last, of its partitions owned by another
//!   worker (the `partitions` table);
//! - **first successor pod**: the first `pod_started` of a newer epoch of a task the
//!   cut worker was running (the event stream), and the first line its `exec` program
//!   logged (the `exec` log);
//! - **self-fence**: the cut worker's own log line saying it fenced every pod;
//! - **last old line**: the last line the cut worker's `exec` programs logged (their
//!   whole process trees: the lines come from grandchildren);
//! - **rejoin**, from the heal: a new incarnation registered (`nodes.started_at`),
//!   then owning partitions again.
//!
//! Sampling is every 50 ms ([`super::monitor::INTERVAL`]), so server-side figures are
//! that coarse; log and event times are exact.

use std::fmt::Write as _;

use super::monitor::{Sample, Victim};
use crate::chaos::check::oracle::Snapshot;
use crate::chaos::overlap::LogLine;
use crate::cluster::CutKind;

/// One cut's figures; `None`: it did not happen (as after a Redis-only cut, which
/// costs the worker its bus and nothing else).
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    pub kind: Option<CutKind>,
    /// When the cut and the heal were put in force (unix ms).
    pub cut_ms: i64,
    pub heal_ms: i64,
    /// From the cut.
    pub session_ended: Option<i64>,
    pub first_reclaimed: Option<i64>,
    pub all_reclaimed: Option<i64>,
    pub first_successor_pod: Option<i64>,
    pub first_successor_line: Option<i64>,
    pub self_fence: Option<i64>,
    pub last_old_line: Option<i64>,
    /// From the heal.
    pub rejoin_registered: Option<i64>,
    pub rejoin_owning: Option<i64>,
}

/// What the worker's log says when it fences every pod: its fence watcher (the lock
/// session went quiet) and its control loop (the session failed, or the store stopped
/// answering through the pool) both write it, whichever notices first.
pub const FENCE_LINE: &str = "fencing every pod";

impl Timeline {
    /// Puts the figures together.
    pub fn compute(
        kind: CutKind,
        (cut_ms, heal_ms): (i64, i64),
        victim: &Victim,
        samples: &[Sample],
        snapshot: &Snapshot,
        exec_lines: &[LogLine],
        worker_log: &str,
    ) -> Self {
        let from_cut = |t: i64| t - cut_ms;
        let first = |pred: &dyn Fn(&Sample) -> bool| {
            samples
                .iter()
                .find(|s| s.at_ms >= cut_ms && pred(s))
                .map(|s| s.at_ms)
        };
        let total = i64::try_from(victim.partitions.len()).unwrap_or(i64::MAX);
        let session_ended = victim
            .session
            .and_then(|_| first(&|s| !s.session_alive))
            .map(from_cut);
        let first_reclaimed = first(&|s| s.reclaimed > 0).map(from_cut);
        let all_reclaimed = (total > 0)
            .then(|| first(&|s| s.reclaimed >= total))
            .flatten()
            .map(from_cut);
        let rejoin_registered = samples
            .iter()
            .filter_map(|s| s.new_started_ms)
            .filter(|t| *t >= cut_ms)
            .min()
            .map(|t| t - heal_ms);
        let rejoin_owning = samples
            .iter()
            .find(|s| s.at_ms >= heal_ms && s.new_owned > 0)
            .map(|s| s.at_ms - heal_ms);

        let mut first_successor_pod: Option<i64> = None;
        let mut first_successor_line: Option<i64> = None;
        let mut last_old_line: Option<i64> = None;
        for (task, epoch, _) in &victim.pods {
            let started = snapshot
                .events_of(task)
                .iter()
                .filter(|e| e.kind == "pod_started" && e.data_epoch().is_some_and(|n| n > *epoch))
                .map(|e| e.recorded_ms)
                .min();
            first_successor_pod = min_opt(first_successor_pod, started);
            let id = task.to_string();
            for line in exec_lines.iter().filter(|l| l.task == id) {
                let at = i64::try_from(line.at_ms).unwrap_or(i64::MAX);
                if line.epoch == *epoch {
                    last_old_line = Some(last_old_line.map_or(at, |l| l.max(at)));
                } else if line.epoch > *epoch {
                    first_successor_line = min_opt(first_successor_line, Some(at));
                }
            }
        }
        let self_fence = worker_log
            .lines()
            .filter(|l| l.contains(FENCE_LINE))
            .filter_map(log_time_ms)
            .find(|t| *t >= cut_ms)
            .map(from_cut);
        Self {
            kind: Some(kind),
            cut_ms,
            heal_ms,
            session_ended,
            first_reclaimed,
            all_reclaimed,
            first_successor_pod: first_successor_pod.map(from_cut),
            first_successor_line: first_successor_line.map(from_cut),
            self_fence,
            last_old_line: last_old_line.map(from_cut),
            rejoin_registered,
            rejoin_owning,
        }
    }

    /// The markdown table's header.
    pub fn header() -> String {
        "| cut | lock released | first re-claimed | all re-claimed | first successor pod | \
         its program runs | self-fence | last line of the old program | heal at | rejoin: registered | rejoin: owning |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
            .to_owned()
    }

    /// This cut as a row of the table: seconds from the cut (rejoin: from the heal).
    pub fn row(&self) -> String {
        let s = |v: Option<i64>| v.map_or_else(|| "-".to_owned(), |ms| secs(ms, "+"));
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            self.kind.map_or("?", CutKind::label),
            s(self.session_ended),
            s(self.first_reclaimed),
            s(self.all_reclaimed),
            s(self.first_successor_pod),
            s(self.first_successor_line),
            s(self.self_fence),
            s(self.last_old_line),
            secs(self.heal_ms - self.cut_ms, "+"),
            s(self.rejoin_registered),
            s(self.rejoin_owning),
        );
        out
    }
}

fn secs(ms: i64, plus: &str) -> String {
    let sign = if ms < 0 { "-" } else { plus };
    format!("{sign}{:.1} s", ms.unsigned_abs() as f64 / 1000.0)
}

fn min_opt(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The unix ms of a log line that starts with an RFC 3339 UTC time, as the servers
/// write them (`2026-12-07T02:51:23.801782Z  WARN ...`).
pub fn log_time_ms(line: &str) -> Option<i64> {
    let stamp = line.split_whitespace().next()?;
    chrono::DateTime::parse_from_rfc3339(stamp)
        .ok()
        .map(|t| t.timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_line_gives_its_time() {
        let line = "2026-12-07T02:51:23.801782Z  WARN taskpod_worker::ownership: lock session lost, fencing every pod node=x";
        assert_eq!(log_time_ms(line), Some(1_796_611_883_801));
        assert_eq!(log_time_ms("===== w3 start #1 ====="), None);
    }

    #[test]
    fn figures_read_as_seconds_from_the_cut() {
        assert_eq!(secs(6_140, "+"), "+6.1 s");
        assert_eq!(secs(-40, "+"), "-0.0 s");
        let t = Timeline {
            kind: Some(CutKind::Full),
            cut_ms: 1_000,
            heal_ms: 11_000,
            session_ended: Some(3_100),
            ..Timeline::default()
        };
        let row = t.row();
        assert!(row.starts_with("| full | +3.1 s | - |"), "{row}");
        assert!(row.contains("| +10.0 s |"), "{row}");
    }
}
