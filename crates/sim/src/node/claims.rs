//! Membership, claims and hand-backs, as the controller does them with
//! `planner::membership`: live nodes are those whose key is held (probed on the lock
//! session), dead peers are deregistered, every claimable partition is tried at once,
//! and hand-backs wait for membership to settle.

use std::collections::{BTreeMap, BTreeSet};

use taskpod_core::domain::NodeId;
use taskpod_core::store::keys::NODE_NAMESPACE;
use taskpod_worker::planner::{Member, claimable, hand_backs, placement};

use super::ops::Op;
use super::{Ctx, SimNode};

impl SimNode {
    pub(super) fn membership(&mut self, cx: &mut Ctx<'_>) {
        let now_l = self.local(cx.now);
        let Some(inc) = self.inc.as_mut() else {
            return;
        };
        inc.last_claim = Some(now_l);
        let me = inc.id;
        let mut live = BTreeSet::new();
        let mut members = Vec::new();
        for (node, row) in cx.model.nodes() {
            let alive = if node == me {
                true
            } else {
                match cx.model.locks.held_elsewhere(
                    inc.session,
                    (NODE_NAMESPACE, row.lock_key),
                    cx.now,
                ) {
                    Ok(held) => held,
                    Err(_) => {
                        self.self_fence(cx);
                        return;
                    }
                }
            };
            if alive {
                live.insert(node);
                members.push(Member {
                    node,
                    capacity: row.capacity,
                    kinds: row.kinds.clone(),
                    programs: BTreeSet::new(),
                });
            } else {
                cx.trace.note(cx.now, |t| {
                    format!("{} finds {} gone", t.node(me), t.node(node))
                });
                cx.model.deregister_node(node);
            }
        }
        let sorted: Vec<NodeId> = live.iter().copied().collect();
        if sorted != inc.membership {
            inc.membership = sorted;
            inc.membership_since = now_l;
        }
        inc.live = live.clone();
        let place = placement(me, &members, cx.model.partition_count());
        // Claims and releases come before the check already queued, as in the loop.
        let mut next = Vec::new();
        if place.eligible {
            let rows: Vec<(i32, Option<NodeId>)> = cx
                .model
                .partitions()
                .into_iter()
                .map(|(p, r)| (p, r.owner))
                .collect();
            let held: BTreeSet<i32> = inc.owned.keys().copied().collect();
            for p in claimable(me, &rows, &held, &live) {
                next.push(Op::TryLock(p));
            }
        }
        let settled = now_l.saturating_sub(inc.membership_since) >= cx.timers.settle;
        let busy: BTreeSet<i32> = inc.pods.values().map(|p| p.partition).collect();
        let leaving: BTreeSet<i32> = inc.leaving.keys().copied().collect();
        let owned: BTreeMap<i32, i64> = inc.owned.clone();
        let out = hand_backs(&owned, &leaving, &busy, place.share, settled);
        for p in out.keep {
            inc.leaving.remove(&p);
        }
        for p in out.leave {
            inc.leaving.insert(p, now_l + cx.timers.handback_deadline);
            cx.trace.note(cx.now, |t| {
                format!(
                    "{} starts handing back p{p} (share {})",
                    t.node(me),
                    place.share
                )
            });
        }
        let empty: Vec<i32> = inc
            .leaving
            .keys()
            .copied()
            .filter(|p| !busy.contains(p))
            .collect();
        next.extend(empty.into_iter().map(Op::Release));
        for op in next.into_iter().rev() {
            inc.ops.push_front(op);
        }
    }
}
