//! The invariants, checked after every step:
//!
//! - **one live epoch**: for each task, at most one pod that some node (up or frozen)
//!   runs has an epoch the store would still accept (the head's epoch, not retired);
//! - **no stale write**: every accepted write, replayed by the history oracle, was
//!   accepted under the newest epoch and the current generation of a live node;
//! - **claims are locked**: a partition row owned by a node whose session is alive is
//!   locked by that very session;
//! - **bounded zombies**: a handler side effect happens only while its node's session
//!   is alive, or within the liveness bound after it ended (the bound in global time,
//!   at the slowest clock rate a node may have);
//!
//! and, once the faults stop, **progress**: within a bounded number of steps every
//! active task has a pod that runs ([`placed`]), and then, within the same bound, no
//! head shows a pod that no node runs ([`no_phantoms`]): the planner promises that the
//! pods a lost node left behind are recorded, those of tasks that ended too.

use taskpod_core::domain::{PodState, TaskId};
use taskpod_core::store::keys::PARTITION_NAMESPACE;

use crate::node::Health;
use crate::world::World;

/// Checks the step invariants; the first broken one, described.
///
/// # Errors
/// The violation.
pub fn check(w: &mut World) -> Result<(), String> {
    if let Some(stale) = w.history.follow(w.model.log()).into_iter().next() {
        return Err(w.trace.rename(&format!(
            "stale write accepted at {}ms: {:?} ({})",
            stale.at, stale.write, stale.why
        )));
    }
    one_live_epoch(w)?;
    claims_are_locked(w)?;
    bounded_zombies(w)
}

fn one_live_epoch(w: &World) -> Result<(), String> {
    for row in w.model.tasks() {
        let head = &row.state;
        if head.pod_state == PodState::None {
            continue;
        }
        let runners: Vec<String> = w
            .nodes
            .iter()
            .filter(|n| !matches!(n.health, Health::Down { .. }))
            .filter_map(|n| n.inc.as_ref())
            .filter(|inc| {
                inc.pods
                    .get(&head.task_id)
                    .is_some_and(|p| p.running() && p.epoch == head.pod_epoch)
            })
            .map(|inc| w.trace.node(inc.id))
            .collect();
        if runners.len() > 1 {
            return Err(format!(
                "two live pods of {} under epoch {}: on {}",
                w.trace.task(head.task_id),
                head.pod_epoch,
                runners.join(" and ")
            ));
        }
    }
    Ok(())
}

fn claims_are_locked(w: &World) -> Result<(), String> {
    for (p, row) in w.model.partitions() {
        let Some(owner) = row.owner else {
            continue;
        };
        let Some(session) = w.model.node_session(owner) else {
            continue;
        };
        if w.model.locks.holder((PARTITION_NAMESPACE, p)) != Some(session) {
            return Err(format!(
                "p{p} is claimed by live {} at g{} but its lock is held by {:?}",
                w.trace.node(owner),
                row.generation,
                w.model.locks.holder((PARTITION_NAMESPACE, p))
            ));
        }
    }
    Ok(())
}

fn bounded_zombies(w: &mut World) -> Result<(), String> {
    let slowest = w.cfg.skew_permille.0.max(1);
    let bound = (w.cfg.timers.detection_bound * 1000).div_ceil(slowest);
    for e in &w.effects[w.effects_checked..] {
        if let Some(ended) = w.model.locks.ended_at(e.session)
            && ended + bound < e.at
        {
            return Err(format!(
                "node {} ran a handler step of {} e{} at {}ms, {}ms after its session ended (bound {bound}ms)",
                e.node,
                w.trace.task(e.task),
                e.epoch,
                e.at,
                e.at - ended
            ));
        }
    }
    w.effects_checked = w.effects.len();
    Ok(())
}

/// Whether every active task has a running pod that an up node runs under the head's
/// epoch.
///
/// # Errors
/// The tasks still waiting.
pub fn placed(w: &World) -> Result<(), String> {
    let mut waiting = Vec::new();
    for row in w.model.tasks() {
        let h = &row.state;
        if World::wants_pod(h.status)
            && !(h.pod_state == PodState::Running && runs(w, h.task_id, h.pod_epoch))
        {
            waiting.push(format!(
                "{} ({} {} e{} {})",
                w.trace.task(h.task_id),
                h.kind,
                h.status,
                h.pod_epoch,
                h.pod_state
            ));
        }
    }
    if waiting.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "active tasks without a running pod: {}",
            waiting.join(", ")
        ))
    }
}

/// Whether every pod a head shows is run by some up node: none was left behind by a
/// dead one without its end being recorded.
///
/// # Errors
/// The pods nobody runs.
pub fn no_phantoms(w: &World) -> Result<(), String> {
    let mut phantoms = Vec::new();
    for row in w.model.tasks() {
        let h = &row.state;
        if h.pod_state != PodState::None && !runs(w, h.task_id, h.pod_epoch) {
            phantoms.push(format!(
                "{} ({} e{} {} on {})",
                w.trace.task(h.task_id),
                h.status,
                h.pod_epoch,
                h.pod_state,
                h.owner_node.map(|n| w.trace.node(n)).unwrap_or_default()
            ));
        }
    }
    if phantoms.is_empty() {
        Ok(())
    } else {
        Err(format!("pods no node runs: {}", phantoms.join(", ")))
    }
}

fn runs(w: &World, task: TaskId, epoch: i64) -> bool {
    w.nodes
        .iter()
        .filter(|n| n.health == Health::Up)
        .filter_map(|n| n.inc.as_ref())
        .any(|inc| {
            inc.pods
                .get(&task)
                .is_some_and(|p| p.running() && p.epoch == epoch)
        })
}
