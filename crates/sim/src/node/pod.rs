//! One pod's life: `pod_started` under its epoch, then the handler's steps, each a
//! fenced append at the version it last saw, and `pod_stopped` when told to stop or
//! when its task completes. A refused append means: catch up and decide again on a
//! version conflict, stop cleanly when the task left `active`, and stop without a
//! word when the epoch is stale or retired (fenced).
//!
//! Before every step the pod reads its node's liveness (the worker's `Liveness`): a
//! confirmation older than the detection bound stops it at once, without a write, so a
//! node that lost its session, or a frozen one that wakes up, runs no more handler
//! steps. A pod frozen in the middle of an append sends it first, though.
//!
//! Kinds: `manual` idles; `sleep` walks the phases and completes; `flaky` does the same
//! but crashes (the handler's `Retry`) now and then.

use rand::Rng as _;
use taskpod_core::domain::{Event, NodeId, Phase, Status, TaskId, TaskState};

use super::{Ctx, Effect, SimNode};
use crate::model::Refusal;

/// How a pod ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Stopped cleanly: asked to, or its task completed.
    Stopped,
    /// The handler crashed: its node records it.
    Crashed,
    /// Its epoch is stale or its node's session lost: it stopped without a write.
    Fenced,
}

/// A pod in its node's table.
#[derive(Clone, Debug)]
pub struct SimPod {
    pub task: TaskId,
    pub epoch: i64,
    pub partition: i32,
    pub kind: String,
    /// The head as the pod last saw it.
    pub version: i64,
    pub phase: Phase,
    pub started: bool,
    /// Asked to stop: the next step appends `pod_stopped`.
    pub stop: bool,
    pub exit: Option<Exit>,
    /// Ended, its crash being recorded.
    pub ending: bool,
    /// Frozen in the middle of an append: sends it before it reads its liveness.
    pub inflight: bool,
}

impl SimPod {
    pub fn new(task: TaskId, partition: i32, kind: &str, minted: &TaskState) -> Self {
        Self {
            task,
            epoch: minted.pod_epoch,
            partition,
            kind: kind.to_owned(),
            version: minted.version,
            phase: minted.phase,
            started: false,
            stop: false,
            exit: None,
            ending: false,
            inflight: false,
        }
    }

    /// Whether it still runs (not ended, not being reaped).
    pub fn running(&self) -> bool {
        self.exit.is_none() && !self.ending
    }
}

/// What the handler does next.
fn next_event(pod: &SimPod, rework: bool) -> Event {
    match pod.phase {
        Phase::SpecClarification => Event::PhaseChanged {
            from: pod.phase,
            to: Phase::Planning,
        },
        Phase::Planning => Event::PhaseChanged {
            from: pod.phase,
            to: Phase::Development,
        },
        Phase::Development => Event::PhaseChanged {
            from: pod.phase,
            to: Phase::Review,
        },
        Phase::Review if rework => Event::PhaseChanged {
            from: pod.phase,
            to: Phase::Development,
        },
        _ => Event::TaskCompleted {
            from_phase: pod.phase,
        },
    }
}

