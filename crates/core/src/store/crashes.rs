//! Crash records and the restart decision, in one transaction fenced by the partition
//! generation of the worker that records them.
//!
//! The crash row (unique per task and epoch, so a failure is never counted twice) and
//! the `pod_crashed` event commit together; whether the task restarts is decided under
//! the head row lock from the crashes within the window by Postgres's clock, so two
//! workers can never disagree about a budget.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::instrument;

use super::Store;
use super::committed;
use super::errors::from_sqlx;
use super::traced::Traced as _;
use super::writes::{lock_state, record_commit, write_changes};
use crate::domain::restart::{CrashKind, RestartDecision, RestartPolicy};
use crate::domain::{Event, EventMetadata, NodeId, Status, TaskId, TaskState, evolve};
use crate::error::Error;

/// One pod failure, as its partition's owner records it.
#[derive(Clone, Debug)]
pub struct CrashReport {
    pub task_id: TaskId,
    pub epoch: i64,
    /// The node the pod ran on (for `node_lost`, the dead node).
    pub node: Option<NodeId>,
    pub reason: String,
    pub kind: CrashKind,
}

/// What became of the task.
#[derive(Clone, Debug, PartialEq)]
pub enum CrashOutcome {
    /// A new pod may start from `not_before` (Postgres's clock), that is `after` from
    /// the commit: what a worker waits, by its own monotonic clock, so no skew between
    /// its clock and Postgres's delays or drops the restart.
    Restart {
        not_before: DateTime<Utc>,
        after: Duration,
    },
    /// The budget is spent: the task is `failed`.
    Failed { error: String },
    /// The task was no longer active (stopped, cancelled, completed): nothing to restart.
    Ended,
    /// This crash was already recorded (by this or an earlier owner).
    AlreadyRecorded,
}

impl Store {
    /// Records a crash and decides on the restart, fenced by `(owner, generation)`.
    ///
    /// # Errors
    /// [`Error::StaleGeneration`] when the caller no longer owns the task's partition;
    /// [`Error::StaleEpoch`] when the epoch is not the task's current pod;
    /// [`Error::StoreUnavailable`].
    #[instrument(skip_all, fields(task.id = %report.task_id, epoch = report.epoch, kind = report.kind.as_str()))]
    pub async fn record_crash(
        &self,
        report: &CrashReport,
        owner: NodeId,
        generation: i64,
        policy: &RestartPolicy,
        jitter: f64,
        metadata: &EventMetadata,
    ) -> Result<CrashOutcome, Error> {
        let started = std::time::Instant::now();
        let mut tx = self.pool.begin().traced("BEGIN").await.map_err(from_sqlx)?;
        let before = lock_state(&mut tx, report.task_id).await?;
        self.check_partition_owner(&mut tx, report.task_id, owner, generation)
            .await?;
        if before.pod_epoch != report.epoch || !before.has_pod() {
            return Err(Error::StaleEpoch {
                held: report.epoch,
                current: before.pod_epoch,
            });
        }
        let inserted = sqlx::query(
            "INSERT INTO pod_crashes (task_id, epoch, node, reason, kind) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT DO NOTHING",
        )
        .bind(report.task_id.as_uuid())
        .bind(report.epoch)
        .bind(report.node.map(|n| n.0))
        .bind(&report.reason)
        .bind(report.kind.as_str())
        .execute(&mut *tx).traced("INSERT pod_crashes")
        .await
        .map_err(from_sqlx)?
        .rows_affected();
        if inserted == 0 {
            return Ok(CrashOutcome::AlreadyRecorded);
        }

        let policy = &task_policy(&mut tx, report.task_id, policy).await?;
        let counts = if before.status == Status::Active && report.kind != CrashKind::Interrupted {
            sqlx::query_as(
                "SELECT count(*) FILTER (WHERE kind = 'handler'), count(*) FILTER (WHERE kind = 'node_lost') \
                 FROM pod_crashes WHERE task_id = $1 AND at > now() - make_interval(secs => $2)",
            )
            .bind(report.task_id.as_uuid())
            .bind(policy.window.as_secs_f64())
            .fetch_one(&mut *tx).traced("SELECT pod_crashes")
            .await
            .map_err(from_sqlx)?
        } else {
            (0, 0)
        };
        let (events, mut outcome, delay) = decide_crash(&before, report, policy, counts, jitter);
        let after: TaskState = events
            .iter()
            .try_fold(before.clone(), |s, e| evolve(&s, e))?;
        let metadata = EventMetadata {
            epoch: Some(report.epoch),
            ..metadata.clone()
        };
        let listed = write_changes(&mut tx, &before, &after, &events, &metadata).await?;
        if let Some(delay) = delay {
            let not_before: DateTime<Utc> = sqlx::query_scalar(
                "UPDATE task_heads SET not_before = now() + make_interval(secs => $2) WHERE task_id = $1 \
                 RETURNING not_before",
            )
            .bind(report.task_id.as_uuid())
            .bind(delay.as_secs_f64())
            .fetch_one(&mut *tx).traced("UPDATE task_heads")
            .await
            .map_err(from_sqlx)?;
            outcome = CrashOutcome::Restart {
                not_before,
                after: delay,
            };
        }
        tx.commit().traced("COMMIT").await.map_err(from_sqlx)?;
        record_commit("worker", started, &before, &after);
        if let Some(last) = events.last() {
            self.announce(&committed::join(
                [(&after, last.type_name(), metadata.traceparent.as_deref())],
                &listed,
            ));
        }
        Ok(outcome)
    }

