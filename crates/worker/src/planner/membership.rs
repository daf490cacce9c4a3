//! Which nodes may own partitions, how many each keeps, which free partitions to claim
//! and which to hand back.
//!
//! Claims and hand-backs are deliberately asymmetric. A node claims every free
//! partition at once, whatever its share, so a dead peer's partitions never wait for a
//! settling delay. Shares decide only hand-backs, and only once membership has been
//! stable for a while: idle partitions first, so balancing moves no running work; a
//! busy partition is marked as leaving and released when its pods end (or, past a
//! deadline the controller keeps, when they are stopped). When the node falls below its
//! share again (a peer died meanwhile), partitions still leaving are kept instead.

use std::collections::{BTreeMap, BTreeSet};

use taskpod_core::domain::NodeId;

/// A live node as placement sees it: its weight and what it can run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub node: NodeId,
    pub capacity: u32,
    pub kinds: BTreeSet<String>,
    /// The `exec` programs it is configured with.
    pub programs: BTreeSet<String>,
}

impl Member {
    /// Whether this node can run everything `kinds` and `programs` name.
    fn offers(&self, kinds: &BTreeSet<String>, programs: &BTreeSet<String>) -> bool {
        kinds.is_subset(&self.kinds) && programs.is_subset(&self.programs)
    }
}

/// This node's place in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Whether it may own partitions at all.
    pub eligible: bool,
    /// No live node offers every kind and program some live node offers (a rolling
    /// deploy): every node is eligible, and a task whose kind or program its owner
    /// lacks waits for one that has it.
    pub degraded: bool,
    /// How many partitions it keeps once membership has settled.
    pub share: usize,
}

/// Kinds and programs are a cluster contract: a node that lacks something another live
/// node offers owns no partition, so no task waits on a node that cannot run it, unless
/// no live node offers the whole union (then all are eligible). Shares are weighted by
/// capacity over the eligible nodes and rounded up, so they always cover every
/// partition.
pub fn placement(me: NodeId, live: &[Member], partitions: usize) -> Placement {
    let kinds: BTreeSet<String> = live.iter().flat_map(|m| m.kinds.iter().cloned()).collect();
    let programs: BTreeSet<String> = live
        .iter()
        .flat_map(|m| m.programs.iter().cloned())
        .collect();
    let complete: Vec<&Member> = live
        .iter()
        .filter(|m| m.offers(&kinds, &programs))
        .collect();
    let degraded = complete.is_empty();
    let eligible: Vec<&Member> = if degraded {
        live.iter().collect()
    } else {
        complete
    };
    let Some(mine) = eligible.iter().find(|m| m.node == me) else {
        return Placement {
            eligible: false,
            degraded,
            share: 0,
        };
    };
    let total: u64 = eligible.iter().map(|m| u64::from(m.capacity)).sum();
    let share = if total == 0 {
        0
    } else {
        (partitions as u64 * u64::from(mine.capacity)).div_ceil(total) as usize
    };
    Placement {
        eligible: true,
        degraded,
        share,
    }
}

/// The partitions worth trying to lock: not held by this node, and with no owner, a
/// dead owner, or this very node (a claim whose answer was lost). The advisory lock
/// decides; a partition whose owner is alive would only fail the try.
pub fn claimable(
    me: NodeId,
    partitions: &[(i32, Option<NodeId>)],
    held: &BTreeSet<i32>,
    live: &BTreeSet<NodeId>,
) -> Vec<i32> {
    partitions
        .iter()
        .filter(|(p, _)| !held.contains(p))
        .filter(|(_, owner)| owner.is_none_or(|o| o == me || !live.contains(&o)))
        .map(|(p, _)| *p)
        .collect()
}

/// What to change in the set of partitions being handed back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HandBacks {
    /// Start handing these back.
    pub leave: Vec<i32>,
    /// Keep these after all (the node is below its share again).
    pub keep: Vec<i32>,
}

