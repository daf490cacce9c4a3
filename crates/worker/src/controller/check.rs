//! The check: read the tasks a scope names, ask the planner, carry out its plan (stop,
//! record, back off, mint and spawn), and settle what pods and the recorder report.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;

use futures::FutureExt as _;
use taskpod_core::domain::restart::CrashKind;
use taskpod_core::domain::{NodeId, TaskId};
use taskpod_core::store::crashes::CrashOutcome;
use taskpod_core::store::nodes::PodCandidate;
use taskpod_core::store::{MintRequest, MintedPod};
use taskpod_core::telemetry::context::{continue_trace, traceparent_in};
use taskpod_core::telemetry::metrics::metrics;
use tokio::time::Instant;
use tracing::Instrument as _;

use super::{Controller, WorkerError};
use crate::checks::Scope;
use crate::ownership::claims_of;
use crate::planner::{self, Loss, NodeView, Start, TaskView};
use crate::pod::{self, PodExit, PodIo, PodSpec};
use crate::pod_table::Ended;
use crate::recorder::{Job, Recorded};

/// The most tasks one mint statement takes.
const MINT_BATCH: usize = 512;

impl Controller {
    /// Reads the tasks `scope` names and acts on them (see [`crate::planner::pods`]).
    pub(super) async fn check(&mut self, scope: Scope) -> Result<(), WorkerError> {
        let Some(inc) = &self.incarnation else {
            return Ok(());
        };
        let node = inc.node();
        let partitions: Vec<i32> = inc.owned().keys().copied().collect();
        let full = scope == Scope::All;
        let candidates = match scope {
            Scope::All => {
                let running = self.pods.running_ids();
                if partitions.is_empty() && running.is_empty() {
                    metrics().pods_unplaceable(&self.settings.name, 0);
                    return Ok(());
                }
                self.store
                    .pod_candidates(node, &partitions, &running)
                    .await?
            }
            Scope::Tasks(ids) => self.store.pod_candidates_of(node, &ids).await?,
            Scope::Changed { from, to, also } => {
                let mut rows = self
                    .store
                    .changed_candidates(node, &partitions, from, to)
                    .await?;
                let seen: std::collections::HashSet<TaskId> =
                    rows.iter().map(|c| c.task_id).collect();
                let also: Vec<TaskId> = also.into_iter().filter(|t| !seen.contains(t)).collect();
                rows.extend(self.store.pod_candidates_of(node, &also).await?);
                rows
            }
        };
        // The incarnation may have ended while the store answered.
        let Some(inc) = &self.incarnation else {
            return Ok(());
        };
        let traces: HashMap<TaskId, Option<String>> = candidates
            .iter()
            .map(|c| (c.task_id, c.traceparent.clone()))
            .collect();
        let evicting = inc.evicting(Instant::now());
        let view = NodeView {
            node,
            owned: inc.owned(),
            leaving: inc.leaving(),
            evicting: &evicting,
            pods: self.pods.slots(),
            kinds: &self.kinds,
            programs: &self.programs,
            room: (self.settings.capacity as usize).saturating_sub(self.pods.running()),
            lost_together: &self.lost_together,
            server_started_at: self.server_started_at,
        };
        let plan = planner::plan(&view, candidates.into_iter().map(task_view).collect());
        if full {
            metrics().pods_unplaceable(&self.settings.name, plan.unplaceable as i64);
        }
        for task in &plan.stop {
            self.pods.stop(*task);
        }
        for lost in plan.lost {
            let kind = match lost.loss {
                Loss::NodeLost => CrashKind::NodeLost,
                Loss::Interrupted => CrashKind::Interrupted,
            };
            let owner = lost.owner.map(|n| n.to_string()).unwrap_or_default();
            let reason = match lost.loss {
                Loss::NodeLost => format!("node {owner} lost"),
                Loss::Interrupted => format!("pod of node {owner} interrupted"),
            };
            self.pods.recording(lost.task_id, lost.epoch);
            self.recorder.record(Job {
                task: lost.task_id,
                epoch: lost.epoch,
                generation: lost.generation,
                recorder: node,
                owner: lost.owner,
                reason,
                kind,
                trace: traces.get(&lost.task_id).cloned().flatten(),
            });
        }
        for (task, wait) in plan.backoff {
            self.checks.backoff(task, wait);
        }
        self.checks.starved(plan.starved);
        self.start_pods(node, plan.start, &traces).await
    }

