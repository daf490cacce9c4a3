//! Appends by pods and workers, fenced so that a writer that lost its claim can never
//! write: a pod by its epoch, a worker by its partition generation.

use tracing::instrument;

use super::Store;
use super::errors::from_sqlx;
use super::traced::Traced as _;
use super::writes::{lock_state, record_commit, write_changes};
use crate::domain::{Event, EventMetadata, NodeId, Status, TaskId, TaskState, Writer, evolve};
use crate::error::Error;

/// Who is appending and the claim that entitles them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendFence {
    /// The pod holding `epoch`. Refused once the epoch is stale or the task has left
    /// `active` (except `pod_stopped`, which acknowledges the stop).
    Pod { epoch: i64 },
    /// The worker owning the task's partition at `generation` (crash records, failing a
    /// task whose budget is spent).
    Worker { node: NodeId, generation: i64 },
}

/// The state after an append.
#[derive(Clone, Debug, PartialEq)]
pub struct Appended {
    pub state: TaskState,
    /// The type of the last event appended.
    pub last_event: &'static str,
}

impl Store {
    /// Appends `events` at `expected_version`, fenced as `fence` says.
    ///
    /// # Errors
    /// [`Error::StaleEpoch`] (stop the pod and re-check ownership, never a crash);
    /// [`Error::NotRunning`] when the task is no longer active; [`Error::VersionConflict`]
    /// (catch up and decide again, never re-run the refused step); [`Error::IllegalEvent`]
    /// when the table or the write rules refuse an event; [`Error::TaskNotFound`];
    /// [`Error::StoreUnavailable`].
    #[instrument(skip_all, fields(task.id = %task_id, expected_version, events = events.len()))]
    pub async fn append(
        &self,
        task_id: TaskId,
        expected_version: i64,
        fence: AppendFence,
        events: &[Event],
        metadata: &EventMetadata,
    ) -> Result<Appended, Error> {
        if events.is_empty() {
            return Err(Error::invalid("events", "at least one event is required"));
        }
        let writer = match fence {
            AppendFence::Pod { .. } => Writer::Pod,
            AppendFence::Worker { .. } => Writer::Worker,
        };
        if let Some(e) = events.iter().find(|e| !e.may_be_written_by(writer)) {
            return Err(Error::IllegalEvent {
                event_type: e.type_name().to_owned(),
                reason: format!("a {writer:?} may not append it"),
            });
        }

        let started = std::time::Instant::now();
        let mut tx = self.pool.begin().traced("BEGIN").await.map_err(from_sqlx)?;
        let before = lock_state(&mut tx, task_id).await?;
        let epoch = match fence {
            AppendFence::Pod { epoch } => {
                if epoch != before.pod_epoch {
                    return Err(Error::StaleEpoch {
                        held: epoch,
                        current: before.pod_epoch,
                    });
                }
                // After a stop, cancel or completion the pod may still say it stopped.
                let acknowledging_stop =
                    events.iter().all(|e| matches!(e, Event::PodStopped { .. }));
                if before.status != Status::Active && !acknowledging_stop {
                    return Err(Error::NotRunning(task_id));
                }
                epoch
            }
            AppendFence::Worker { node, generation } => {
                self.check_partition_owner(&mut tx, task_id, node, generation)
                    .await?;
                before.pod_epoch
            }
        };
        if before.version != expected_version {
            return Err(Error::VersionConflict {
                expected: expected_version,
                actual: before.version,
            });
        }
        let after = events
            .iter()
            .try_fold(before.clone(), |s, e| evolve(&s, e))?;
        let metadata = EventMetadata {
            epoch: Some(epoch),
            ..metadata.clone()
        };
        write_changes(&mut tx, &before, &after, events, &metadata).await?;
        tx.commit().traced("COMMIT").await.map_err(from_sqlx)?;
        let writer = match fence {
            AppendFence::Pod { .. } => "pod",
            AppendFence::Worker { .. } => "worker",
        };
        record_commit(writer, started, &before, &after);
        Ok(Appended {
            state: after,
            last_event: events.last().map(Event::type_name).unwrap_or_default(),
        })
    }

