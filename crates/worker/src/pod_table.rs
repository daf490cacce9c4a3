//! The pods this node runs: their tasks, stop tokens and join handles, and the view the
//! planner reads.
//!
//! A pod stays in the planner's view from its spawn until its end is settled: a pod that
//! ended cleanly leaves at once; a crashed one stays, marked `ending`, until its crash is
//! recorded, so a check in between neither starts it again nor mistakes its head for a
//! pod left behind. Pods a lost node left behind are marked the same way while their
//! loss is being recorded.

use std::collections::{BTreeSet, HashMap};

use taskpod_core::domain::TaskId;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::planner::PodSlot;
use crate::pod::PodExit;

/// A running pod.
#[derive(Debug)]
struct Handle {
    epoch: i64,
    partition: i32,
    /// Cancelled when the pod must stop; a child of its incarnation's fence.
    stop: CancellationToken,
    /// The trace the pod continues, for the span of its crash.
    trace: Option<String>,
}

/// A pod that ended.
#[derive(Debug)]
pub(crate) struct Ended {
    pub task: TaskId,
    pub epoch: i64,
    pub partition: i32,
    pub exit: PodExit,
    pub trace: Option<String>,
}

#[derive(Debug, Default)]
pub(crate) struct PodTable {
    slots: HashMap<TaskId, PodSlot>,
    handles: HashMap<TaskId, Handle>,
    joins: JoinSet<(TaskId, i64, PodExit)>,
}

impl PodTable {
    /// Runs `pod` for `task` at `epoch`; `stop` is what stops it.
    pub fn spawn(
        &mut self,
        task: TaskId,
        epoch: i64,
        partition: i32,
        stop: CancellationToken,
        trace: Option<String>,
        pod: impl Future<Output = PodExit> + Send + 'static,
    ) {
        self.slots.insert(
            task,
            PodSlot {
                epoch,
                ending: false,
            },
        );
        self.handles.insert(
            task,
            Handle {
                epoch,
                partition,
                stop,
                trace,
            },
        );
        self.joins.spawn(async move { (task, epoch, pod.await) });
    }

    /// What the planner sees.
    pub fn slots(&self) -> &HashMap<TaskId, PodSlot> {
        &self.slots
    }

    /// Pods running now (not those whose end is being recorded).
    pub fn running(&self) -> usize {
        self.handles.len()
    }

    pub fn running_ids(&self) -> Vec<TaskId> {
        self.handles.keys().copied().collect()
    }

    /// Partitions where a pod runs: they are not released.
    pub fn busy_partitions(&self) -> BTreeSet<i32> {
        self.handles.values().map(|h| h.partition).collect()
    }

    pub fn epoch_of(&self, task: TaskId) -> Option<i64> {
        self.handles.get(&task).map(|h| h.epoch)
    }

    pub fn stop(&self, task: TaskId) {
        if let Some(h) = self.handles.get(&task) {
            h.stop.cancel();
        }
    }

    pub fn stop_all(&self) {
        for h in self.handles.values() {
            h.stop.cancel();
        }
    }

    /// Stops the pods of `partitions`.
    pub fn stop_in(&self, partitions: &BTreeSet<i32>) {
        for h in self.handles.values() {
            if partitions.contains(&h.partition) {
                h.stop.cancel();
            }
        }
    }

    /// The next pod to end; `None` while none runs. A crashed pod stays in the view as
    /// `ending` until [`PodTable::settled`].
    pub async fn join_next(&mut self) -> Option<Ended> {
        loop {
            let joined = self.joins.join_next().await?;
            let Ok((task, epoch, exit)) = joined else {
                // A pod task was aborted (the drain cut it off): the drain accounts
                // for it.
                continue;
            };
            let Some(handle) = self.handles.remove(&task) else {
                continue;
            };
            if handle.epoch != epoch {
                self.handles.insert(task, handle);
                continue;
            }
            match exit {
                PodExit::Crashed(_) => {
                    self.slots.insert(
                        task,
                        PodSlot {
                            epoch,
                            ending: true,
                        },
                    );
                }
                _ => {
                    self.slots.remove(&task);
                }
            }
            return Some(Ended {
                task,
                epoch,
                partition: handle.partition,
                exit,
                trace: handle.trace,
            });
        }
    }

    /// Marks a pod this node does not run as ending while its loss is recorded.
    pub fn recording(&mut self, task: TaskId, epoch: i64) {
        self.slots.entry(task).or_insert(PodSlot {
            epoch,
            ending: true,
        });
    }

    /// The end of `task`'s pod at `epoch` is recorded (or given up): it leaves the view.
    pub fn settled(&mut self, task: TaskId, epoch: i64) {
        if self
            .slots
            .get(&task)
            .is_some_and(|s| s.ending && s.epoch == epoch)
        {
            self.slots.remove(&task);
        }
    }

    /// Forgets every record in flight (the recorder restarted: the next check plans
    /// them again).
    pub fn forget_recording(&mut self) {
        self.slots.retain(|_, s| !s.ending);
    }

    /// Cuts off the pods still running (the drain's grace is over): returns them.
    pub fn abort_all(&mut self) -> Vec<(TaskId, i64, i32)> {
        self.joins.abort_all();
        let cut: Vec<(TaskId, i64, i32)> = self
            .handles
            .drain()
            .map(|(task, h)| (task, h.epoch, h.partition))
            .collect();
        for (task, _, _) in &cut {
            self.slots.remove(task);
        }
        cut
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_crashed_pod_stays_in_view_until_its_crash_is_recorded() {
        let mut table = PodTable::default();
        let (a, b) = (TaskId::new(), TaskId::new());
        table.spawn(a, 1, 3, CancellationToken::new(), None, async {
            PodExit::Crashed("boom".into())
        });
        let stop = CancellationToken::new();
        table.spawn(b, 2, 4, stop.clone(), None, {
            let stop = stop.clone();
            async move {
                stop.cancelled().await;
                PodExit::Stopped
            }
        });
        assert_eq!(table.busy_partitions(), [3, 4].into());
        let ended = table.join_next().await.unwrap();
        assert_eq!((ended.task, ended.epoch), (a, 1));
        assert!(table.slots()[&a].ending);
        assert_eq!(table.running(), 1);
        assert_eq!(table.busy_partitions(), [4].into());
        table.settled(a, 1);
        assert!(!table.slots().contains_key(&a));

        table.stop(b);
        let ended = table.join_next().await.unwrap();
        assert_eq!((ended.task, ended.exit), (b, PodExit::Stopped));
        assert!(table.slots().is_empty());
        assert!(table.join_next().await.is_none());
    }

    #[tokio::test]
    async fn losses_in_flight_are_in_view_and_forgotten_on_a_recorder_restart() {
        let mut table = PodTable::default();
        let t = TaskId::new();
        table.recording(t, 5);
        assert!(table.slots()[&t].ending);
        table.settled(t, 4);
        assert!(table.slots().contains_key(&t), "another epoch's answer");
        table.forget_recording();
        assert!(table.slots().is_empty());
    }
}
