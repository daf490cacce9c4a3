//! How long two runs of one task's `exec` program ran at once, from the lines their
//! process trees logged (see [`super::programs`]).
//!
//! `exec` is at-least-once with bounded overlap: after a crash or an adoption the
//! program may run again, but two epochs' runs may coexist at most for the fence
//! margin an adopted pod waits, plus slack. For each task, the lines of each epoch
//! are grouped into *segments* (consecutive lines at most [`SEGMENT_GAP_MS`] apart: a
//! run logs every 100 ms); the task's overlap is the longest interval during which
//! segments of two different epochs were both open.

use std::collections::BTreeMap;
use std::time::Duration;

/// The overlap of two epochs' runs that docs/architecture.md states for a run's
/// settings ("The fencing relation"), in milliseconds: an old owner's runs are dead at
/// most D + G after its last answered ping (D = ping interval + ping timeout, G the
/// guard timeout), Postgres ends its session at the soonest `server_end` after that
/// ping, and the adopter then waits the fence margin M: max(0, D + G - S - M).
pub const fn documented_bound_ms(
    ping_interval: u64,
    ping_timeout: u64,
    guard_timeout: u64,
    server_end: u64,
    fence_margin: u64,
) -> u64 {
    (ping_interval + ping_timeout + guard_timeout).saturating_sub(server_end + fence_margin)
}

/// The storm's workers: default lock and guard settings (P 300 ms, T 1 s, G 1 s, kill
/// timeout K 2 s, keepalive idle 5 s) with `idle_session_timeout` at 3 s, and the
/// default fence margin P + T + G + K.
pub const STORM_DOCUMENTED_BOUND: Duration =
    Duration::from_millis(documented_bound_ms(300, 1_000, 1_000, 3_000, 4_300));
/// What scheduling on a busy two-core machine may add.
pub const OVERLAP_SLACK: Duration = Duration::from_secs(1);
/// The longest two epochs of one task may both be running their program in the storm.
pub const EXEC_OVERLAP_BOUND: Duration =
    Duration::from_millis(STORM_DOCUMENTED_BOUND.as_millis() as u64 + 1_000);
/// Lines of one epoch further apart than this belong to different segments.
pub const SEGMENT_GAP_MS: u64 = 500;

/// One line of the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    pub task: String,
    pub epoch: i64,
    pub at_ms: u64,
}

/// Parses the log; returns the lines and how many lines did not parse (a line cut by
/// a SIGKILL mid-write).
pub fn parse(text: &str) -> (Vec<LogLine>, usize) {
    let mut lines = Vec::new();
    let mut malformed = 0;
    for raw in text.lines() {
        let mut words = raw.split_whitespace();
        let parsed = (|| {
            let task = words.next()?.to_owned();
            let epoch = words.next()?.parse().ok()?;
            let at_ms = words.next()?.parse().ok()?;
            words
                .next()
                .is_none()
                .then_some(LogLine { task, epoch, at_ms })
        })();
        match parsed {
            Some(line) => lines.push(line),
            None => malformed += 1,
        }
    }
    (lines, malformed)
}

/// A stretch of one epoch's run: lines from `start_ms` to `end_ms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub epoch: i64,
    pub start_ms: u64,
    pub end_ms: u64,
    pub lines: usize,
}

/// The longest time two epochs of one task both ran.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overlap {
    pub task: String,
    pub start_ms: u64,
    pub end_ms: u64,
    /// The segments open during it.
    pub segments: Vec<Segment>,
}

impl Overlap {
    pub fn duration(&self) -> Duration {
        Duration::from_millis(self.end_ms - self.start_ms)
    }
}

/// One task's segments, by epoch then time.
pub fn segments(lines: &[&LogLine]) -> Vec<Segment> {
    let mut by_epoch: BTreeMap<i64, Vec<u64>> = BTreeMap::new();
    for line in lines {
        by_epoch.entry(line.epoch).or_default().push(line.at_ms);
    }
    let mut out = Vec::new();
    for (epoch, mut times) in by_epoch {
        times.sort_unstable();
        let mut current: Option<Segment> = None;
        for t in times {
            match current.as_mut() {
                Some(seg) if t - seg.end_ms <= SEGMENT_GAP_MS => {
                    seg.end_ms = t;
                    seg.lines += 1;
                }
                _ => {
                    out.extend(current.take());
                    current = Some(Segment {
                        epoch,
                        start_ms: t,
                        end_ms: t,
                        lines: 1,
                    });
                }
            }
        }
        out.extend(current);
    }
    out
}

