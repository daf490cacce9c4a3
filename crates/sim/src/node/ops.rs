//! The round trips of a control cycle. Each is one scheduler step, so faults and other
//! actors interleave between them; a lock-session call that finds the session gone
//! fences the node, as a failed ping does.

use std::collections::BTreeSet;

use taskpod_core::domain::TaskId;
use taskpod_core::domain::restart::CrashKind;
use taskpod_core::store::keys::PARTITION_NAMESPACE;
use taskpod_worker::planner::{Loss, LostPod, Start};

use super::pod::SimPod;
use super::{Ctx, SimNode};
use crate::model::CrashAnswer;

/// One round trip.
#[derive(Clone, Debug)]
pub enum Op {
    Ping,
    /// Read the nodes, probe their keys, claim and hand back.
    Membership,
    TryLock(i32),
    Claim(i32),
    /// Clear the claim, then unlock.
    Release(i32),
    Unlock(i32),
    /// The check: the tick's scope, or only the woken tasks.
    Check {
        tick: bool,
    },
    RecordLosses(Vec<LostPod>),
    Mint(Vec<Start>),
    /// Record a handler crash of this node's own pod.
    RecordCrash {
        task: TaskId,
        epoch: i64,
        partition: i32,
    },
}

impl SimNode {
    /// Carries out one round trip.
    pub(super) fn run(&mut self, op: Op, cx: &mut Ctx<'_>) {
        match op {
            Op::Ping => self.ping(cx),
            Op::Membership => self.membership(cx),
            Op::TryLock(p) => self.try_lock(cx, p),
            Op::Claim(p) => self.claim(cx, p),
            Op::Release(p) => self.release(cx, p),
            Op::Unlock(p) => self.unlock(cx, p),
            Op::Check { tick } => self.check(cx, tick),
            Op::RecordLosses(lost) => self.record_losses(cx, lost),
            Op::Mint(starts) => self.mint(cx, starts),
            Op::RecordCrash {
                task,
                epoch,
                partition,
            } => self.record_crash(cx, task, epoch, partition),
        }
    }

    fn ping(&mut self, cx: &mut Ctx<'_>) {
        let now_l = self.local(cx.now);
        let Some(inc) = self.inc.as_mut() else {
            return;
        };
        match cx.model.locks.ping(inc.session, cx.now) {
            Ok(()) => inc.last_ping = now_l,
            Err(_) => self.self_fence(cx),
        }
    }

    fn try_lock(&mut self, cx: &mut Ctx<'_>, p: i32) {
        let Some(inc) = self.inc.as_mut() else {
            return;
        };
        // A key this session holds is never locked twice (one unlock would leave it).
        if inc.locked.contains(&p) {
            inc.ops.push_front(super::ops::Op::Claim(p));
            return;
        }
        match cx
            .model
            .locks
            .try_lock(inc.session, (PARTITION_NAMESPACE, p), cx.now)
        {
            Ok(true) => {
                inc.locked.insert(p);
                inc.ops.push_front(Op::Claim(p));
            }
            Ok(false) => {}
            Err(_) => self.self_fence(cx),
        }
    }

    fn claim(&mut self, cx: &mut Ctx<'_>, p: i32) {
        let Some(inc) = self.inc.as_mut() else {
            return;
        };
        let id = inc.id;
        match cx.model.claim(id, p) {
            Ok(generation) => {
                inc.owned.insert(p, generation);
                inc.full_due = true;
                cx.stats.claims += 1;
                cx.trace.note(cx.now, |t| {
                    format!("{} claims p{p} at g{generation}", t.node(id))
                });
            }
            Err(why) => {
                cx.stats.refused(&why);
                cx.trace.note(cx.now, |t| {
                    format!("{} claim of p{p} refused: {why}", t.node(id))
                });
            }
        }
    }

    fn release(&mut self, cx: &mut Ctx<'_>, p: i32) {
        let Some(inc) = self.inc.as_mut() else {
            return;
        };
        let id = inc.id;
        if inc.pods.values().any(|pod| pod.partition == p) {
            // A pod came back to it meanwhile (it is kept after all): not empty.
            return;
        }
        inc.leaving.remove(&p);
        if let Some(generation) = inc.owned.remove(&p) {
            let answer = cx.model.release(id, p, generation);
            if answer.is_ok() {
                cx.stats.handbacks += 1;
            }
            cx.trace.note(cx.now, |t| {
                format!(
                    "{} hands back p{p} at g{generation}: {answer:?}",
                    t.node(id)
                )
            });
        }
        if inc.locked.contains(&p) {
            inc.ops.push_front(Op::Unlock(p));
        }
    }

