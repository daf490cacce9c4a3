//! Ownership: one incarnation of this node, its lock session, and the partitions it
//! claims, hands back and releases.
//!
//! An [`Incarnation`] is a node id with a lock session of its own ([`keeper`]). It
//! holds its node key before its `nodes` row is visible (a peer deletes a row whose key
//! nobody holds), claims free partitions (lock, then bump the generation), hands back
//! extras once membership settles ([`crate::planner::membership`]) and releases a
//! partition (clear the row, then unlock) only once no pod of its runs there.
//!
//! Every step keeps the books true when a call fails: a partition stays owned until its
//! release committed and its lock was let go (an error leaves it owned and leaving, and
//! the next round tries again), and a partition whose claim answer was lost stays
//! locked and is claimed again (the lock makes a second bump harmless). A lost session
//! cancels the incarnation's [`Incarnation::fence`] token at once, from a task of its
//! own: every pod's stop token is a child of it, so pods and their programs stop
//! without waiting on the control loop.

pub mod keeper;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use taskpod_core::domain::NodeId;
use taskpod_core::store::Store;
use taskpod_core::store::keys::{node_key, partition_key};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::WorkerError;
use crate::liveness::{Liveness, LivenessFeed};
use crate::planner::membership::{self, Member, Placement};
use crate::settings::WorkerSettings;
use keeper::{Keeper, KeeperEnd, LockClient};

/// What a membership read found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Membership {
    /// A peer's lock session is gone: its pods are adopted as partitions are claimed.
    pub peer_lost: bool,
}

/// One incarnation of this node and what it owns.
#[derive(Debug)]
pub struct Incarnation {
    node: NodeId,
    lock: LockClient,
    keeper: Keeper,
    liveness: Liveness,
    /// Cancelled by the fence watcher the moment the lock session is lost, and by the
    /// control loop when the incarnation ends (drain, gray failure).
    fence: CancellationToken,
    fence_watch: JoinHandle<()>,
    /// Partition -> the generation this incarnation claimed it at.
    owned: BTreeMap<i32, i64>,
    /// Partitions being handed back, and when their pods are stopped if still busy.
    leaving: BTreeMap<i32, Instant>,
    leaving_set: BTreeSet<i32>,
    /// Locked, but the claim's answer was lost: claimed again next round.
    unclaimed: BTreeSet<i32>,
    membership: Vec<NodeId>,
    membership_since: Instant,
    live: BTreeSet<NodeId>,
    placement: Placement,
}

impl Incarnation {
    /// Opens a lock session, takes a fresh node key on it, then registers the node.
    ///
    /// # Errors
    /// When the store or the lock session cannot be reached.
    pub async fn connect(store: &Store, settings: &WorkerSettings) -> Result<Self, WorkerError> {
        let (feed, liveness) = LivenessFeed::new(settings.lock_detection_bound());
        let (lock, keeper) = keeper::start(
            settings.lock_url().to_owned(),
            settings.lock.clone(),
            feed,
            settings.ping_interval(),
        )
        .await?;
        let node = NodeId::new();
        let lock_key = store.reserve_lock_key().await?;
        if !lock.try_lock(node_key(lock_key)).await? {
            return Err(WorkerError::Store(taskpod_core::Error::Internal(format!(
                "node key {lock_key} is taken"
            ))));
        }
        let programs: Vec<String> = settings.handlers.programs.keys().cloned().collect();
        store
            .register_node(
                node,
                lock_key,
                &settings.name,
                settings.capacity as i32,
                &settings.handlers.kinds,
                &programs,
            )
            .await?;
        let fence = CancellationToken::new();
        let fence_watch = tokio::spawn({
            let (fence, mut liveness) = (fence.clone(), liveness.clone());
            async move {
                tokio::select! {
                    () = liveness.lost() => {
                        tracing::warn!(%node, "lock session lost, fencing every pod");
                        fence.cancel();
                    }
                    () = fence.cancelled() => {}
                }
            }
        });
        tracing::info!(%node, lock_key, "node registered");
        Ok(Self {
            node,
            lock,
            keeper,
            liveness,
            fence,
            fence_watch,
            owned: BTreeMap::new(),
            leaving: BTreeMap::new(),
            leaving_set: BTreeSet::new(),
            unclaimed: BTreeSet::new(),
            membership: Vec::new(),
            membership_since: Instant::now(),
            live: BTreeSet::new(),
            placement: Placement {
                eligible: false,
                degraded: false,
                share: 0,
            },
        })
    }

    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Whether the lock session answered within the detection bound.
    pub fn liveness(&self) -> &Liveness {
        &self.liveness
    }