/// The longest interval during which at least two epochs' segments were open (a
/// sweep over the segments' ends; one epoch's segments never overlap each other).
pub fn longest_overlap(task: &str, segments: &[Segment]) -> Option<Overlap> {
    // Opens sort before closes at the same instant, so touching runs count as
    // overlapping (for zero time).
    let mut points: Vec<(u64, bool)> = segments
        .iter()
        .flat_map(|s| [(s.start_ms, false), (s.end_ms, true)])
        .collect();
    points.sort_unstable();
    let mut open = 0usize;
    let mut since = 0u64;
    let mut best: Option<(u64, u64)> = None;
    for (t, closes) in points {
        if closes {
            if open == 2 && best.is_none_or(|(s, e)| t - since > e - s) {
                best = Some((since, t));
            }
            open -= 1;
        } else {
            open += 1;
            if open == 2 {
                since = t;
            }
        }
    }
    let (start_ms, end_ms) = best?;
    Some(Overlap {
        task: task.to_owned(),
        start_ms,
        end_ms,
        segments: segments
            .iter()
            .filter(|s| s.start_ms <= end_ms && s.end_ms >= start_ms)
            .cloned()
            .collect(),
    })
}

/// Every task's longest overlap (tasks whose epochs never overlapped are absent).
pub fn overlaps(lines: &[LogLine]) -> Vec<Overlap> {
    let mut by_task: BTreeMap<&str, Vec<&LogLine>> = BTreeMap::new();
    for line in lines {
        by_task.entry(line.task.as_str()).or_default().push(line);
    }
    by_task
        .into_iter()
        .filter_map(|(task, lines)| longest_overlap(task, &segments(&lines)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(task: &str, epoch: i64, from: u64, to: u64) -> Vec<LogLine> {
        (from..=to)
            .step_by(100)
            .map(|at_ms| LogLine {
                task: task.into(),
                epoch,
                at_ms,
            })
            .collect()
    }

    #[test]
    fn lines_parse_and_torn_lines_are_counted() {
        let (lines, bad) = parse("t1 2 1000\nt1 2 11\nt1 2\n");
        assert_eq!(lines.len(), 2);
        assert_eq!(bad, 1);
        assert_eq!(lines[0].epoch, 2);
    }

    #[test]
    fn sequential_epochs_do_not_overlap() {
        let mut lines = run("t", 1, 0, 1_000);
        lines.extend(run("t", 2, 1_500, 3_000));
        assert_eq!(overlaps(&lines), []);
    }

    #[test]
    fn an_overlap_is_measured_from_the_second_start_to_the_first_end() {
        let mut lines = run("t", 1, 0, 5_000);
        lines.extend(run("t", 2, 3_000, 8_000));
        let found = overlaps(&lines);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].duration(), Duration::from_millis(2_000));
        assert_eq!(found[0].segments.len(), 2);
    }

    #[test]
    fn a_gap_splits_an_epoch_into_segments() {
        // Epoch 1 pauses between 1 s and 4 s; epoch 2 runs in the gap only partly.
        let mut lines = run("t", 1, 0, 1_000);
        lines.extend(run("t", 1, 4_000, 5_000));
        lines.extend(run("t", 2, 800, 2_000));
        let found = overlaps(&lines);
        assert_eq!(found[0].duration(), Duration::from_millis(200));
    }

    #[test]
    fn three_epochs_chain_into_one_interval() {
        let mut lines = run("t", 1, 0, 2_000);
        lines.extend(run("t", 2, 1_000, 4_000));
        lines.extend(run("t", 3, 1_500, 6_000));
        let found = overlaps(&lines);
        // At least two of them ran from 1 s to 4 s.
        assert_eq!(found[0].duration(), Duration::from_millis(3_000));
    }

    #[test]
    fn other_tasks_do_not_count() {
        let mut lines = run("a", 1, 0, 5_000);
        lines.extend(run("b", 1, 0, 5_000));
        assert_eq!(overlaps(&lines), []);
    }

    #[test]
    fn the_bound_is_the_documented_overlap_plus_slack() {
        // With the default fence margin the docs state no overlap at all.
        assert_eq!(STORM_DOCUMENTED_BOUND, Duration::ZERO);
        assert_eq!(EXEC_OVERLAP_BOUND, STORM_DOCUMENTED_BOUND + OVERLAP_SLACK);
        // A margin cut to nothing with a slow server-side end: the old runs may live
        // D + G - S past the adopter's start.
        assert_eq!(documented_bound_ms(300, 1_000, 1_000, 1_500, 0), 800);
    }
}
