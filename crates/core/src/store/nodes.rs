//! Worker membership and partition bookkeeping. The advisory locks themselves live on
//! each worker's dedicated lock session (crates/worker); these rows record who holds
//! what, so fences can be checked in ordinary transactions.

use chrono::{DateTime, Utc};
use tracing::instrument;

use super::Store;
use super::errors::from_sqlx;
use super::traced::Traced as _;
use crate::domain::{NodeId, PodState, Status, TaskId};
use crate::error::Error;

/// A worker as it registered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub node_id: NodeId,
    pub name: String,
    /// The second half of the node's own advisory key; peers probe it to tell whether
    /// the node's lock session is alive.
    pub lock_key: i32,
    pub capacity: i32,
    pub kinds: Vec<String>,
    pub programs: Vec<String>,
    pub heartbeat_at: DateTime<Utc>,
}

/// A registered node as ListNodes shows it: what it offers, owns and runs now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSummary {
    pub node: NodeInfo,
    pub started_at: DateTime<Utc>,
    /// Partitions whose claim names it.
    pub partitions: i64,
    /// Live pods (minted, running or stopping) it owns.
    pub pods: i64,
}

/// A `nodes` row as [`NODE_COLUMNS`] reads it.
type NodeRow = (
    uuid::Uuid,
    String,
    i32,
    i32,
    Vec<String>,
    Vec<String>,
    DateTime<Utc>,
);

/// The columns of [`NodeInfo`], of `nodes n`.
const NODE_COLUMNS: &str =
    "n.node_id, n.name, n.lock_key, n.capacity, n.kinds, n.programs, n.heartbeat_at";

impl From<NodeRow> for NodeInfo {
    fn from(r: NodeRow) -> Self {
        Self {
            node_id: NodeId(r.0),
            name: r.1,
            lock_key: r.2,
            capacity: r.3,
            kinds: r.4,
            programs: r.5,
            heartbeat_at: r.6,
        }
    }
}

/// A partition row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionInfo {
    pub partition: i32,
    pub owner_node: Option<NodeId>,
    pub generation: i64,
}

/// What a worker needs to know about an active task, or a task it runs a pod for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCandidate {
    pub task_id: TaskId,
    pub partition: i32,
    pub kind: String,
    pub priority: i32,
    pub status: Status,
    pub version: i64,
    pub pod_epoch: i64,
    pub pod_state: PodState,
    pub owner_node: Option<NodeId>,
    /// What is left of the restart backoff, measured by Postgres's clock at the read
    /// (`None`: no backoff, or over), so no worker's clock skew shifts a restart.
    pub backoff: Option<std::time::Duration>,
    /// The `exec` program an `exec` task names (`payload.program`), for placement.
    pub program: Option<String>,
    pub created_at: DateTime<Utc>,
    /// The trace context of the head's last writer, for tasks whose pod is not the
    /// asking node's (the ones it may start or adopt): the trace it continues.
    pub traceparent: Option<String>,
}

type CandidateRow = (
    uuid::Uuid,
    i32,
    String,
    i32,
    String,
    i64,
    i64,
    String,
    Option<uuid::Uuid>,
    Option<f64>,
    Option<String>,
    DateTime<Utc>,
    Option<String>,
);

fn candidate(r: CandidateRow) -> Result<PodCandidate, Error> {
    Ok(PodCandidate {
        task_id: TaskId(r.0),
        partition: r.1,
        kind: r.2,
        priority: r.3,
        status: r.4.parse().map_err(super::errors::corrupt)?,
        version: r.5,
        pod_epoch: r.6,
        pod_state: r.7.parse().map_err(super::errors::corrupt)?,
        owner_node: r.8.map(NodeId),
        backoff: r
            .9
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(|s| std::time::Duration::from_secs_f64(s.min(1e9))),
        program: r.10,
        created_at: r.11,
        traceparent: r.12,
    })
}