    /// The token every pod's stop token descends from.
    pub fn fence(&self) -> &CancellationToken {
        &self.fence
    }

    pub fn owned(&self) -> &BTreeMap<i32, i64> {
        &self.owned
    }

    pub fn leaving(&self) -> &BTreeSet<i32> {
        &self.leaving_set
    }

    pub fn live(&self) -> &BTreeSet<NodeId> {
        &self.live
    }

    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// Resolves when the keeper ends: the session was lost (or closed).
    pub async fn keeper_ended(&mut self) -> KeeperEnd {
        self.keeper.ended().await
    }

    /// Leaving partitions whose hand-back deadline passed: their pods are stopped.
    pub fn evicting(&self, now: Instant) -> BTreeSet<i32> {
        self.leaving
            .iter()
            .filter(|(_, deadline)| **deadline <= now)
            .map(|(p, _)| *p)
            .collect()
    }

    /// Reads membership: live peers are those whose node key another session holds;
    /// the rows of dead ones are deleted. Recomputes this node's placement.
    ///
    /// # Errors
    /// When the store or the lock session fails.
    pub async fn refresh_membership(
        &mut self,
        store: &Store,
        partitions: usize,
    ) -> Result<Membership, WorkerError> {
        let nodes = store.nodes().await?;
        let mut out = Membership::default();
        let mut members = Vec::with_capacity(nodes.len());
        for n in nodes {
            let alive =
                n.node_id == self.node || self.lock.is_held_elsewhere(node_key(n.lock_key)).await?;
            if !alive {
                tracing::info!(node = %n.node_id, name = %n.name, "peer is gone");
                out.peer_lost = true;
                store.deregister_node(n.node_id).await?;
                continue;
            }
            members.push(Member {
                node: n.node_id,
                capacity: u32::try_from(n.capacity).unwrap_or(0),
                kinds: n.kinds.into_iter().collect(),
                programs: n.programs.into_iter().collect(),
            });
        }
        let mut ids: Vec<NodeId> = members.iter().map(|m| m.node).collect();
        ids.sort();
        if ids != self.membership {
            self.membership = ids;
            self.membership_since = Instant::now();
        }
        self.live = self.membership.iter().copied().collect();
        self.placement = membership::placement(self.node, &members, partitions);
        Ok(out)
    }

    /// Claims every free partition (and re-claims those whose claim answer was lost),
    /// if this node is eligible. Returns how many it claimed. Two round trips whatever
    /// the count: one locks every claimable partition it can, one records the claims.
    ///
    /// # Errors
    /// When the store or the lock session fails; what was claimed before stays owned.
    pub async fn claim(&mut self, store: &Store) -> Result<usize, WorkerError> {
        let retry: Vec<i32> = std::mem::take(&mut self.unclaimed).into_iter().collect();
        let mut claimed = self.claim_locked(store, &retry).await?;
        if !self.placement.eligible {
            return Ok(claimed);
        }
        let rows: Vec<(i32, Option<NodeId>)> = store
            .partitions()
            .await?
            .into_iter()
            .map(|p| (p.partition, p.owner_node))
            .collect();
        let held: BTreeSet<i32> = self.owned.keys().copied().collect();
        let wanted = membership::claimable(self.node, &rows, &held, &self.live);
        if wanted.is_empty() {
            return Ok(claimed);
        }
        let locked: BTreeSet<_> = self
            .lock
            .try_lock_many(wanted.iter().copied().map(partition_key).collect())
            .await?
            .into_iter()
            .collect();
        let got: Vec<i32> = wanted
            .into_iter()
            .filter(|p| locked.contains(&partition_key(*p)))
            .collect();
        claimed += self.claim_locked(store, &got).await?;
        Ok(claimed)
    }

    /// Records the claims of partitions whose locks this session holds.
    async fn claim_locked(
        &mut self,
        store: &Store,
        partitions: &[i32],
    ) -> Result<usize, WorkerError> {
        if partitions.is_empty() {
            return Ok(0);
        }
        match store.claim_partitions(partitions, self.node).await {
            Ok(claims) => {
                for &(partition, generation) in &claims {
                    self.owned.insert(partition, generation);
                    tracing::debug!(partition, generation, "partition claimed");
                }
                let missing: Vec<i32> = partitions
                    .iter()
                    .copied()
                    .filter(|p| !self.owned.contains_key(p))
                    .collect();
                if missing.is_empty() {
                    return Ok(claims.len());
                }
                // Partitions are never deleted; keep the locks and try again, as for a
                // lost answer.
                self.unclaimed.extend(missing.iter().copied());
                Err(WorkerError::Store(taskpod_core::Error::Internal(format!(
                    "claimed partitions {missing:?} have no row"
                ))))
            }
            Err(e) => {
                // It may have committed: keep the locks and claim again (a second bump
                // is harmless while the locks are ours).
                self.unclaimed.extend(partitions.iter().copied());
                Err(e.into())
            }
        }
    }

