//! Appends by pods and workers, fenced so that a writer that lost its claim can never
//! write: a pod by its epoch and its node's lock session, a worker by its partition
//! generation and its lock session.

use tracing::instrument;

use super::Store;
use super::committed::{self, Committed};
use super::errors::from_sqlx;
use super::keys::node_alive_sql;
use super::mint::node_alive_on;
use super::traced::Traced as _;
use super::writes::{Change, Guard, lock_state, record_commit, write_changes, write_guarded};
use crate::domain::{Event, EventMetadata, NodeId, Status, TaskId, TaskState, Writer, evolve};
use crate::error::Error;

/// Who is appending and the claim that entitles them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendFence {
    /// The pod holding `epoch`. Refused once the epoch is stale or retired (its end was
    /// recorded), or the task has left `active` (except `pod_stopped`, which
    /// acknowledges the stop), or the node that minted it lost its lock session.
    Pod { epoch: i64 },
    /// The worker owning the task's partition at `generation` (crash records, failing a
    /// task whose budget is spent).
    Worker { node: NodeId, generation: i64 },
}

/// One pod's append, for [`Store::append_pods`].
#[derive(Clone, Debug, PartialEq)]
pub struct PodAppend {
    /// The task as the pod last saw it: the version it appends at, and its epoch.
    pub before: TaskState,
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
            AppendFence::Pod { epoch } => {
                let after = decide_pod_append(&before, task_id, expected_version, epoch, events)?;
                check_pod_node(&mut tx, &before).await?;
                (after, epoch)
            }
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
        let listed = write_changes(&mut tx, &before, &after, events, &metadata).await?;
        tx.commit().traced("COMMIT").await.map_err(from_sqlx)?;
        let writer = match fence {
            AppendFence::Pod { .. } => "pod",
            AppendFence::Worker { .. } => "worker",
        };
        record_commit(writer, started, &before, &after);
        let last_event = events.last().map(Event::type_name).unwrap_or_default();
        self.announce(&committed::join(
            [(&after, last_event, metadata.traceparent.as_deref())],
            &listed,
        ));
        Ok(Appended {
            state: after,
            last_event,
        })
    }

    /// Appends for many pods, each with its own outcome: the answer [`Store::append`]
    /// would give it alone. Each item is decided in memory from the pod's own view of
    /// its task, then one statement writes every item whose head still is that view
    /// (same version and epoch, still active), with no transaction of its own: one
    /// round trip for the whole batch. An item whose head moved, that its pod's view
    /// refuses, or that names a task twice, is appended alone under the row lock, which
    /// gives the authoritative answer (a version conflict, a stale epoch, ...).
    #[instrument(skip_all, fields(appends = items.len()))]
    pub async fn append_pods(&self, items: &[PodAppend]) -> Vec<Result<Appended, Error>> {
        let started = std::time::Instant::now();
        let mut results: Vec<Option<Result<Appended, Error>>> =
            std::iter::repeat_with(|| None).take(items.len()).collect();
        let mut seen = std::collections::HashSet::with_capacity(items.len());
        let mut guarded = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let before = &item.before;
            if !seen.insert(before.task_id) {
                continue;
            }
            if let Ok(after) = decide_pod_append(
                before,
                before.task_id,
                before.version,
                before.pod_epoch,
                &item.events,
            ) {
                let metadata = EventMetadata {
                    epoch: Some(before.pod_epoch),
                    ..item.metadata.clone()
                };
                guarded.push((i, after, metadata));
            }
        }
        if !guarded.is_empty() {
            let changes: Vec<(Change<'_>, Guard)> = guarded
                .iter()
                .map(|(i, after, metadata)| {
                    let item = &items[*i];
                    let acknowledging_stop = item
                        .events
                        .iter()
                        .all(|e| matches!(e, Event::PodStopped { .. }));
                    (
                        Change {
                            before: &item.before,
                            after,
                            events: &item.events,
                            metadata,
                        },
                        Guard {
                            require_active: !acknowledging_stop,
                            node: item.before.owner_node,
                        },
                    )
                })
                .collect();
            match write_guarded(&self.pool, &changes).await {
                Ok(written) => {
                    let last_event = |i: usize| {
                        items[i]
                            .events
                            .last()
                            .map(Event::type_name)
                            .unwrap_or_default()
                    };
                    let done = committed::join(
                        guarded.iter().map(|(i, after, metadata)| {
                            (after, last_event(*i), metadata.traceparent.as_deref())
                        }),
                        &written,
                    );
                    self.announce(&done);
                    let written: std::collections::HashSet<TaskId> =
                        done.iter().map(Committed::task_id).collect();
                    for (i, after, _) in guarded {
                        let item = &items[i];
                        if written.contains(&item.before.task_id) {
                            record_commit("pod", started, &item.before, &after);
                            results[i] = Some(Ok(Appended {
                                state: after,
                                last_event: last_event(i),
                            }));
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "guarded append failed; appending alone"),
            }
        }
        let mut out = Vec::with_capacity(items.len());
        for (item, result) in items.iter().zip(results) {
            out.push(match result {
                Some(r) => r,
                None => {
                    self.append(
                        item.before.task_id,
                        item.before.version,
                        AppendFence::Pod {
                            epoch: item.before.pod_epoch,
                        },
                        &item.events,
                        &item.metadata,
                    )
                    .await
                }
            });
        }
        out
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
    /// [`Error::NodeFenced`] when the node's lock session is gone;
    /// [`Error::StoreUnavailable`].
    pub async fn claim_partition(&self, partition: i32, node: NodeId) -> Result<i64, Error> {
        self.claim_partitions(&[partition], node)
            .await?
            .into_iter()
            .find_map(|(p, generation)| (p == partition).then_some(generation))
            .ok_or_else(|| Error::invalid("partition", format!("no partition {partition}")))
    }

    /// Records this node's claim on every partition of `partitions` in one statement
    /// (a node taking over a dead peer's share claims dozens at once; one round trip
    /// each kept a loaded node's takeover waiting seconds): bumps each generation and
    /// sets the owner. Call right after acquiring the partitions' advisory locks.
    /// Answers (partition, new generation) for each; a partition that does not exist
    /// is left out.
    ///
    /// # Errors
    /// [`Error::NodeFenced`] when the node's lock session is gone (nothing is claimed);
    /// [`Error::StoreUnavailable`].
    pub async fn claim_partitions(
        &self,
        partitions: &[i32],
        node: NodeId,
    ) -> Result<Vec<(i32, i64)>, Error> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        // Only while the node's lock session lives: a claim sent just before the node
        // froze must not bump the generation under the partition's rightful owner.
        // Rows are locked in partition order, as the crash batch takes them: a dead
        // owner's batch still in flight waits for the claim, or the claim for it, never
        // both. (No two claims meet: each holds its partitions' advisory locks.)
        let rows: Vec<(bool, Option<i32>, Option<i64>)> = sqlx::query_as(concat!(
            "WITH alive AS (SELECT ",
            node_alive_sql!("$2"),
            " AS ok), target AS (SELECT partition FROM partitions \
             WHERE partition = ANY($1) AND (SELECT ok FROM alive) \
             ORDER BY partition FOR UPDATE), \
             claimed AS (UPDATE partitions p SET generation = p.generation + 1, \
             owner_node = $2 FROM target t WHERE p.partition = t.partition \
             RETURNING p.partition, p.generation) \
             SELECT a.ok, c.partition, c.generation FROM alive a LEFT JOIN claimed c ON true"
        ))
        .bind(partitions)
        .bind(node.0)
        .fetch_all(&self.pool)
        .traced("UPDATE partitions")
        .await
        .map_err(from_sqlx)?;
        if !rows.first().is_some_and(|(alive, _, _)| *alive) {
            return Err(Error::NodeFenced(node));
        }
        Ok(rows
            .into_iter()
            .filter_map(|(_, p, generation)| Some((p?, generation?)))
            .collect())
    }

    pub(crate) async fn check_partition_owner(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        task_id: TaskId,
        node: NodeId,
        generation: i64,
    ) -> Result<(), Error> {
        // FOR SHARE: a concurrent re-claim (generation bump) waits for this append.
        let current: Option<(Option<uuid::Uuid>, i64, bool)> = sqlx::query_as(concat!(
            "SELECT p.owner_node, p.generation, ",
            node_alive_sql!("$2"),
            " FROM partitions p JOIN tasks t \
             ON t.partition = p.partition WHERE t.task_id = $1 FOR SHARE OF p"
        ))
        .bind(task_id.as_uuid())
        .bind(node.0)
        .fetch_optional(&mut **tx)
        .traced("SELECT partitions tasks")
        .await
        .map_err(from_sqlx)?;
        match current {
            Some((Some(owner), g, true)) if owner == node.0 && g == generation => Ok(()),
            Some((Some(owner), g, false)) if owner == node.0 && g == generation => {
                Err(Error::NodeFenced(node))
            }
            Some((_, g, _)) => Err(Error::StaleGeneration {
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
    let stale = Error::StaleEpoch {
        held: epoch,
        current: before.pod_epoch,
    };
    if epoch != before.pod_epoch {
        return Err(stale);
    }
    // After a stop, cancel or completion the pod may still say it stopped.
    let acknowledging_stop = events.iter().all(|e| matches!(e, Event::PodStopped { .. }));
    if before.status != Status::Active && !acknowledging_stop {
        return Err(Error::NotRunning(task_id));
    }
    // A recorded end (`pod_stopped`, `pod_crashed`, `node_lost`) retires the epoch even
    // before a new one is minted: a paused or cut-off owner that comes back must not
    // move the task on after its loss was recorded.
    if !before.has_pod() {
        return Err(stale);
    }
    check_version(before, expected_version)?;
    events.iter().try_fold(before.clone(), |s, e| evolve(&s, e))
}

impl Store {
    /// Why a pod's fenced write (a checkpoint, an output chunk) matched no row: its
    /// epoch is not the task's live pod, or its node lost its lock session.
    pub(crate) async fn refused_pod_write(&self, task_id: TaskId, epoch: i64) -> Error {
        let head = match self.state(task_id).await {
            Ok(head) => head,
            Err(e) => return e,
        };
        let stale = Error::StaleEpoch {
            held: epoch,
            current: head.pod_epoch,
        };
        match head.owner_node {
            Some(node) if head.pod_epoch == epoch && head.has_pod() => {
                match self.node_alive(node).await {
                    Ok(false) => Error::NodeFenced(node),
                    Ok(true) => stale,
                    Err(e) => e,
                }
            }
            _ => stale,
        }
    }
}

/// Refuses a pod's append once the node that minted its epoch (the head's owner) has
/// lost its lock session: epochs are retired only when a new owner records the loss,
/// and until then the fence is the node's claim.
async fn check_pod_node(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    head: &TaskState,
) -> Result<(), Error> {
    let Some(node) = head.owner_node else {
        return Err(Error::StaleEpoch {
            held: head.pod_epoch,
            current: head.pod_epoch,
        });
    };
    if node_alive_on(&mut **tx, node).await? {
        Ok(())
    } else {
        Err(Error::NodeFenced(node))
    }
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