    fn unlock(&mut self, cx: &mut Ctx<'_>, p: i32) {
        let Some(inc) = self.inc.as_mut() else {
            return;
        };
        if !inc.locked.remove(&p) {
            return;
        }
        match cx
            .model
            .locks
            .unlock(inc.session, (PARTITION_NAMESPACE, p), cx.now)
        {
            Ok(true) => {}
            // Not held, or no session: every lock is assumed lost.
            Ok(false) | Err(_) => self.self_fence(cx),
        }
    }

    fn record_losses(&mut self, cx: &mut Ctx<'_>, lost: Vec<LostPod>) {
        let now_l = self.local(cx.now);
        let Some(inc) = self.inc.as_mut() else {
            return;
        };
        let id = inc.id;
        for l in lost {
            let kind = match l.loss {
                Loss::NodeLost => CrashKind::NodeLost,
                Loss::Interrupted => CrashKind::Interrupted,
            };
            let jitter = rand::Rng::random::<f64>(cx.rng);
            let answer = cx
                .model
                .record_crash(id, l.generation, l.task_id, l.epoch, kind, jitter);
            cx.trace.note(cx.now, |t| {
                format!(
                    "{} records {} of {} e{} (g{}): {answer:?}",
                    t.node(id),
                    kind.as_str(),
                    t.task(l.task_id),
                    l.epoch,
                    l.generation
                )
            });
            match answer {
                Ok(a) => {
                    cx.stats.recorded(kind);
                    if let CrashAnswer::Restart { not_before } = a {
                        let wait = not_before.saturating_sub(cx.now);
                        inc.backoffs.insert(l.task_id, now_l + wait);
                    }
                }
                Err(why) => cx.stats.refused(&why),
            }
        }
    }

    fn mint(&mut self, cx: &mut Ctx<'_>, starts: Vec<Start>) {
        let Some(inc) = self.inc.as_mut() else {
            return;
        };
        let id = inc.id;
        let mut refused = false;
        let claims: BTreeSet<(i32, i64)> = starts
            .iter()
            .map(|s| (s.task.partition, s.generation))
            .collect();
        // One statement for the batch: every item is decided at once.
        for s in starts {
            let task = s.task.task_id;
            match cx.model.mint(id, task, s.task.pod_epoch, s.generation) {
                Ok(state) => {
                    cx.stats.mints += 1;
                    cx.trace.note(cx.now, |t| {
                        format!(
                            "{} mints {} e{} (g{})",
                            t.node(id),
                            t.task(task),
                            state.pod_epoch,
                            s.generation
                        )
                    });
                    inc.pods.insert(
                        task,
                        SimPod::new(task, s.task.partition, &s.task.kind, &state),
                    );
                }
                Err(why) => {
                    refused = true;
                    cx.stats.refused(&why);
                    cx.trace.note(cx.now, |t| {
                        format!(
                            "{} mint of {} after e{} (g{}) refused: {why}",
                            t.node(id),
                            t.task(task),
                            s.task.pod_epoch,
                            s.generation
                        )
                    });
                }
            }
        }
        if refused {
            // Drop the partitions of the batch whose claim another replaced (only a
            // lost session lets another node lock them: the next ping will say so).
            let gone: Vec<i32> = claims
                .iter()
                .filter(|(p, g)| {
                    cx.model
                        .partition(*p)
                        .is_none_or(|r| r.owner != Some(id) || r.generation != *g)
                })
                .map(|(p, _)| *p)
                .collect();
            for p in gone {
                inc.owned.remove(&p);
                inc.leaving.remove(&p);
                cx.trace
                    .note(cx.now, |t| format!("{} lost its claim on p{p}", t.node(id)));
            }
        }
    }

    fn record_crash(&mut self, cx: &mut Ctx<'_>, task: TaskId, epoch: i64, partition: i32) {
        let Some(inc) = self.inc.as_mut() else {
            return;
        };
        let id = inc.id;
        if inc.pods.get(&task).is_some_and(|p| p.epoch == epoch) {
            inc.pods.remove(&task);
        }
        let Some(&generation) = inc.owned.get(&partition) else {
            return;
        };
        let jitter = rand::Rng::random::<f64>(cx.rng);
        let answer = cx
            .model
            .record_crash(id, generation, task, epoch, CrashKind::Handler, jitter);
        cx.trace.note(cx.now, |t| {
            format!(
                "{} records handler crash of {} e{epoch} (g{generation}): {answer:?}",
                t.node(id),
                t.task(task)
            )
        });
        match answer {
            Ok(CrashAnswer::Restart { not_before }) => {
                cx.stats.recorded(CrashKind::Handler);
                let wait = not_before.saturating_sub(cx.now);
                let due = self.local(cx.now) + wait;
                if let Some(inc) = self.inc.as_mut() {
                    inc.backoffs.insert(task, due);
                }
            }
            Ok(_) => cx.stats.recorded(CrashKind::Handler),
            Err(why) => cx.stats.refused(&why),
        }
    }
}