    /// Starts or cancels hand-backs by the planner's rules; `busy` are the partitions
    /// where this node runs pods.
    pub fn rebalance(&mut self, busy: &BTreeSet<i32>, settle: Duration, deadline: Duration) {
        let settled = self.membership_since.elapsed() >= settle;
        let share = if self.placement.eligible {
            self.placement.share
        } else {
            0
        };
        let changes = membership::hand_backs(&self.owned, &self.leaving_set, busy, share, settled);
        let until = Instant::now() + deadline;
        for p in changes.leave {
            tracing::debug!(partition = p, busy = busy.contains(&p), "handing back");
            self.leaving.insert(p, until);
            self.leaving_set.insert(p);
        }
        for p in changes.keep {
            self.leaving.remove(&p);
            self.leaving_set.remove(&p);
        }
    }

    /// Releases the leaving partitions where no pod runs. A release that fails leaves
    /// the partition owned and leaving, for the next round.
    ///
    /// # Errors
    /// When the store or the lock session fails.
    pub async fn release_idle(
        &mut self,
        store: &Store,
        busy: &BTreeSet<i32>,
    ) -> Result<(), WorkerError> {
        let idle: Vec<i32> = self
            .leaving_set
            .iter()
            .copied()
            .filter(|p| !busy.contains(p))
            .collect();
        for p in idle {
            self.release(store, p).await?;
        }
        Ok(())
    }

    /// Hands every partition back (a drain): pods have stopped.
    ///
    /// # Errors
    /// When the store or the lock session fails: the rest end with the session.
    pub async fn release_all(&mut self, store: &Store) -> Result<(), WorkerError> {
        let owned: Vec<i32> = self.owned.keys().copied().collect();
        for p in owned {
            self.release(store, p).await?;
        }
        Ok(())
    }

    /// Clears the claim, then unlocks: a claimer that takes the lock next finds the row
    /// free, and no pod can start in between (a mint checks the row). Forgets the
    /// partition only once both are done.
    async fn release(&mut self, store: &Store, partition: i32) -> Result<(), WorkerError> {
        let Some(&generation) = self.owned.get(&partition) else {
            return Ok(());
        };
        // False: an earlier release committed but its answer was lost. Nobody else can
        // have claimed it meanwhile: the lock is still ours.
        let _cleared = store
            .release_partition(partition, self.node, generation)
            .await?;
        self.lock.unlock(partition_key(partition)).await?;
        self.owned.remove(&partition);
        self.leaving.remove(&partition);
        self.leaving_set.remove(&partition);
        tracing::debug!(partition, "partition handed back");
        Ok(())
    }

    /// Forgets partitions whose rows say another claim replaced this one: some mints
    /// were refused for their generation. Only a lost session lets another node lock
    /// them, so the keeper is about to say so too.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn drop_replaced(
        &mut self,
        store: &Store,
        claims: &BTreeSet<(i32, i64)>,
    ) -> Result<(), WorkerError> {
        let claims: Vec<(i32, i64)> = claims.iter().copied().collect();
        for partition in store.lost_partitions(self.node, &claims).await? {
            tracing::warn!(partition, "claim replaced under us");
            self.owned.remove(&partition);
            self.leaving.remove(&partition);
            self.leaving_set.remove(&partition);
        }
        Ok(())
    }

    /// Ends the incarnation: cancels its fence, deletes its row (best effort: peers
    /// delete it anyway once its key is free) and closes its session.
    pub async fn close(mut self, store: &Store) {
        self.fence.cancel();
        let _ = self.fence_watch.await;
        if let Err(e) = store.deregister_node(self.node).await {
            tracing::debug!(error = %e, "node row left for peers to delete");
        }
        drop(self.lock);
        let _ = self.keeper.ended().await;
    }

    /// Gives up the incarnation at once: its session is lost or must be let go. Does
    /// not wait on the store or the session (a partitioned node must fence without any
    /// help from the network it lost); the keeper is aborted, which closes the socket.
    pub fn abandon(self) {
        self.fence.cancel();
        self.keeper.abort();
        self.fence_watch.abort();
    }
}

/// The generations of the claims a batch of mints relied on.
pub fn claims_of(
    owned: &BTreeMap<i32, i64>,
    partitions: impl Iterator<Item = i32>,
) -> BTreeSet<(i32, i64)> {
    partitions
        .filter_map(|p| owned.get(&p).map(|g| (p, *g)))
        .collect()
}