impl SimNode {
    /// One step of the pod of `task`.
    pub fn step_pod(&mut self, cx: &mut Ctx<'_>, task: TaskId) {
        let fresh = self.fresh(cx.now, cx.timers.detection_bound);
        let index = self.index;
        let Some(inc) = self.inc.as_mut() else {
            return;
        };
        let (node, session) = (inc.id, inc.session);
        let Some(pod) = inc.pods.get_mut(&task) else {
            return;
        };
        if !pod.running() {
            return;
        }
        let inflight = std::mem::take(&mut pod.inflight);
        if !fresh && !inflight {
            pod.exit = Some(Exit::Fenced);
            cx.trace.note(cx.now, |t| {
                format!(
                    "{} pod {} e{} stops: liveness lost",
                    t.node(node),
                    t.task(task),
                    pod.epoch
                )
            });
            return;
        }
        if pod.stop {
            let event = Event::PodStopped {
                epoch: pod.epoch,
                reason: "stopped".into(),
            };
            match append(cx, node, pod, event) {
                Err(Refusal::VersionConflict) => {
                    catch_up(cx, pod);
                    retry_in_flight(pod, inflight, fresh);
                }
                _ => pod.exit = Some(Exit::Stopped),
            }
            return;
        }
        if !pod.started {
            let event = Event::PodStarted {
                epoch: pod.epoch,
                node,
                started_at: chrono::DateTime::UNIX_EPOCH,
            };
            match append(cx, node, pod, event) {
                Ok(_) => pod.started = true,
                Err(Refusal::VersionConflict) => {
                    catch_up(cx, pod);
                    retry_in_flight(pod, inflight, fresh);
                }
                Err(why) => refused(cx, pod, &why),
            }
            fenced_after(pod, fresh);
            return;
        }
        if pod.kind == "manual" {
            fenced_after(pod, fresh);
            return;
        }
        if fresh {
            // The side effect happens now; an append in flight had its effect before
            // the freeze.
            cx.effects.push(Effect {
                at: cx.now,
                task,
                epoch: pod.epoch,
                node: index,
                session,
            });
        }
        if fresh && pod.kind == "flaky" && cx.rng.random_bool(cx.crash_chance) {
            pod.exit = Some(Exit::Crashed);
            cx.trace.note(cx.now, |t| {
                format!(
                    "{} pod {} e{} crashes",
                    t.node(node),
                    t.task(task),
                    pod.epoch
                )
            });
            return;
        }
        let rework = cx.rng.random_bool(0.2);
        let event = next_event(pod, rework);
        let completes = matches!(event, Event::TaskCompleted { .. });
        match append(cx, node, pod, event) {
            Ok(_) if completes => pod.stop = true,
            Ok(_) => {}
            Err(Refusal::VersionConflict) => {
                catch_up(cx, pod);
                retry_in_flight(pod, inflight, fresh);
            }
            Err(why) => refused(cx, pod, &why),
        }
        fenced_after(pod, fresh);
    }
}

/// A conflict inside an append in flight: the pod's append loop catches up and sends
/// again at once, without reading its liveness in between (as the worker's does).
fn retry_in_flight(pod: &mut SimPod, inflight: bool, fresh: bool) {
    if inflight && !fresh && pod.exit.is_none() {
        pod.inflight = true;
    }
}

/// An append that was in flight when the node froze went out; now the pod reads its
/// liveness, finds it stale, and stops without another write.
fn fenced_after(pod: &mut SimPod, fresh: bool) {
    if !fresh && !pod.inflight && pod.exit.is_none() {
        pod.exit = Some(Exit::Fenced);
    }
}

/// Appends one event under the pod's epoch at the version it saw.
fn append(
    cx: &mut Ctx<'_>,
    node: NodeId,
    pod: &mut SimPod,
    event: Event,
) -> Result<TaskState, Refusal> {
    let name = event.type_name();
    let answer = cx.model.append_pod(
        pod.task,
        pod.version,
        pod.epoch,
        std::slice::from_ref(&event),
    );
    cx.trace.note(cx.now, |t| {
        let what = match &answer {
            Ok(s) => format!("v{}", s.version),
            Err(why) => format!("refused: {why}"),
        };
        format!(
            "{} pod {} e{} appends {name} at v{}: {what}",
            t.node(node),
            t.task(pod.task),
            pod.epoch,
            pod.version
        )
    });
    match &answer {
        Ok(state) => {
            pod.version = state.version;
            pod.phase = state.phase;
            cx.stats.pod_appends += 1;
        }
        Err(why) => cx.stats.refused(why),
    }
    answer
}

fn refused(cx: &mut Ctx<'_>, pod: &mut SimPod, why: &Refusal) {
    match why {
        Refusal::VersionConflict => catch_up(cx, pod),
        Refusal::NotRunning => pod.stop = true,
        _ => pod.exit = Some(Exit::Fenced),
    }
}

/// Reads the head again and decides from it, as the worker's pod does: a moved epoch
/// fences it, a task no longer active stops it, otherwise it goes on at the new
/// version. It does not look at the pod state: that its loss was recorded is the
/// store's to say (the epoch is retired), not the pod's to notice.
fn catch_up(cx: &mut Ctx<'_>, pod: &mut SimPod) {
    let Some(row) = cx.model.task(pod.task) else {
        pod.exit = Some(Exit::Fenced);
        return;
    };
    let s = &row.state;
    if s.pod_epoch != pod.epoch {
        pod.exit = Some(Exit::Fenced);
        return;
    }
    pod.version = s.version;
    pod.phase = s.phase;
    if s.status != Status::Active {
        pod.stop = true;
    }
}
