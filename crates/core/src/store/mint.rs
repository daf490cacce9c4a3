//! Minting pod epochs: one conditional statement for any number of tasks.
//!
//! A mint succeeds only while the epoch is the one the worker observed, the task is
//! active without a pod and past its restart backoff, the worker owns the task's
//! partition at the generation it claimed (the partition row read `FOR SHARE`, so a
//! re-claim that commits meanwhile makes the mint re-check and fail), and the worker's
//! lock session is alive (its node key is held, see [`super::keys`]). So a worker that
//! lost its lock cannot mint, even before anyone else claims its partitions, and two
//! starters of one task cannot both win. A batch
//! locks its heads in task-id order first, as every multi-row writer does, so batches
//! never deadlock each other. Each item keeps its own outcome: the statement returns
//! the tasks it minted, with everything their pods need to start (the task, the
//! handler checkpoint, the trace context to continue), so a pod starts without
//! reading them again.
//!
//! Each task's partition is looked up before any partition row is joined
//! (`targets AS MATERIALIZED`): joined freely, the planner matched the batch with the
//! node's partitions on the claim generation, which all of them share, and probed the
//! tasks' index batch x partitions times (787 buffers a pod for a batch of 512, against
//! 19 now; `tests/store_costs.rs`).

use tracing::instrument;

use super::Store;
use super::checkpoint::Checkpoint;
use super::errors::from_sqlx;
use super::keys::node_alive_sql;
use super::rows::{TaskRow, task_columns};
use super::traced::Traced as _;
use crate::domain::{NodeId, Task, TaskId, TaskState};
use crate::error::Error;

/// A task to mint an epoch for, as the worker observed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MintRequest {
    pub task_id: TaskId,
    pub observed_epoch: i64,
    /// The generation at which the worker claimed the task's partition.
    pub generation: i64,
}

/// A minted pod and what it starts from.
#[derive(Clone, Debug, PartialEq)]
pub struct MintedPod {
    /// The task as of the mint (pod state `starting`).
    pub task: Task,
    /// The same, as the state model sees it: what the pod's first append starts from.
    pub state: TaskState,
    pub epoch: i64,
    pub checkpoint: Option<Checkpoint>,
    /// The context of the head's last writer: the trace the pod continues.
    pub traceparent: Option<String>,
}

#[derive(sqlx::FromRow)]
struct MintedRow {
    #[sqlx(flatten)]
    task: TaskRow,
    handler_state: Option<serde_json::Value>,
    traceparent: Option<String>,
}

impl Store {
    /// Mints the next epoch of every task in `wanted` that may start now (see the
    /// module docs) and returns those; the others are left as they are.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    #[instrument(skip_all, fields(wanted = wanted.len()))]
    pub async fn mint_pods(
        &self,
        node: NodeId,
        wanted: &[MintRequest],
    ) -> Result<Vec<MintedPod>, Error> {
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<uuid::Uuid> = wanted.iter().map(|w| w.task_id.as_uuid()).collect();
        let epochs: Vec<i64> = wanted.iter().map(|w| w.observed_epoch).collect();
        let generations: Vec<i64> = wanted.iter().map(|w| w.generation).collect();
        let rows: Vec<MintedRow> = sqlx::query_as(concat!(
            r#"
            WITH alive AS (
                SELECT "#,
            node_alive_sql!("$4"),
            r#" AS ok
            ), wanted AS (
                SELECT * FROM UNNEST($1::uuid[], $2::int8[], $3::int8[]) AS w(task_id, epoch, generation)
                 LIMIT cardinality($1::uuid[])
            ), targets AS MATERIALIZED (
                SELECT w.task_id, w.generation, t.partition
                  FROM wanted w
                  JOIN tasks t ON t.task_id = w.task_id
            ), owned AS (
                SELECT x.task_id
                  FROM targets x
                  JOIN partitions p ON p.partition = x.partition AND p.generation = x.generation
                 WHERE p.owner_node = $4
                   AND (SELECT ok FROM alive)
                   FOR SHARE OF p
            ), locked AS (
                SELECT h.task_id FROM task_heads h
                 WHERE h.task_id IN (SELECT task_id FROM owned)
                 ORDER BY h.task_id
                   FOR UPDATE OF h
            )
            UPDATE task_heads h
               SET pod_epoch = h.pod_epoch + 1, pod_state = 'starting', owner_node = $4
              FROM wanted w, tasks t
             WHERE h.task_id = w.task_id AND t.task_id = h.task_id
               AND h.task_id IN (SELECT task_id FROM locked)
               AND h.pod_epoch = w.epoch AND h.pod_state = 'none' AND h.status = 'active'
               AND (h.not_before IS NULL OR h.not_before <= now())
            RETURNING "#,
            task_columns!(),
            ", h.handler_state, h.traceparent"
        ))
        .bind(ids)
        .bind(epochs)
        .bind(generations)
        .bind(node.0)
        .fetch_all(&self.pool)
        .traced("UPDATE task_heads")
        .await
        .map_err(from_sqlx)?;
        rows.into_iter()
            .map(|r| {
                let state = r.task.state()?;
                let task = Task::try_from(r.task)?;
                Ok(MintedPod {
                    epoch: state.pod_epoch,
                    state,
                    task,
                    checkpoint: r.handler_state.map(Checkpoint::from_saved),
                    traceparent: r.traceparent,
                })
            })
            .collect()
    }

