//! The history oracle: replays accepted writes in order and flags every one that was
//! accepted under a stale fence, judged only from what was accepted before it, not
//! from the store's own conditions. So it checks the store (the model's, or the real
//! one's answers in the conformance test) from the outside:
//!
//! - a pod write needs its epoch to be the newest minted and not yet retired (a
//!   `pod_stopped`, `pod_crashed` or `node_lost` retires it), and the node that
//!   minted it must not have lost its lock since;
//! - a worker write (mint, crash record) needs the partition claimed by that node at
//!   that generation, not released since, and the node's lock not lost since;
//! - a mint needs the previous epoch retired, and mints exactly the next one;
//! - a claim needs the node's lock alive and bumps the generation by one.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use taskpod_core::domain::{NodeId, TaskId};

use super::store::{PartitionRow, Write};
use crate::time::Millis;

/// A write accepted under a stale fence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stale {
    pub at: Millis,
    pub write: Write,
    pub why: String,
}

impl fmt::Display for Stale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "at {}ms {:?} was accepted: {}",
            self.at, self.write, self.why
        )
    }
}

#[derive(Clone, Copy, Debug)]
struct Epoch {
    current: i64,
    /// The current epoch's end is recorded (or nothing was ever minted).
    retired: bool,
    /// Who minted it (unknown for a seeded epoch).
    minted_by: Option<NodeId>,
}

/// The oracle's memory of what was accepted so far.
#[derive(Clone, Debug, Default)]
pub struct History {
    epochs: BTreeMap<TaskId, Epoch>,
    partitions: BTreeMap<i32, PartitionRow>,
    lost: BTreeSet<NodeId>,
    /// How far into the log it has read.
    read: usize,
}

impl History {
    /// An oracle starting from these partition rows.
    pub fn new(partitions: impl IntoIterator<Item = (i32, PartitionRow)>) -> Self {
        Self {
            partitions: partitions.into_iter().collect(),
            ..Self::default()
        }
    }

    /// Reads the log entries it has not read yet; returns the stale ones.
    pub fn follow(&mut self, log: &[(Millis, Write)]) -> Vec<Stale> {
        let mut out = Vec::new();
        while self.read < log.len() {
            let (at, write) = &log[self.read];
            self.read += 1;
            if let Some(why) = self.apply(write) {
                out.push(Stale {
                    at: *at,
                    write: write.clone(),
                    why,
                });
            }
        }
        out
    }

    /// A task whose epoch is known to be `epoch` and live (the conformance test
    /// starts from tasks some earlier writer set up).
    pub fn seed_epoch(&mut self, task: TaskId, epoch: i64, live: bool) {
        self.epochs.insert(
            task,
            Epoch {
                current: epoch,
                retired: !live,
                minted_by: None,
            },
        );
    }

    fn epoch(&mut self, task: TaskId) -> &mut Epoch {
        self.epochs.entry(task).or_insert(Epoch {
            current: 0,
            retired: true,
            minted_by: None,
        })
    }

    fn worker(&self, node: NodeId, partition: i32, generation: i64) -> Option<String> {
        if self.lost.contains(&node) {
            return Some(format!("node {node} had lost its lock"));
        }
        match self.partitions.get(&partition) {
            Some(r) if r.owner == Some(node) && r.generation == generation => None,
            Some(r) => Some(format!(
                "partition {partition} is at generation {} owned by {:?}, not {generation} by {node}",
                r.generation, r.owner
            )),
            None => Some(format!("partition {partition} is unknown")),
        }
    }

    fn live_epoch(&mut self, task: TaskId, epoch: i64) -> Option<String> {
        let e = *self.epoch(task);
        if e.current != epoch {
            Some(format!("epoch {epoch} is not the newest ({})", e.current))
        } else if e.retired {
            Some(format!("epoch {epoch} was retired"))
        } else {
            None
        }
    }

    fn apply(&mut self, write: &Write) -> Option<String> {
        match write {
            Write::Claim {
                node,
                partition,
                generation,
            } => {
                let mut why = None;
                if self.lost.contains(node) {
                    why = Some(format!("node {node} had lost its lock"));
                }
                let row = self.partitions.entry(*partition).or_insert(PartitionRow {
                    owner: None,
                    generation: generation - 1,
                });
                if *generation != row.generation + 1 {
                    why = why.or(Some(format!(
                        "generation {generation} does not follow {}",
                        row.generation
                    )));
                }
                *row = PartitionRow {
                    owner: Some(*node),
                    generation: *generation,
                };
                why
            }
            Write::Release {
                node,
                partition,
                generation,
            } => {
                let why = match self.partitions.get(partition) {
                    Some(r) if r.owner == Some(*node) && r.generation == *generation => None,
                    _ => Some(format!("release of a claim not {node}'s at {generation}")),
                };
                if let Some(r) = self.partitions.get_mut(partition) {
                    r.owner = None;
                }
                why
            }
            Write::Mint {
                node,
                partition,
                generation,
                task,
                epoch,
            } => {
                let mut why = self.worker(*node, *partition, *generation);
                let e = self.epoch(*task);
                if !e.retired {
                    why = why.or(Some(format!("epoch {} was still live", e.current)));
                }
                if *epoch != e.current + 1 {
                    why = why.or(Some(format!("minted {epoch} after {}", e.current)));
                }
                *e = Epoch {
                    current: *epoch,
                    retired: false,
                    minted_by: Some(*node),
                };
                why
            }
            Write::Pod {
                task,
                epoch,
                events,
            } => {
                let minted_by = self.epoch(*task).minted_by;
                let why = self.live_epoch(*task, *epoch).or_else(|| {
                    minted_by
                        .filter(|n| self.lost.contains(n))
                        .map(|n| format!("epoch {epoch}'s node {n} had lost its lock"))
                });
                let e = self.epoch(*task);
                if events.contains(&"pod_stopped") && e.current == *epoch {
                    e.retired = true;
                }
                why
            }
            Write::Crash {
                node,
                partition,
                generation,
                task,
                epoch,
            } => {
                let why = self
                    .worker(*node, *partition, *generation)
                    .or_else(|| self.live_epoch(*task, *epoch));
                let e = self.epoch(*task);
                if e.current == *epoch {
                    e.retired = true;
                }
                why
            }
            Write::Command { .. } => None,
            Write::NodeLockLost { node } => {
                self.lost.insert(*node);
                None
            }
        }
    }
}