    /// Mints pods for `wanted`, in batches, in the planner's order; each minted task
    /// gets its pod.
    async fn start_pods(
        &mut self,
        node: NodeId,
        wanted: Vec<Start>,
        traces: &HashMap<TaskId, Option<String>>,
    ) -> Result<(), WorkerError> {
        for chunk in wanted.chunks(MINT_BATCH) {
            // Each claim continues the trace of the change that asked for the pod; the
            // statement runs in the first one's.
            let mut spans = HashMap::with_capacity(chunk.len());
            let requests: Vec<MintRequest> = chunk
                .iter()
                .map(|s| {
                    let span = tracing::info_span!(
                        "taskpod.pod.claim",
                        task_id = %s.task.task_id,
                        taskpod.kind = %s.task.kind,
                        taskpod.partition = s.task.partition,
                        taskpod.epoch = tracing::field::Empty,
                        taskpod.batch = chunk.len(),
                    );
                    let asked = traces.get(&s.task.task_id).cloned().flatten();
                    continue_trace(&span, asked.as_deref());
                    spans.insert(s.task.task_id, (span, asked));
                    MintRequest {
                        task_id: s.task.task_id,
                        observed_epoch: s.task.pod_epoch,
                        generation: s.generation,
                    }
                })
                .collect();
            let Some((first, _)) = requests.first().and_then(|r| spans.get(&r.task_id)) else {
                continue;
            };
            let minted = self
                .store
                .mint_pods(node, &requests)
                .instrument(first.clone())
                .await?;
            if minted.len() < requests.len()
                && let Some(inc) = &mut self.incarnation
            {
                let claims = claims_of(inc.owned(), chunk.iter().map(|s| s.task.partition));
                inc.drop_replaced(&self.store, &claims).await?;
            }
            for m in minted {
                let Some((span, asked)) = spans.remove(&m.task.task_id) else {
                    continue;
                };
                span.record("taskpod.epoch", m.epoch);
                let handed = asked.or_else(|| m.traceparent.clone());
                let trace = traceparent_in(&span, handed.as_deref());
                self.spawn_pod(m, trace);
            }
        }
        Ok(())
    }

    fn spawn_pod(&mut self, minted: MintedPod, trace: Option<String>) {
        let Some(inc) = &self.incarnation else {
            return;
        };
        let (task_id, epoch, partition) =
            (minted.task.task_id, minted.epoch, minted.task.partition);
        let kind = minted.task.kind.clone();
        let (Some(handler), Some(slots)) = (
            self.handlers.get(&kind).cloned(),
            self.slots.get(&kind).cloned(),
        ) else {
            return;
        };
        let adopted = self.adopted.remove(&task_id);
        if self.restarting.remove(&task_id) {
            metrics().pod_restarted(&self.settings.name);
        }
        let spec = PodSpec {
            task: minted.task,
            state: minted.state,
            epoch,
            checkpoint: minted.checkpoint,
            trace: trace.clone(),
            adopted: adopted
                .then_some(self.peer_lost_at)
                .flatten()
                .map(|at| (at, self.settings.name.clone())),
        };
        let stop = inc.fence().child_token();
        let io = PodIo {
            store: self.store.clone(),
            appender: self.appender.clone(),
            liveness: inc.liveness().clone(),
        };
        let node = inc.node();
        let span = pod::span(&spec, node);
        let run = {
            let stop = stop.clone();
            async move {
                let exit = AssertUnwindSafe(pod::run(io, spec, handler, slots, node, stop))
                    .catch_unwind()
                    .instrument(span.clone())
                    .await
                    .unwrap_or_else(|panic| {
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| (*s).to_owned())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        PodExit::Crashed(format!("handler panicked: {what}"))
                    });
                span.record("taskpod.exit", exit.name());
                exit
            }
        };
        self.pods.spawn(task_id, epoch, partition, stop, trace, run);
    }

    /// A pod ended: a crash goes to the recorder; anything else is done.
    pub(super) fn reap(&mut self, ended: Ended) {
        self.checks.pod_ended();
        tracing::debug!(task.id = %ended.task, epoch = ended.epoch, exit = ?ended.exit, "pod ended");
        if let PodExit::Crashed(reason) = ended.exit {
            self.record_end(
                ended.task,
                ended.epoch,
                ended.partition,
                ended.trace,
                CrashKind::Handler,
                reason,
            );
        }
    }

    /// Sends the end of this node's own pod to the recorder, under the current claim
    /// of its partition; without one, the partition's next owner records it.
    pub(super) fn record_end(
        &mut self,
        task: TaskId,
        epoch: i64,
        partition: i32,
        trace: Option<String>,
        kind: CrashKind,
        reason: String,
    ) {
        let claim = self
            .incarnation
            .as_ref()
            .and_then(|inc| Some((inc.node(), *inc.owned().get(&partition)?)));
        let Some((node, generation)) = claim else {
            self.pods.settled(task, epoch);
            return;
        };
        self.pods.recording(task, epoch);
        let queued = self.recorder.record(Job {
            task,
            epoch,
            generation,
            recorder: node,
            owner: Some(node),
            reason,
            kind,
            trace,
        });
        if !queued {
            self.pods.settled(task, epoch);
        }
    }

    /// A record's outcome: the pod leaves the view; a restart waits its backoff.
    pub(super) fn settle(&mut self, recorded: Recorded) {
        self.pods.settled(recorded.task, recorded.epoch);
        match recorded.outcome {
            Ok(CrashOutcome::Restart { after, .. }) => {
                self.restarting.insert(recorded.task);
                if recorded.foreign {
                    self.adopted.insert(recorded.task);
                }
                self.checks.backoff(recorded.task, after);
            }
            Ok(CrashOutcome::AlreadyRecorded) => {
                if recorded.foreign {
                    self.adopted.insert(recorded.task);
                }
                self.checks.wake(recorded.task);
            }
            Ok(CrashOutcome::Ended | CrashOutcome::Failed { .. }) => {}
            // Not recorded: the next check plans the pod again.
            Err(_) => self.checks.wake(recorded.task),
        }
    }
}

fn task_view(c: PodCandidate) -> TaskView {
    TaskView {
        task_id: c.task_id,
        partition: c.partition,
        kind: c.kind,
        program: c.program,
        priority: c.priority,
        created_at: c.created_at,
        status: c.status,
        pod_epoch: c.pod_epoch,
        pod_state: c.pod_state,
        owner_node: c.owner_node,
        backoff: c.backoff,
    }
}