    /// Deletes crash rows older than `retention` (longer than any restart window), in
    /// small batches (see [`super::prune`]).
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    pub async fn prune_crashes(&self, retention: Duration) -> Result<u64, Error> {
        super::prune::in_batches(
            &self.pool,
            "DELETE FROM pod_crashes WHERE ctid = ANY(ARRAY( \
                 SELECT ctid FROM pod_crashes \
                  WHERE at < now() - make_interval(secs => $1) LIMIT $2))",
            retention,
            "DELETE pod_crashes",
        )
        .await
    }
}

/// The worker's policy, with the task's own limits where its metadata sets them:
/// `{"restart": {"max_restart_attempts": 0, "restart_window_seconds": 600}}`, which may
/// only tighten it ([`RestartPolicy::tightened_by`]).
async fn task_policy(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    task_id: TaskId,
    policy: &RestartPolicy,
) -> Result<RestartPolicy, Error> {
    let overrides: Option<serde_json::Value> =
        sqlx::query_scalar("SELECT metadata->'restart' FROM tasks WHERE task_id = $1")
            .bind(task_id.as_uuid())
            .fetch_one(&mut **tx)
            .traced("SELECT tasks")
            .await
            .map_err(from_sqlx)?;
    Ok(policy.tightened_by(overrides.as_ref()))
}

/// The events a crash appends, what becomes of the task, and how long its restart
/// waits (`None`: no restart), from the crashes in its window (`counts`: handler
/// crashes and node losses, this one included). Shared by the single and the batched
/// recorders, so both decide alike.
pub(super) fn decide_crash(
    before: &TaskState,
    report: &CrashReport,
    policy: &RestartPolicy,
    counts: (i64, i64),
    jitter: f64,
) -> (Vec<Event>, CrashOutcome, Option<Duration>) {
    let mut events = vec![Event::PodCrashed {
        epoch: report.epoch,
        reason: report.reason.clone(),
        kind: report.kind,
    }];
    if before.status != Status::Active {
        return (events, CrashOutcome::Ended, None);
    }
    // A pod lost with its node may still be running there until the old owner's fence
    // and kill: its successor waits the adoption margin, whoever adopts it.
    let adoption = match report.kind {
        CrashKind::Handler => Duration::ZERO,
        CrashKind::NodeLost | CrashKind::Interrupted => policy.adoption_delay(&before.kind),
    };
    if report.kind == CrashKind::Interrupted {
        return (events, CrashOutcome::Ended, Some(adoption));
    }
    match policy.decide(clamp(counts.0), clamp(counts.1), jitter) {
        RestartDecision::Restart { delay } => {
            (events, CrashOutcome::Ended, Some(delay.max(adoption)))
        }
        RestartDecision::Fail { error } => {
            events.push(Event::TaskFailed {
                error: format!("{error}; last: {}", report.reason),
                from_phase: before.phase,
            });
            (events, CrashOutcome::Failed { error }, None)
        }
    }
}

pub(super) fn clamp(n: i64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
