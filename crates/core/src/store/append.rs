//! Appends by pods and workers, fenced so that a writer that lost its claim can never
//! write: a pod by its epoch, a worker by its partition generation.

use tracing::instrument;

use super::Store;
use super::errors::from_sqlx;
use super::traced::Traced as _;
use super::writes::{Change, lock_state, lock_states, record_commit, write_changes, write_many};
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

/// One pod's append, for [`Store::append_pods`].
#[derive(Clone, Debug, PartialEq)]
pub struct PodAppend {
    pub task_id: TaskId,
    pub expected_version: i64,
    pub epoch: i64,
    pub events: Vec<Event>,
    pub metadata: EventMetadata,
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
        let started = std::time::Instant::now();
        let mut tx = self.pool.begin().traced("BEGIN").await.map_err(from_sqlx)?;
        let before = lock_state(&mut tx, task_id).await?;
        let (after, epoch) = match fence {
            AppendFence::Pod { epoch } => (
                decide_pod_append(&before, task_id, expected_version, epoch, events)?,
                epoch,
            ),
            AppendFence::Worker { node, generation } => {
                check_writer(events, Writer::Worker)?;
                self.check_partition_owner(&mut tx, task_id, node, generation)
                    .await?;
                check_version(&before, expected_version)?;
                let after = events
                    .iter()
                    .try_fold(before.clone(), |s, e| evolve(&s, e))?;
                (after, before.pod_epoch)
            }
        };
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

    /// Appends for many pods in one transaction, each with its own outcome: the answer
    /// [`Store::append`] would give it alone. Heads are locked in task-id order; the
    /// fences, versions and the state table are checked per item in memory; one
    /// statement writes every accepted item. A task named twice, or any unexpected
    /// error, falls back to appending items one at a time, so no item's fate depends
    /// on another's.
    #[instrument(skip_all, fields(appends = items.len()))]
    pub async fn append_pods(&self, items: &[PodAppend]) -> Vec<Result<Appended, Error>> {
        let mut seen = std::collections::HashSet::with_capacity(items.len());
        let unique = items.iter().all(|i| seen.insert(i.task_id));
        if unique && items.len() > 1 {
            match self.try_append_pods(items).await {
                Ok(results) => return results,
                Err(e) => tracing::debug!(error = %e, "batched append failed; appending alone"),
            }
        }
        let mut results = Vec::with_capacity(items.len());
        for i in items {
            results.push(
                self.append(
                    i.task_id,
                    i.expected_version,
                    AppendFence::Pod { epoch: i.epoch },
                    &i.events,
                    &i.metadata,
                )
                .await,
            );
        }
        results
    }

    async fn try_append_pods(
        &self,
        items: &[PodAppend],
    ) -> Result<Vec<Result<Appended, Error>>, Error> {
        let started = std::time::Instant::now();
        let ids: Vec<TaskId> = items.iter().map(|i| i.task_id).collect();
        let mut tx = self.pool.begin().traced("BEGIN").await.map_err(from_sqlx)?;
        let states: std::collections::HashMap<TaskId, TaskState> = lock_states(&mut tx, &ids)
            .await?
            .into_iter()
            .map(|s| (s.task_id, s))
            .collect();
        let mut results = Vec::with_capacity(items.len());
        let mut accepted = Vec::new();
        for item in items {
            let decided = states
                .get(&item.task_id)
                .ok_or(Error::TaskNotFound(item.task_id))
                .and_then(|before| {
                    decide_pod_append(
                        before,
                        item.task_id,
                        item.expected_version,
                        item.epoch,
                        &item.events,
                    )
                    .map(|after| (before, after))
                });
            match decided {
                Ok((before, after)) => {
                    let metadata = EventMetadata {
                        epoch: Some(item.epoch),
                        ..item.metadata.clone()
                    };
                    results.push(Ok(Appended {
                        state: after.clone(),
                        last_event: item.events.last().map(Event::type_name).unwrap_or_default(),
                    }));
                    accepted.push((before, after, metadata, item));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        if !accepted.is_empty() {
            let changes: Vec<Change<'_>> = accepted
                .iter()
                .map(|(before, after, metadata, item)| Change {
                    before,
                    after,
                    events: &item.events,
                    metadata,
                })
                .collect();
            write_many(&mut tx, &changes).await?;
        }
        tx.commit().traced("COMMIT").await.map_err(from_sqlx)?;
        for (before, after, _, _) in &accepted {
            record_commit("pod", started, before, after);
        }
        Ok(results)
    }

    /// How long until a crashed task may restart, if it is still backing off.
    pub(crate) async fn restart_backoff(
        &self,
        task_id: TaskId,
    ) -> Result<Option<std::time::Duration>, Error> {
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

/// What a pod's append does to `before`, or why it is refused: checked under the row
/// lock, alone or as one item of a batch.
fn decide_pod_append(
    before: &TaskState,
    task_id: TaskId,
    expected_version: i64,
    epoch: i64,
    events: &[Event],
) -> Result<TaskState, Error> {
    check_writer(events, Writer::Pod)?;
    if epoch != before.pod_epoch {
        return Err(Error::StaleEpoch {
            held: epoch,
            current: before.pod_epoch,
        });
    }
    // After a stop, cancel or completion the pod may still say it stopped.
    let acknowledging_stop = events.iter().all(|e| matches!(e, Event::PodStopped { .. }));
    if before.status != Status::Active && !acknowledging_stop {
        return Err(Error::NotRunning(task_id));
    }
    check_version(before, expected_version)?;
    events.iter().try_fold(before.clone(), |s, e| evolve(&s, e))
}

/// Refuses an empty append, or an event `writer` may not append.
fn check_writer(events: &[Event], writer: Writer) -> Result<(), Error> {
    if events.is_empty() {
        return Err(Error::invalid("events", "at least one event is required"));
    }
    match events.iter().find(|e| !e.may_be_written_by(writer)) {
        Some(e) => Err(Error::IllegalEvent {
            event_type: e.type_name().to_owned(),
            reason: format!("a {writer:?} may not append it"),
        }),
        None => Ok(()),
    }
}

fn check_version(before: &TaskState, expected: i64) -> Result<(), Error> {
    if before.version == expected {
        Ok(())
    } else {
        Err(Error::VersionConflict {
            expected,
            actual: before.version,
        })
    }
}
