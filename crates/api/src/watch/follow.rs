//! What one WatchTasks stream follows: the tasks it has shown as matching and not yet
//! as `left`, each with the version it last showed. Nothing else is remembered, so a
//! stream's memory is bounded by the tasks it follows, not by the cluster's changes.

use std::collections::HashMap;

use taskpod_core::domain::TaskId;
use taskpod_core::telemetry::metrics::metrics;

/// What a stream sends for a changed task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The task (newly or still matching) at a version the stream has not shown; with
    /// the version shown before, when there was one.
    Show { shown: Option<i64> },
    /// The task stopped matching: the client drops it.
    Left,
    /// Nothing: the version was shown already (it was read above an earlier watermark),
    /// or the task neither matches nor was followed.
    Skip,
}

/// The followed tasks; the replica's tracked-entries gauge counts them while it lives.
#[derive(Debug, Default)]
pub struct FollowSet {
    shown: HashMap<TaskId, i64>,
}

impl FollowSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Decides what to send for `task` at `version`, and remembers it.
    pub fn step(&mut self, task: TaskId, version: i64, matches: bool) -> Step {
        let shown = self.shown.get(&task).copied();
        match (shown, matches) {
            (Some(v), _) if version <= v => Step::Skip,
            (_, true) => {
                self.insert(task, version);
                Step::Show { shown }
            }
            (Some(_), false) => {
                self.remove(task);
                Step::Left
            }
            (None, false) => Step::Skip,
        }
    }

    /// Follows `task` as shown at `version` (a snapshot row, or a task that matched at a
    /// resume point).
    pub fn insert(&mut self, task: TaskId, version: i64) {
        if self.shown.insert(task, version).is_none() {
            metrics().watch_tracked(1);
        }
    }

    fn remove(&mut self, task: TaskId) {
        if self.shown.remove(&task).is_some() {
            metrics().watch_tracked(-1);
        }
    }

    pub fn contains(&self, task: TaskId) -> bool {
        self.shown.contains_key(&task)
    }

    /// Of `ids`, those followed.
    pub fn followed_among(&self, ids: &[TaskId]) -> Vec<TaskId> {
        ids.iter()
            .copied()
            .filter(|id| self.contains(*id))
            .collect()
    }

    /// Every followed task, when there are at most `limit`.
    pub fn all_up_to(&self, limit: usize) -> Option<Vec<TaskId>> {
        (self.shown.len() <= limit).then(|| self.shown.keys().copied().collect())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shown.len()
    }
}

impl Drop for FollowSet {
    fn drop(&mut self) {
        metrics().watch_tracked(-(self.shown.len() as i64));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_version_read_early_is_not_shown_again() {
        let mut f = FollowSet::new();
        let t = TaskId::new();
        assert_eq!(f.step(t, 3, true), Step::Show { shown: None });
        // The same row read again by the next range: the version is not repeated.
        assert_eq!(f.step(t, 3, true), Step::Skip);
        assert_eq!(f.step(t, 5, true), Step::Show { shown: Some(3) });
    }

    #[test]
    fn left_only_for_a_task_that_was_shown() {
        let mut f = FollowSet::new();
        let (a, b) = (TaskId::new(), TaskId::new());
        assert_eq!(f.step(a, 1, false), Step::Skip);
        assert_eq!(f.step(b, 1, true), Step::Show { shown: None });
        assert_eq!(f.step(b, 2, false), Step::Left);
        assert_eq!(f.step(b, 3, false), Step::Skip);
        assert!(!f.contains(b));
        assert_eq!(f.len(), 0);
    }

    proptest! {
        /// Rows read in any interleaving, each task's versions never going back and a
        /// version read any number of times (the same state each time): the stream
        /// shows each version at most once and in increasing order per task, sends
        /// `left` only for a task it follows, and follows exactly the tasks whose last
        /// step was a show.
        #[test]
        fn shown_versions_increase_and_follow_matches(
            reads in proptest::collection::vec((0usize..4, 0i64..3), 0..200),
            states in proptest::collection::vec(any::<bool>(), 4 * 700),
        ) {
            let ids: Vec<TaskId> = (0..4).map(|_| TaskId::new()).collect();
            let mut version = [1i64; 4];
            let mut f = FollowSet::new();
            let mut last_shown: HashMap<TaskId, i64> = HashMap::new();
            let mut following: HashMap<TaskId, bool> = HashMap::new();
            for (i, delta) in reads {
                version[i] += delta;
                let (id, v) = (ids[i], version[i]);
                let matches = states[i * 700 + v as usize];
                match f.step(id, v, matches) {
                    Step::Show { shown } => {
                        prop_assert!(matches);
                        prop_assert!(last_shown.get(&id).is_none_or(|s| *s < v));
                        prop_assert_eq!(shown.is_some(), following.get(&id) == Some(&true));
                        last_shown.insert(id, v);
                        following.insert(id, true);
                    }
                    Step::Left => {
                        prop_assert!(!matches);
                        prop_assert_eq!(following.get(&id), Some(&true));
                        following.insert(id, false);
                    }
                    Step::Skip => {
                        // Skipped: already shown, or neither matching nor followed.
                        prop_assert!(
                            last_shown.get(&id) == Some(&v) || (!matches && following.get(&id) != Some(&true))
                        );
                    }
                }
                let expected = following.values().filter(|f| **f).count();
                prop_assert_eq!(f.len(), expected);
            }
        }
    }
}
