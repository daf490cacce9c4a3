//! Which tasks the next check reads, and when.
//!
//! Three scopes feed the planner, so an idle pod costs nothing:
//! - a **wake-up**: a bus message named a task of this node's: that task alone, at once;
//! - a **tick**: the tasks the change feed (events below a watermark, commit-order safe)
//!   says changed since the last tick, plus the ones woken meanwhile and the backoffs
//!   now over: what Redis lost is still caught within a tick;
//! - a **full** check every `full_check_ms`, and after a claim, a reconnect or a fence:
//!   every active task of the owned partitions, every live pod on them, every pod this
//!   node runs.
//!
//! Restart backoffs are timers on this node's monotonic clock, set from what Postgres
//! said was left of them, so a skew between the clocks never delays or drops a restart.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use taskpod_core::domain::TaskId;
use tokio::time::Instant;

/// What a check reads.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Every active task and live pod of the owned partitions and every pod this node
    /// runs.
    All,
    /// Only these.
    Tasks(Vec<TaskId>),
    /// The tasks of this node's that changed in `[from, to)` of the change feed, and
    /// these.
    Changed {
        from: u64,
        to: u64,
        also: Vec<TaskId>,
    },
}

#[derive(Debug)]
pub(crate) struct Checks {
    full_interval: Duration,
    woken: HashSet<TaskId>,
    /// The change feed's position: the tick reads what changed since.
    feed: Option<u64>,
    full_due: bool,
    last_full: Instant,
    backoffs: Backoffs,
    /// A check left tasks unstarted for want of room: look again when a pod ends.
    starved: bool,
}

impl Checks {
    pub fn new(full_interval: Duration) -> Self {
        Self {
            full_interval,
            woken: HashSet::new(),
            feed: None,
            full_due: true,
            last_full: Instant::now(),
            backoffs: Backoffs::default(),
            starved: false,
        }
    }

    /// A wake-up named `task`.
    pub fn wake(&mut self, task: TaskId) {
        self.woken.insert(task);
    }

    /// Anything may have been missed (a bus reconnect, a claim, a new incarnation): the
    /// next check reads everything, and the feed starts afresh.
    pub fn read_everything(&mut self) {
        self.full_due = true;
    }

    /// This node's incarnation ended: forget the feed's position and the timers of
    /// tasks it may no longer own.
    pub fn reset(&mut self) {
        self.feed = None;
        self.full_due = true;
        self.woken.clear();
        self.backoffs = Backoffs::default();
    }

    pub fn starved(&mut self, starved: bool) {
        self.starved |= starved;
    }

    /// A pod ended: its room may start a task an earlier check could not.
    pub fn pod_ended(&mut self) {
        if std::mem::take(&mut self.starved) {
            self.full_due = true;
        }
    }

    /// The scope of a wake-up's check: the woken tasks, or everything when due.
    pub fn woken_scope(&mut self) -> Scope {
        if self.full_due {
            return self.full();
        }
        Scope::Tasks(self.woken.drain().collect())
    }

    /// The scope of a tick's check, `watermark` being the change feed's position now.
    pub fn tick_scope(&mut self, watermark: u64) -> Scope {
        let from = self.feed.replace(watermark);
        let due = self.full_due || self.last_full.elapsed() >= self.full_interval;
        match from {
            Some(from) if !due => {
                let mut also: Vec<TaskId> = self.woken.drain().collect();
                also.extend(self.backoffs.due(Instant::now()));
                Scope::Changed {
                    from,
                    to: watermark,
                    also,
                }
            }
            _ => self.full(),
        }
    }

    fn full(&mut self) -> Scope {
        self.full_due = false;
        self.last_full = Instant::now();
        self.woken.clear();
        Scope::All
    }

    /// `task` may start again in `wait`.
    pub fn backoff(&mut self, task: TaskId, wait: Duration) {
        self.backoffs.set(task, Instant::now() + wait);
    }

    /// When the earliest backoff ends.
    pub fn next_backoff(&self) -> Option<Instant> {
        self.backoffs.next()
    }

    /// The tasks whose backoff is over, forgotten here.
    pub fn due_backoffs(&mut self) -> Vec<TaskId> {
        self.backoffs.due(Instant::now())
    }
}

/// Restart timers, earliest first.
#[derive(Debug, Default)]
struct Backoffs {
    at: HashMap<TaskId, Instant>,
    order: BTreeSet<(Instant, TaskId)>,
}

impl Backoffs {
    fn set(&mut self, task: TaskId, until: Instant) {
        if let Some(old) = self.at.insert(task, until) {
            self.order.remove(&(old, task));
        }
        self.order.insert((until, task));
    }

    fn next(&self) -> Option<Instant> {
        self.order.first().map(|(at, _)| *at)
    }

    fn due(&mut self, now: Instant) -> Vec<TaskId> {
        let mut due = Vec::new();
        while let Some(&(at, task)) = self.order.first() {
            if at > now {
                break;
            }
            self.order.pop_first();
            self.at.remove(&task);
            due.push(task);
        }
        due
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_first_tick_reads_everything_then_only_the_feed() {
        let mut c = Checks::new(Duration::from_secs(10));
        assert_eq!(c.tick_scope(100), Scope::All);
        let woken = TaskId::new();
        c.wake(woken);
        assert_eq!(
            c.tick_scope(120),
            Scope::Changed {
                from: 100,
                to: 120,
                also: vec![woken]
            }
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(c.tick_scope(130), Scope::All, "every full_check_ms");
        c.read_everything();
        assert_eq!(c.woken_scope(), Scope::All);
        assert_eq!(c.woken_scope(), Scope::Tasks(vec![]));
    }

    #[tokio::test(start_paused = true)]
    async fn backoffs_end_by_the_monotonic_clock_and_join_the_next_tick() {
        let mut c = Checks::new(Duration::from_secs(3600));
        let _ = c.tick_scope(1);
        let (a, b) = (TaskId::new(), TaskId::new());
        c.backoff(a, Duration::from_secs(2));
        c.backoff(b, Duration::from_secs(1));
        c.backoff(b, Duration::from_secs(3));
        assert_eq!(
            c.next_backoff(),
            Some(Instant::now() + Duration::from_secs(2))
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            c.tick_scope(2),
            Scope::Changed {
                from: 1,
                to: 2,
                also: vec![a]
            }
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(c.due_backoffs(), vec![b]);
        assert_eq!(c.next_backoff(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_starved_check_reads_everything_once_a_pod_ends() {
        let mut c = Checks::new(Duration::from_secs(3600));
        let _ = c.tick_scope(1);
        c.starved(true);
        c.pod_ended();
        assert_eq!(c.woken_scope(), Scope::All);
        c.pod_ended();
        assert_eq!(c.woken_scope(), Scope::Tasks(vec![]));
    }
}
