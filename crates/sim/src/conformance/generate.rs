//! The seeded generator of conformance steps. It reads the model's state (what both
//! sides should hold) to make most steps plausible (the owner minting at its
//! generation, a pod appending at its epoch and version), and bends a share of them:
//! a stale epoch, generation or version, a zombie incarnation whose session died, a
//! session killed under a live owner.

use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;
use taskpod_core::domain::restart::CrashKind;
use taskpod_core::domain::{Command, NodeId, PodState};

use super::model_side::{Cluster, ModelSide};
use super::step::{PodEvent, Step};

/// The generator for one seed.
#[derive(Debug)]
pub struct Generator {
    rng: ChaCha8Rng,
    nodes: usize,
}

impl Generator {
    pub fn new(seed: u64, nodes: usize) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            nodes,
        }
    }

    fn chance(&mut self, p: f64) -> bool {
        self.rng.random_bool(p)
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.rng.random_range(0..from.len())]
    }

    /// A value, or (with `1 - p`) a neighbour of it: stale, or from the future.
    fn bend(&mut self, v: i64, p: f64) -> i64 {
        if self.chance(p) {
            v
        } else {
            v + self.pick(&[-1, -1, 1])
        }
    }

    /// The slot and incarnation of `id`, if it is one of the cluster's.
    fn whose(c: &Cluster, id: NodeId) -> Option<(usize, usize)> {
        c.incs
            .iter()
            .enumerate()
            .find_map(|(n, incs)| incs.iter().position(|i| i.id == id).map(|inc| (n, inc)))
    }

    /// An incarnation of `node`: mostly its newest, sometimes an older (zombie) one.
    fn inc(&mut self, c: &Cluster, node: usize) -> usize {
        let n = c.incs[node].len().max(1);
        if n > 1 && self.chance(0.15) {
            self.rng.random_range(0..n - 1)
        } else {
            n - 1
        }
    }

    /// The next step.
    pub fn next(&mut self, m: &ModelSide, c: &Cluster) -> Step {
        if let Some(node) = (0..self.nodes).find(|n| m.sessions[*n].is_none()) {
            return Step::Connect { node };
        }
        let dead: Vec<usize> = (0..self.nodes).filter(|n| !m.alive(*n)).collect();
        if !dead.is_empty() && self.chance(0.3) {
            let node = self.pick(&dead);
            return Step::Connect { node };
        }
        let node = self.rng.random_range(0..self.nodes);
        // Tasks whose partition a dead incarnation still owns: where zombies act.
        let haunted: Vec<usize> = (0..c.tasks.len())
            .filter(|t| {
                m.model
                    .partition(c.partitions[*t])
                    .and_then(|r| r.owner)
                    .is_some_and(|o| Self::whose(c, o).is_some() && !m.model.node_alive(o))
            })
            .collect();
        let task = if !haunted.is_empty() && self.chance(0.4) {
            self.pick(&haunted)
        } else {
            self.rng.random_range(0..c.tasks.len())
        };
        let partition = c.partitions[task];
        let row = m
            .model
            .partition(partition)
            .unwrap_or(crate::model::PartitionRow {
                owner: None,
                generation: 0,
            });
        let head = m.model.task(c.tasks[task]).map(|r| r.state.clone());
        // The owner's slot and incarnation, when a node of this run owns the partition.
        let owner = row.owner.and_then(|o| Self::whose(c, o));
        let (wnode, winc) = match owner {
            Some(o) if self.chance(0.85) => o,
            _ => (node, self.inc(c, node)),
        };
        match self.rng.random_range(0..100) {
            // Mostly under a live owner, whose incarnation then acts as a zombie.
            0..6 => match owner {
                Some((n, i)) if i + 1 == c.incs[n].len() && self.chance(0.7) => {
                    Step::KillSession { node: n }
                }
                _ => Step::KillSession { node },
            },
            6..18 => Step::TryLock { node, partition },
            18..28 => {
                // As the protocol does it: by the holder of the lock, just after taking
                // it; or by a zombie incarnation whose session died in between. (A live
                // node that does not hold the lock never claims, and no statement can
                // tell who holds a lock without reading pg_locks.)
                let holder = (0..self.nodes).find(|n| m.holds(*n, partition));
                let zombies: Vec<(usize, usize)> = (0..self.nodes)
                    .flat_map(|n| (0..c.incs[n].len().saturating_sub(1)).map(move |i| (n, i)))
                    .collect();
                match holder {
                    Some(h) if zombies.is_empty() || self.chance(0.8) => Step::Claim {
                        node: h,
                        inc: c.incs[h].len().saturating_sub(1),
                        partition,
                    },
                    _ if !zombies.is_empty() && self.chance(0.3) => {
                        let (node, inc) = self.pick(&zombies);
                        Step::Claim {
                            node,
                            inc,
                            partition,
                        }
                    }
                    _ => Step::TryLock { node, partition },
                }
            }
            28..33 => Step::Release {
                node: wnode,
                inc: winc,
                partition,
                generation: self.bend(row.generation, 0.8),
            },
            33..37 => {
                let holder = (0..self.nodes).find(|n| m.holds(*n, partition));
                Step::Unlock {
                    node: holder.unwrap_or(node),
                    partition,
                }
            }
            37..52 => {
                let epoch = head.as_ref().map_or(0, |h| h.pod_epoch);
                Step::Mint {
                    node: wnode,
                    inc: winc,
                    task,
                    observed_epoch: self.bend(epoch, 0.85),
                    generation: self.bend(row.generation, 0.85),
                }
            }
            52..74 => {
                let (epoch, version, state) = head.as_ref().map_or((0, 1, PodState::None), |h| {
                    (h.pod_epoch, h.version, h.pod_state)
                });
                let event = match state {
                    PodState::Starting => PodEvent::Started,
                    PodState::Running if self.chance(0.8) => PodEvent::Advance,
                    PodState::Stopping => PodEvent::Stopped,
                    _ => self.pick(&[PodEvent::Started, PodEvent::Advance, PodEvent::Stopped]),
                };
                // A pod has an epoch someone minted; one under epoch 0 is rare.
                let epoch = if epoch == 0 && self.chance(0.8) {
                    1
                } else {
                    self.bend(epoch, 0.85)
                };
                Step::Append {
                    task,
                    epoch,
                    version: self.bend(version, 0.9),
                    event,
                }
            }
            74..86 => {
                let epoch = head.as_ref().map_or(0, |h| h.pod_epoch);
                let kind = self.pick(&[
                    CrashKind::Handler,
                    CrashKind::NodeLost,
                    CrashKind::Interrupted,
                ]);
                let batch = self.chance(0.5);
                Step::Crash {
                    node: wnode,
                    inc: winc,
                    task,
                    epoch: self.bend(epoch, 0.85),
                    generation: self.bend(row.generation, 0.85),
                    kind,
                    batch,
                }
            }
            _ => {
                let command = match self.rng.random_range(0..100) {
                    0..40 => Command::RequestStart,
                    40..65 => Command::RequestStop { reason: None },
                    65..85 => Command::RequestRestart,
                    85..93 => Command::Complete,
                    _ => Command::Cancel {
                        reason: "conformance".into(),
                    },
                };
                Step::Command { task, command }
            }
        }
    }
}