    /// Mints the next epoch of one task, and says why not when it may not start.
    ///
    /// # Errors
    /// [`Error::StaleEpoch`] when the epoch moved (re-check ownership, never a crash);
    /// [`Error::NotRunning`]/[`Error::AlreadyStarted`] from the task's state;
    /// [`Error::NodeFenced`] when the node's lock session is gone; [`Error::BackingOff`]; [`Error::StaleGeneration`] when the claim is gone;
    /// [`Error::TaskNotFound`]; [`Error::StoreUnavailable`].
    #[instrument(skip_all, fields(task.id = %task_id, observed_epoch))]
    pub async fn mint_pod(
        &self,
        task_id: TaskId,
        observed_epoch: i64,
        node: NodeId,
        generation: i64,
    ) -> Result<i64, Error> {
        let request = MintRequest {
            task_id,
            observed_epoch,
            generation,
        };
        if let Some(minted) = self.mint_pods(node, &[request]).await?.pop() {
            return Ok(minted.epoch);
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
        if !self.node_alive(node).await? {
            return Err(Error::NodeFenced(node));
        }
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

    /// Whether `node`'s lock session is alive, as the fenced writes check it.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    pub async fn node_alive(&self, node: NodeId) -> Result<bool, Error> {
        node_alive_on(&self.pool, node).await
    }

    /// The partitions of `claimed` (partition, generation) this node no longer owns at
    /// that generation: what to drop when mints were refused.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    pub async fn lost_partitions(
        &self,
        node: NodeId,
        claimed: &[(i32, i64)],
    ) -> Result<Vec<i32>, Error> {
        let partitions: Vec<i32> = claimed.iter().map(|c| c.0).collect();
        let generations: Vec<i64> = claimed.iter().map(|c| c.1).collect();
        sqlx::query_scalar(
            "SELECT c.partition FROM UNNEST($1::int4[], $2::int8[]) AS c(partition, generation) \
             JOIN partitions p ON p.partition = c.partition \
             WHERE p.owner_node IS DISTINCT FROM $3 OR p.generation <> c.generation",
        )
        .bind(partitions)
        .bind(generations)
        .bind(node.0)
        .fetch_all(&self.pool)
        .traced("SELECT partitions")
        .await
        .map_err(from_sqlx)
    }
}

/// Whether `node`'s lock session is alive, asked on `executor` (a transaction's check
/// runs inside it).
pub(crate) async fn node_alive_on<'e, E>(executor: E, node: NodeId) -> Result<bool, Error>
where
    E: sqlx::PgExecutor<'e>,
{
    sqlx::query_scalar(concat!("SELECT ", node_alive_sql!("$1")))
        .bind(node.0)
        .fetch_one(executor)
        .traced("SELECT nodes")
        .await
        .map_err(from_sqlx)
}