/// The trace context only where the pod is not node `$1`'s own: the running pods, most
/// of the rows, need none, and a full check reads them all.
const CANDIDATE_COLUMNS: &str = "t.task_id, t.partition, t.kind, t.priority, h.status, h.version, \
     h.pod_epoch, h.pod_state, h.owner_node, \
     CASE WHEN h.not_before > now() THEN EXTRACT(epoch FROM h.not_before - now())::float8 END, \
     CASE WHEN t.kind = 'exec' THEN t.payload->>'program' END, t.created_at, \
     CASE WHEN h.owner_node IS DISTINCT FROM $1 THEN h.traceparent END";

impl Store {
    /// A fresh lock key for a node about to register. The node takes its key on its
    /// lock session first and registers after: peers treat a row whose key nobody
    /// holds as a dead node and delete it, so the row must never be visible before
    /// the key is held.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    pub async fn reserve_lock_key(&self) -> Result<i32, Error> {
        sqlx::query_scalar("SELECT nextval('nodes_lock_key_seq')::int4")
            .fetch_one(&self.pool)
            .traced("SELECT nextval")
            .await
            .map_err(from_sqlx)
    }

    /// Registers a worker process under a key from [`Store::reserve_lock_key`] that its
    /// lock session already holds.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    #[instrument(skip_all, fields(node = %node_id, name, lock_key))]
    pub async fn register_node(
        &self,
        node_id: NodeId,
        lock_key: i32,
        name: &str,
        capacity: i32,
        kinds: &[String],
        programs: &[String],
    ) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO nodes (node_id, lock_key, name, capacity, kinds, programs) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(node_id.0)
        .bind(lock_key)
        .bind(name)
        .bind(capacity)
        .bind(kinds)
        .bind(programs)
        .execute(&self.pool)
        .traced("INSERT nodes")
        .await
        .map_err(from_sqlx)?;
        Ok(())
    }

    /// When the Postgres server last started: a node registered before it lost its
    /// session to the restart, which is nobody's fault.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    pub async fn server_started_at(&self) -> Result<DateTime<Utc>, Error> {
        sqlx::query_scalar("SELECT pg_postmaster_start_time()")
            .fetch_one(&self.pool)
            .traced("SELECT pg_postmaster_start_time")
            .await
            .map_err(from_sqlx)
    }

    /// # Errors
    /// [`Error::StoreUnavailable`].
    pub async fn heartbeat_node(&self, node_id: NodeId) -> Result<(), Error> {
        sqlx::query("UPDATE nodes SET heartbeat_at = now() WHERE node_id = $1")
            .bind(node_id.0)
            .execute(&self.pool)
            .traced("UPDATE nodes")
            .await
            .map_err(from_sqlx)?;
        Ok(())
    }

    /// Removes a node's row (a clean exit, or a peer found dead).
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    pub async fn deregister_node(&self, node_id: NodeId) -> Result<(), Error> {
        sqlx::query("DELETE FROM nodes WHERE node_id = $1")
            .bind(node_id.0)
            .execute(&self.pool)
            .traced("DELETE nodes")
            .await
            .map_err(from_sqlx)?;
        Ok(())
    }

    /// Every registered node, alive or not (liveness is the lock probe's business).
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, Error> {
        let rows: Vec<NodeRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {NODE_COLUMNS} FROM nodes n ORDER BY n.node_id"
        )))
        .fetch_all(&self.pool)
        .traced("SELECT nodes")
        .await
        .map_err(from_sqlx)?;
        Ok(rows.into_iter().map(NodeInfo::from).collect())
    }

    /// Every registered node with its partitions and live pods, by name. Each count is
    /// one probe of an index per node (the partitions' rows are a few hundred; the pods
    /// come from the live-pods partial index), so a listing costs the same whatever the
    /// number of tasks.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    #[instrument(skip_all)]
    pub async fn node_summaries(&self) -> Result<Vec<NodeSummary>, Error> {
        type Row = (
            uuid::Uuid,
            String,
            i32,
            i32,
            Vec<String>,
            Vec<String>,
            DateTime<Utc>,
            DateTime<Utc>,
            i64,
            i64,
        );
        let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {NODE_COLUMNS}, n.started_at, \
                    (SELECT count(*) FROM partitions p WHERE p.owner_node = n.node_id), \
                    (SELECT count(*) FROM task_heads h \
                      WHERE h.owner_node = n.node_id AND h.pod_state <> 'none') \
               FROM nodes n ORDER BY n.name, n.started_at, n.node_id"
        )))
        .fetch_all(&self.pool)
        .traced("SELECT nodes partitions task_heads")
        .await
        .map_err(from_sqlx)?;
        Ok(rows
            .into_iter()
            .map(|r| NodeSummary {
                node: NodeInfo::from((r.0, r.1, r.2, r.3, r.4, r.5, r.6)),
                started_at: r.7,
                partitions: r.8,
                pods: r.9,
            })
            .collect())
    }

    /// The kinds some registered worker offers.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    pub async fn offered_kinds(&self) -> Result<Vec<String>, Error> {
        sqlx::query_scalar("SELECT DISTINCT unnest(kinds) FROM nodes ORDER BY 1")
            .fetch_all(&self.pool)
            .traced("SELECT nodes")
            .await
            .map_err(from_sqlx)
    }

    /// Every partition row.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    pub async fn partitions(&self) -> Result<Vec<PartitionInfo>, Error> {
        let rows: Vec<(i32, Option<uuid::Uuid>, i64)> = sqlx::query_as(
            "SELECT partition, owner_node, generation FROM partitions ORDER BY partition",
        )
        .fetch_all(&self.pool)
        .traced("SELECT partitions")
        .await
        .map_err(from_sqlx)?;
        Ok(rows
            .into_iter()
            .map(|(partition, owner, generation)| PartitionInfo {
                partition,
                owner_node: owner.map(NodeId),
                generation,
            })
            .collect())
    }

    /// Clears this node's claim before it unlocks the partition (a graceful hand-back).
    /// Returns false when the claim had already moved on.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    pub async fn release_partition(
        &self,
        partition: i32,
        node: NodeId,
        generation: i64,
    ) -> Result<bool, Error> {
        let n = sqlx::query(
            "UPDATE partitions SET owner_node = NULL WHERE partition = $1 AND owner_node = $2 AND generation = $3",
        )
        .bind(partition)
        .bind(node.0)
        .bind(generation)
        .execute(&self.pool).traced("UPDATE partitions")
        .await
        .map_err(from_sqlx)?
        .rows_affected();
        Ok(n == 1)
    }

    /// Active tasks of these partitions, every live pod on them whatever its task's
    /// status (a pod a lost node left behind on a task that ended meanwhile), and the
    /// given tasks whatever their status: the full check `node` runs now and then.
    ///
    /// Two lookups, each reached only through an index whatever the statistics say:
    /// the live pods' ids from their partial index (sequential scans off), then the
    /// candidate rows by primary key or the active tasks' partial index. Before
    /// `task_heads` is first analyzed (a fresh deploy, a bulk load faster than
    /// autovacuum's first pass) the planner took `pod_state <> 'none'` for nearly every
    /// row, and one query joining the two tables read both in full on every check: 290
    /// ms a check at 600k tasks, a quarter of Postgres's time in the batch-create bench.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    #[instrument(skip_all, fields(partitions = partitions.len(), running = running.len()))]
    pub async fn pod_candidates(
        &self,
        node: NodeId,
        partitions: &[i32],
        running: &[TaskId],
    ) -> Result<Vec<PodCandidate>, Error> {
        let running: Vec<uuid::Uuid> = running.iter().map(TaskId::as_uuid).collect();
        // Every step bounded like any other statement: a worker cut from Postgres gives
        // up on the check instead of waiting for TCP, and its connection is suspect.
        let mut tx = self.pool.begin().traced("BEGIN").await.map_err(from_sqlx)?;
        sqlx::query("SET LOCAL enable_seqscan = off")
            .execute(&mut *tx)
            .traced("SET LOCAL")
            .await
            .map_err(from_sqlx)?;
        let live: Vec<uuid::Uuid> =
            sqlx::query_scalar("SELECT task_id FROM task_heads WHERE pod_state <> 'none'")
                .fetch_all(&mut *tx)
                .traced("SELECT task_heads")
                .await
                .map_err(from_sqlx)?;
        let rows: Vec<CandidateRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {CANDIDATE_COLUMNS} FROM tasks t JOIN task_heads h ON h.task_id = t.task_id \
             WHERE (t.status = 'active' AND t.partition = ANY($2)) OR t.task_id = ANY($3) \
                OR (t.task_id = ANY($4) AND t.partition = ANY($2))"
        )))
        .bind(node.0)
        .bind(partitions)
        .bind(running)
        .bind(live)
        .fetch_all(&mut *tx)
        .traced("SELECT tasks task_heads")
        .await
        .map_err(from_sqlx)?;
        // Read-only: ending it either way only resets the setting.
        tx.rollback().traced("ROLLBACK").await.map_err(from_sqlx)?;
        rows.into_iter().map(candidate).collect()
    }

    /// The rows of `tasks` only, for the checks between full scans (tasks named by
    /// wake-ups or the change feed): the same columns as [`Store::pod_candidates`].
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    #[instrument(skip_all, fields(tasks = tasks.len()))]
    pub async fn pod_candidates_of(
        &self,
        node: NodeId,
        tasks: &[TaskId],
    ) -> Result<Vec<PodCandidate>, Error> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<uuid::Uuid> = tasks.iter().map(TaskId::as_uuid).collect();
        let rows: Vec<CandidateRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {CANDIDATE_COLUMNS} FROM tasks t JOIN task_heads h ON h.task_id = t.task_id \
             WHERE t.task_id = ANY($2)"
        )))
        .bind(node.0)
        .bind(ids)
        .fetch_all(&self.pool)
        .traced("SELECT tasks task_heads")
        .await
        .map_err(from_sqlx)?;
        rows.into_iter().map(candidate).collect()
    }

    /// The candidate rows of the tasks with events written by transactions in
    /// `[from, to)` (the change feed, `to` a watermark read before) that matter to
    /// `node`: active tasks of its `partitions`, and tasks whose pod it runs. One round
    /// trip for a tick's check, returning nothing for the changes of other nodes'
    /// partitions or of tasks nobody runs. A `task_created` alone is skipped before any
    /// task row is read: it leaves its task inactive, without a pod or an owner, which
    /// this never returns (a task created started has its `pod_requested` in the same
    /// transaction), and bulk creates of inactive tasks would otherwise cost every
    /// worker a lookup of each.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    #[instrument(skip_all, fields(from, to))]
    pub async fn changed_candidates(
        &self,
        node: NodeId,
        partitions: &[i32],
        from: u64,
        to: u64,
    ) -> Result<Vec<PodCandidate>, Error> {
        if from >= to {
            return Ok(Vec::new());
        }
        let rows: Vec<CandidateRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {CANDIDATE_COLUMNS} FROM tasks t JOIN task_heads h ON h.task_id = t.task_id \
             WHERE t.task_id IN (SELECT stream_id FROM events \
                                  WHERE tx_id >= $3::text::xid8 AND tx_id < $4::text::xid8 \
                                    AND type <> 'task_created') \
               AND (((h.status = 'active' OR h.pod_state <> 'none') AND t.partition = ANY($2)) \
                    OR h.owner_node = $1)"
        )))
        .bind(node.0)
        .bind(partitions)
        .bind(from.to_string())
        .bind(to.to_string())
        .fetch_all(&self.pool)
        .traced("SELECT tasks task_heads events")
        .await
        .map_err(from_sqlx)?;
        rows.into_iter().map(candidate).collect()
    }

    /// Tasks that are active without a running pod, and the age of the oldest such wait
    /// in seconds (for the gauge that shows kinds nobody runs).
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    pub async fn pending_pods(&self) -> Result<(i64, f64), Error> {
        sqlx::query_as(
            "SELECT count(*), COALESCE(EXTRACT(epoch FROM now() - min(t.updated_at))::float8, 0) \
             FROM tasks t JOIN task_heads h ON h.task_id = t.task_id \
             WHERE t.status = 'active' AND h.pod_state <> 'running'",
        )
        .fetch_one(&self.pool)
        .traced("SELECT tasks task_heads")
        .await
        .map_err(from_sqlx)
    }
}
