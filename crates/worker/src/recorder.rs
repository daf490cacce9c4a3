//! Crash recording, in a task of its own: handler crashes of this node's pods and the
//! pods lost nodes left behind.
//!
//! Recording a crash is a transaction of several statements; thousands at once (a
//! peer died) used to hold the control loop for seconds. Here they queue, are written
//! a chunk per transaction (`Store::record_crashes`, each item keeping its own outcome
//! under its own row lock, the chunk announced by the store in one publish), and their
//! outcomes come back to the control loop as messages. A store outage is retried a few times, then the outcome
//! is an error and the next check plans the pod again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use taskpod_core::Error;
use taskpod_core::domain::restart::{CrashKind, RestartPolicy};
use taskpod_core::domain::{EventMetadata, NodeId, TaskId};
use taskpod_core::store::Store;
use taskpod_core::store::crash_batch::CrashItem;
use taskpod_core::store::crashes::{CrashOutcome, CrashReport};
use taskpod_core::telemetry::context::{continue_trace, traceparent_in};
use taskpod_core::telemetry::metrics::metrics;
use tokio::sync::{Mutex, mpsc};

/// Crashes written in one transaction.
const CHUNK: usize = 128;
/// Tries of a chunk the store did not answer.
const TRIES: u32 = 4;

/// One pod end to record.
#[derive(Clone, Debug)]
pub(crate) struct Job {
    pub task: TaskId,
    pub epoch: i64,
    /// The partition's claim the record relies on, and the incarnation that holds it.
    pub generation: i64,
    pub recorder: NodeId,
    /// The node the pod ran on.
    pub owner: Option<NodeId>,
    pub reason: String,
    pub kind: CrashKind,
    pub trace: Option<String>,
}

/// A job's outcome, for the control loop.
#[derive(Debug)]
pub(crate) struct Recorded {
    pub task: TaskId,
    pub epoch: i64,
    /// The pod ran on another node (or an earlier incarnation of this one): a pod
    /// started after it waits the fence margin before running side effects.
    pub foreign: bool,
    pub outcome: Result<CrashOutcome, Error>,
}

/// Where the control loop sends jobs; cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Recorder {
    jobs: mpsc::UnboundedSender<Job>,
}

impl Recorder {
    /// Queues a job. False when the recorder's channel is gone (the worker is
    /// stopping).
    pub fn record(&self, job: Job) -> bool {
        self.jobs.send(job).is_ok()
    }
}

/// What the recorder writes with.
#[derive(Clone, Debug)]
pub(crate) struct RecorderIo {
    pub store: Store,
    pub policy: RestartPolicy,
    /// This node's name, for the crash counter.
    pub name: String,
}

/// The recorder's end of the channels. It outlives any one recorder task: when a task
/// dies, the next one made from the same `Inbox` goes on with the jobs still queued
/// (the dead one's chunk in flight is lost: its owner forgets those jobs and the next
/// check plans them again).
#[derive(Clone, Debug)]
pub(crate) struct Inbox {
    jobs: Arc<Mutex<mpsc::UnboundedReceiver<Job>>>,
    done: mpsc::UnboundedSender<Recorded>,
}

/// The channels: the control loop's [`Recorder`] and outcome receiver, and the
/// [`Inbox`] recorder tasks run on.
pub(crate) fn channel() -> (Recorder, mpsc::UnboundedReceiver<Recorded>, Inbox) {
    let (jobs, rx) = mpsc::unbounded_channel();
    let (done, outcomes) = mpsc::unbounded_channel();
    (
        Recorder { jobs },
        outcomes,
        Inbox {
            jobs: Arc::new(Mutex::new(rx)),
            done,
        },
    )
}

/// A recorder task: records what comes in until the channel closes. Each job gets
/// exactly one outcome unless the task dies.
pub(crate) async fn run(io: RecorderIo, inbox: Inbox) {
    let mut jobs = inbox.jobs.lock().await;
    while let Some(first) = jobs.recv().await {
        let mut chunk = vec![first];
        while chunk.len() < CHUNK {
            match jobs.try_recv() {
                Ok(job) => chunk.push(job),
                Err(_) => break,
            }
        }
        // One recorder per chunk: the store fences the whole chunk by it.
        let mut by_recorder: HashMap<NodeId, Vec<Job>> = HashMap::new();
        for job in chunk {
            by_recorder.entry(job.recorder).or_default().push(job);
        }
        for (recorder, jobs) in by_recorder {
            for recorded in record_chunk(&io, recorder, jobs).await {
                if inbox.done.send(recorded).is_err() {
                    return;
                }
            }
        }
    }
}

async fn record_chunk(io: &RecorderIo, recorder: NodeId, jobs: Vec<Job>) -> Vec<Recorded> {
    let spans: Vec<tracing::Span> = jobs.iter().map(span).collect();
    let items: Vec<CrashItem> = jobs
        .iter()
        .zip(&spans)
        .map(|(job, span)| CrashItem {
            report: CrashReport {
                task_id: job.task,
                epoch: job.epoch,
                node: job.owner,
                reason: job.reason.clone(),
                kind: job.kind,
            },
            generation: job.generation,
            jitter: rand::random::<f64>(),
            metadata: EventMetadata {
                actor_id: format!("worker:{recorder}"),
                correlation_id: format!("worker:{recorder}"),
                traceparent: traceparent_in(span, job.trace.as_deref()),
                ..EventMetadata::default()
            },
        })
        .collect();
    let mut backoff = Duration::from_millis(100);
    let mut answers = io.store.record_crashes(&items, recorder, &io.policy).await;
    for _ in 1..TRIES {
        let unavailable = answers
            .iter()
            .all(|a| matches!(a, Err(Error::StoreUnavailable(_))));
        if !unavailable {
            break;
        }
        tokio::time::sleep(backoff).await;
        backoff *= 2;
        answers = io.store.record_crashes(&items, recorder, &io.policy).await;
    }
    let mut out = Vec::with_capacity(jobs.len());
    for (job, outcome) in jobs.into_iter().zip(answers) {
        match &outcome {
            Ok(CrashOutcome::AlreadyRecorded) => {}
            Ok(o) => {
                metrics().pod_crashed(&io.name, job.kind.as_str());
                tracing::info!(task.id = %job.task, epoch = job.epoch, kind = job.kind.as_str(), outcome = ?o, "pod end recorded");
            }
            Err(e) => {
                tracing::debug!(task.id = %job.task, epoch = job.epoch, error = %e, "pod end not recorded");
            }
        }
        out.push(Recorded {
            task: job.task,
            epoch: job.epoch,
            foreign: job.owner != Some(job.recorder),
            outcome,
        });
    }
    drop(spans);
    out
}

/// The span of one record, in the trace of the pod (or of the change that started it).
fn span(job: &Job) -> tracing::Span {
    let span = if job.kind == CrashKind::Handler {
        tracing::info_span!(
            "taskpod.pod.crash",
            task_id = %job.task,
            taskpod.epoch = job.epoch,
            taskpod.reason = %job.reason,
            otel.status_code = "ERROR",
        )
    } else {
        tracing::info_span!(
            "taskpod.pod.node_lost",
            task_id = %job.task,
            taskpod.epoch = job.epoch,
        )
    };
    continue_trace(&span, job.trace.as_deref());
    span
}