    /// Mints the next pod epoch: one conditional statement that succeeds only while the
    /// epoch is the one observed, the task is active without a pod, and `node` owns the
    /// task's partition at `generation`. So a worker that lost its lock cannot mint an
    /// epoch, and two starters of one task cannot both win. Mirrors `domain::mint_pod`.
    ///
    /// # Errors
    /// [`Error::StaleEpoch`] when the epoch moved or the claim is gone (re-check
    /// ownership, never a crash); [`Error::NotRunning`]/[`Error::AlreadyStarted`] from
    /// the task's state; [`Error::TaskNotFound`]; [`Error::StoreUnavailable`].
    #[instrument(skip_all, fields(task.id = %task_id, observed_epoch))]
    pub async fn mint_pod(
        &self,
        task_id: TaskId,
        observed_epoch: i64,
        node: NodeId,
        generation: i64,
    ) -> Result<i64, Error> {
        let minted: Option<i64> = sqlx::query_scalar(
            r#"
            WITH owned AS (
                -- FOR SHARE: a re-claim of the partition (generation bump) that commits
                -- while this runs makes the row re-checked, and the mint refused.
                SELECT p.partition
                  FROM tasks t JOIN partitions p ON p.partition = t.partition
                 WHERE t.task_id = $1 AND p.owner_node = $3 AND p.generation = $4
                   FOR SHARE OF p
            )
            UPDATE task_heads h
               SET pod_epoch = h.pod_epoch + 1, pod_state = 'starting', owner_node = $3
             WHERE h.task_id = $1 AND h.pod_epoch = $2 AND h.pod_state = 'none'
               AND h.status = 'active' AND EXISTS (SELECT 1 FROM owned)
               AND (h.not_before IS NULL OR h.not_before <= now())
            RETURNING h.pod_epoch
            "#,
        )
        .bind(task_id.as_uuid())
        .bind(observed_epoch)
        .bind(node.0)
        .bind(generation)
        .fetch_optional(&self.pool)
        .traced("UPDATE task_heads")
        .await
        .map_err(from_sqlx)?;
        if let Some(epoch) = minted {
            return Ok(epoch);
        }
        // Refused: say why, from a fresh read (the answer is advisory, the refusal final).
        let state = self.state(task_id).await?;
        if state.pod_epoch != observed_epoch {
            return Err(Error::StaleEpoch {
                held: observed_epoch,
                current: state.pod_epoch,
            });
        }
        crate::domain::mint_pod(&state, node)?;
        if let Some(wait) = self.restart_backoff(task_id).await? {
            return Err(Error::BackingOff { task_id, wait });
        }
        let current: i64 = sqlx::query_scalar(
            "SELECT p.generation FROM partitions p JOIN tasks t ON t.partition = p.partition \
             WHERE t.task_id = $1",
        )
        .bind(task_id.as_uuid())
        .fetch_one(&self.pool)
        .traced("SELECT partitions tasks")
        .await
        .map_err(from_sqlx)?;
        Err(Error::StaleGeneration {
            held: generation,
            current,
        })
    }

    /// How long until a crashed task may restart, if it is still backing off.
    async fn restart_backoff(&self, task_id: TaskId) -> Result<Option<std::time::Duration>, Error> {
        let secs: Option<f64> = sqlx::query_scalar(
            "SELECT EXTRACT(epoch FROM not_before - now())::float8 FROM task_heads \
             WHERE task_id = $1 AND not_before > now()",
        )
        .bind(task_id.as_uuid())
        .fetch_optional(&self.pool)
        .traced("SELECT task_heads")
        .await
        .map_err(from_sqlx)?;
        Ok(secs.map(|s| std::time::Duration::from_secs_f64(s.max(0.0))))
    }

    /// Records this node's claim on a partition: bumps its generation and sets the
    /// owner. Call right after acquiring the partition's advisory lock.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a partition that does not exist;
    /// [`Error::StoreUnavailable`].
    pub async fn claim_partition(&self, partition: i32, node: NodeId) -> Result<i64, Error> {
        sqlx::query_scalar(
            "UPDATE partitions SET generation = generation + 1, owner_node = $2 \
             WHERE partition = $1 RETURNING generation",
        )
        .bind(partition)
        .bind(node.0)
        .fetch_optional(&self.pool)
        .traced("UPDATE partitions")
        .await
        .map_err(from_sqlx)?
        .ok_or_else(|| Error::invalid("partition", format!("no partition {partition}")))
    }

    pub(crate) async fn check_partition_owner(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        task_id: TaskId,
        node: NodeId,
        generation: i64,
    ) -> Result<(), Error> {
        // FOR SHARE: a concurrent re-claim (generation bump) waits for this append.
        let current: Option<(Option<uuid::Uuid>, i64)> = sqlx::query_as(
            "SELECT p.owner_node, p.generation FROM partitions p JOIN tasks t \
             ON t.partition = p.partition WHERE t.task_id = $1 FOR SHARE OF p",
        )
        .bind(task_id.as_uuid())
        .fetch_optional(&mut **tx)
        .traced("SELECT partitions tasks")
        .await
        .map_err(from_sqlx)?;
        match current {
            Some((Some(owner), g)) if owner == node.0 && g == generation => Ok(()),
            Some((_, g)) => Err(Error::StaleGeneration {
                held: generation,
                current: g,
            }),
            None => Err(Error::TaskNotFound(task_id)),
        }
    }
}