/// Hand-backs for a node owning `owned` (leaving or not), with `busy` the partitions
/// where it runs pods. Only after membership `settled`, only the excess above `share`,
/// idle partitions first, then the highest numbers (a stable choice, so two rounds agree).
pub fn hand_backs(
    owned: &BTreeMap<i32, i64>,
    leaving: &BTreeSet<i32>,
    busy: &BTreeSet<i32>,
    share: usize,
    settled: bool,
) -> HandBacks {
    let keeping = owned.keys().filter(|p| !leaving.contains(p)).count();
    let mut out = HandBacks::default();
    if keeping < share {
        // Busy ones first: they would otherwise have their pods stopped at the deadline.
        let mut back: Vec<i32> = leaving.iter().copied().collect();
        back.sort_by_key(|p| (!busy.contains(p), *p));
        out.keep = back.into_iter().take(share - keeping).collect();
        return out;
    }
    if !settled || keeping == share {
        return out;
    }
    let mut extras: Vec<i32> = owned
        .keys()
        .copied()
        .filter(|p| !leaving.contains(p))
        .collect();
    extras.sort_by_key(|p| (busy.contains(p), std::cmp::Reverse(*p)));
    out.leave = extras.into_iter().take(keeping - share).collect();
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn member(i: u8, capacity: u32, kinds: &[&str], programs: &[&str]) -> Member {
        Member {
            node: node(i),
            capacity,
            kinds: kinds.iter().map(|k| (*k).to_owned()).collect(),
            programs: programs.iter().map(|p| (*p).to_owned()).collect(),
        }
    }

    fn node(i: u8) -> NodeId {
        NodeId(uuid::Uuid::from_bytes([i; 16]))
    }

    #[test]
    fn shares_are_weighted_by_capacity_and_rounded_up() {
        let live = [
            member(1, 100, &["sleep"], &[]),
            member(2, 300, &["sleep"], &[]),
        ];
        assert_eq!(placement(node(1), &live, 256).share, 64);
        assert_eq!(placement(node(2), &live, 256).share, 192);
        let three = [
            member(1, 1, &["sleep"], &[]),
            member(2, 1, &["sleep"], &[]),
            member(3, 1, &["sleep"], &[]),
        ];
        assert_eq!(placement(node(1), &three, 256).share, 86);
    }

    #[test]
    fn a_node_lacking_a_kind_or_program_others_offer_owns_nothing() {
        let live = [
            member(1, 10, &["sleep", "exec"], &["build"]),
            member(2, 10, &["sleep", "exec"], &[]),
            member(3, 10, &["sleep"], &[]),
        ];
        let p = placement(node(1), &live, 256);
        assert!(p.eligible && !p.degraded);
        assert_eq!(p.share, 256, "the only complete node takes everything");
        assert!(
            !placement(node(2), &live, 256).eligible,
            "lacks the program"
        );
        assert!(!placement(node(3), &live, 256).eligible, "lacks the kind");
    }

    #[test]
    fn a_rolling_deploy_with_disjoint_offers_makes_every_node_eligible() {
        let live = [
            member(1, 10, &["sleep"], &["old"]),
            member(2, 10, &["sleep"], &["new"]),
        ];
        for n in [1, 2] {
            let p = placement(node(n), &live, 256);
            assert!(p.eligible && p.degraded);
            assert_eq!(p.share, 128);
        }
    }

    #[test]
    fn a_node_not_in_the_live_set_is_not_eligible() {
        let live = [member(1, 10, &["sleep"], &[])];
        assert!(!placement(node(9), &live, 256).eligible);
    }

    #[test]
    fn free_dead_and_own_partitions_are_claimable_live_owners_are_not() {
        let rows = [
            (0, None),
            (1, Some(node(1))),
            (2, Some(node(2))),
            (3, Some(node(3))),
            (4, None),
        ];
        let live: BTreeSet<NodeId> = [node(1), node(2)].into();
        let held: BTreeSet<i32> = [4].into();
        assert_eq!(claimable(node(1), &rows, &held, &live), vec![0, 1, 3]);
    }

    #[test]
    fn nothing_is_handed_back_before_membership_settles() {
        let owned: BTreeMap<i32, i64> = (0..10).map(|p| (p, 1)).collect();
        let out = hand_backs(&owned, &BTreeSet::new(), &BTreeSet::new(), 5, false);
        assert_eq!(out, HandBacks::default());
    }

    #[test]
    fn idle_partitions_go_first() {
        let owned: BTreeMap<i32, i64> = (0..6).map(|p| (p, 1)).collect();
        let busy: BTreeSet<i32> = [4, 5].into();
        let out = hand_backs(&owned, &BTreeSet::new(), &busy, 2, true);
        assert_eq!(out.leave, vec![3, 2, 1, 0]);
        let out = hand_backs(&owned, &BTreeSet::new(), &busy, 1, true);
        assert_eq!(
            out.leave,
            vec![3, 2, 1, 0, 5],
            "then busy ones, highest first"
        );
    }

    #[test]
    fn partitions_still_leaving_are_kept_when_the_node_falls_below_its_share() {
        let owned: BTreeMap<i32, i64> = (0..6).map(|p| (p, 1)).collect();
        let leaving: BTreeSet<i32> = [3, 4, 5].into();
        let busy: BTreeSet<i32> = [5].into();
        let out = hand_backs(&owned, &leaving, &busy, 5, false);
        assert_eq!(out.keep, vec![5, 3], "busy first");
        assert!(out.leave.is_empty());
    }

    fn arb_members() -> impl Strategy<Value = Vec<Member>> {
        let kinds = prop::sample::subsequence(vec!["manual", "sleep", "exec"], 1..=3);
        let programs = prop::sample::subsequence(vec!["a", "b"], 0..=2);
        prop::collection::vec((1u32..50, kinds, programs), 1..6).prop_map(|ms| {
            ms.into_iter()
                .enumerate()
                .map(|(i, (c, k, p))| member(i as u8 + 1, c, &k, &p))
                .collect()
        })
    }

    proptest! {
        /// Whatever the offers, the eligible nodes' shares cover every partition, at
        /// least one node is eligible, and an eligible node offers everything unless
        /// placement is degraded.
        #[test]
        fn eligible_shares_cover_every_partition(live in arb_members(), partitions in 1usize..1024) {
            let placements: Vec<Placement> =
                live.iter().map(|m| placement(m.node, &live, partitions)).collect();
            let covered: usize = placements.iter().filter(|p| p.eligible).map(|p| p.share).sum();
            prop_assert!(covered >= partitions);
            prop_assert!(placements.iter().any(|p| p.eligible));
            let kinds: BTreeSet<String> = live.iter().flat_map(|m| m.kinds.clone()).collect();
            let programs: BTreeSet<String> = live.iter().flat_map(|m| m.programs.clone()).collect();
            for (m, p) in live.iter().zip(&placements) {
                if p.eligible && !p.degraded {
                    prop_assert!(m.offers(&kinds, &programs));
                }
            }
        }

        /// Handing back never leaves the node below its share, never names a partition
        /// it does not own or already hands back, and takes busy partitions only when
        /// idle ones do not suffice.
        #[test]
        fn hand_backs_stop_at_the_share(
            owned in prop::collection::btree_set(0i32..64, 0..64),
            leaving_pick in prop::collection::vec(any::<bool>(), 64),
            busy_pick in prop::collection::vec(any::<bool>(), 64),
            share in 0usize..64,
            settled in any::<bool>(),
        ) {
            let owned: BTreeMap<i32, i64> = owned.into_iter().map(|p| (p, 1)).collect();
            let leaving: BTreeSet<i32> =
                owned.keys().copied().filter(|p| leaving_pick[*p as usize]).collect();
            let busy: BTreeSet<i32> =
                owned.keys().copied().filter(|p| busy_pick[*p as usize]).collect();
            let out = hand_backs(&owned, &leaving, &busy, share, settled);
            let keeping = owned.len() - leaving.len();
            let after = keeping + out.keep.len() - out.leave.len();
            if keeping >= share {
                prop_assert!(after >= share);
                prop_assert!(out.keep.is_empty());
            } else {
                prop_assert!(out.leave.is_empty());
                prop_assert!(after <= share);
            }
            for p in &out.leave {
                prop_assert!(owned.contains_key(p) && !leaving.contains(p));
            }
            for p in &out.keep {
                prop_assert!(leaving.contains(p));
            }
            let idle_left = owned.keys().filter(|p| {
                !leaving.contains(p) && !busy.contains(p) && !out.leave.contains(p)
            }).count();
            if out.leave.iter().any(|p| busy.contains(p)) {
                prop_assert_eq!(idle_left, 0);
            }
        }
    }
}
