//! Read-only diagnostics: what the benchmarks (and tests) read straight from the tables
//! to check and explain what a run did, kept beside the schema they read so it has one
//! owner. Nothing here is on a request's path.
//!
//! Every function takes a pool (the caller's own, usually small) and answers typed
//! rows. Durations between two stored times are computed by Postgres, on its clock, in
//! whole microseconds. The statements are not traced nor bounded by the call limit (see
//! `deadline`): they are a tool's occasional reads, and one may read thousands of
//! streams.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::errors::from_sqlx;
use crate::domain::NodeId;
use crate::error::Error;

/// A task's head and its stream's event types, for checking its trail.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct Trail {
    pub task_id: uuid::Uuid,
    pub status: String,
    pub pod_state: String,
    pub version: i64,
    /// `created_at` -> `updated_at` of the listing row, in microseconds.
    pub created_to_updated_us: Option<i64>,
    /// The stream's event types, in version order.
    pub types: Vec<String>,
}

/// The trails of `ids`' tasks (those that exist), in no particular order.
///
/// # Errors
/// [`Error::StoreUnavailable`] and the like, as every store read.
pub async fn trails(pool: &PgPool, ids: &[uuid::Uuid]) -> Result<Vec<Trail>, Error> {
    sqlx::query_as(
        "SELECT h.task_id, h.status, h.pod_state, h.version, \
                (extract(epoch FROM t.updated_at - t.created_at) * 1000000)::bigint \
                    AS created_to_updated_us, \
                array_remove(array_agg(e.type ORDER BY e.version), NULL) AS types \
           FROM task_heads h JOIN tasks t ON t.task_id = h.task_id \
           LEFT JOIN events e ON e.stream_id = h.task_id AND e.stream_id = ANY($1) \
          WHERE h.task_id = ANY($1) \
          GROUP BY h.task_id, h.status, h.pod_state, h.version, t.updated_at, t.created_at",
    )
    .bind(ids)
    .fetch_all(pool)
    .await
    .map_err(from_sqlx)
}

/// Where the tasks' time goes at one version of their streams: from the event before
/// it to it, by the events' `recorded_at` (their transactions' starts).
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct Step {
    pub version: i64,
    pub event_type: String,
    pub p50_us: i64,
    pub p99_us: i64,
}

/// Every version's [`Step`] over `ids`' streams, by version then type.
///
/// # Errors
/// As [`trails`].
pub async fn steps(pool: &PgPool, ids: &[uuid::Uuid]) -> Result<Vec<Step>, Error> {
    sqlx::query_as(
        "SELECT e.version, e.type AS event_type, \
                (extract(epoch FROM percentile_disc(0.5) WITHIN GROUP \
                    (ORDER BY e.recorded_at - p.recorded_at)) * 1000000)::bigint AS p50_us, \
                (extract(epoch FROM percentile_disc(0.99) WITHIN GROUP \
                    (ORDER BY e.recorded_at - p.recorded_at)) * 1000000)::bigint AS p99_us \
           FROM events e JOIN events p ON p.stream_id = e.stream_id AND p.version = e.version - 1 \
          WHERE e.stream_id = ANY($1) AND p.stream_id = ANY($1) \
          GROUP BY e.version, e.type ORDER BY e.version, e.type",
    )
    .bind(ids)
    .fetch_all(pool)
    .await
    .map_err(from_sqlx)
}

/// For each of `ids`' streams, each `pod_requested` -> `pod_started` pair's time, in
/// microseconds: how long StartPod took in the store.
///
/// # Errors
/// As [`trails`].
pub async fn requested_to_started_us(pool: &PgPool, ids: &[uuid::Uuid]) -> Result<Vec<i64>, Error> {
    sqlx::query_scalar(
        "SELECT (extract(epoch FROM s.recorded_at - r.recorded_at) * 1000000)::bigint \
           FROM events r JOIN events s ON s.stream_id = r.stream_id AND s.type = 'pod_started' \
          WHERE r.type = 'pod_requested' AND r.stream_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(pool)
    .await
    .map_err(from_sqlx)
}

/// For each of `ids`' tasks, `created_at` -> its pod's `pod_started_at` in
/// microseconds (`None` while no pod started).
///
/// # Errors
/// As [`trails`].
pub async fn created_to_pod_started_us(
    pool: &PgPool,
    ids: &[uuid::Uuid],
) -> Result<Vec<Option<i64>>, Error> {
    sqlx::query_scalar(
        "SELECT (extract(epoch FROM h.pod_started_at - t.created_at) * 1000000)::bigint \
           FROM tasks t JOIN task_heads h USING (task_id) WHERE t.task_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(pool)
    .await
    .map_err(from_sqlx)
}

/// `pod_started_at` of each of `ids`' tasks (`None` while no pod started).
///
/// # Errors
/// As [`trails`].
pub async fn pod_started_at(
    pool: &PgPool,
    ids: &[uuid::Uuid],
) -> Result<Vec<Option<DateTime<Utc>>>, Error> {
    sqlx::query_scalar("SELECT pod_started_at FROM task_heads WHERE task_id = ANY($1)")
        .bind(ids)
        .fetch_all(pool)
        .await
        .map_err(from_sqlx)
}

/// Pods in state `running`, across the cluster.
///
/// # Errors
/// As [`trails`].
pub async fn running_pods(pool: &PgPool) -> Result<i64, Error> {
    sqlx::query_scalar("SELECT count(*) FROM task_heads WHERE pod_state = 'running'")
        .fetch_one(pool)
        .await
        .map_err(from_sqlx)
}

/// How many of something a node has (or, for partitions, nobody: `node` `None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PerNode {
    pub node: Option<NodeId>,
    pub count: i64,
}

fn per_node(rows: Vec<(Option<uuid::Uuid>, i64)>) -> Vec<PerNode> {
    rows.into_iter()
        .map(|(node, count)| PerNode {
            node: node.map(NodeId),
            count,
        })
        .collect()
}

/// Running pods per owning node, most first.
///
/// # Errors
/// As [`trails`].
pub async fn running_pods_per_node(pool: &PgPool) -> Result<Vec<PerNode>, Error> {
    let rows = sqlx::query_as(
        "SELECT owner_node, count(*) FROM task_heads WHERE pod_state = 'running' \
         AND owner_node IS NOT NULL GROUP BY owner_node ORDER BY count(*) DESC",
    )
    .fetch_all(pool)
    .await
    .map_err(from_sqlx)?;
    Ok(per_node(rows))
}

/// The tasks whose pods run on `node`.
///
/// # Errors
/// As [`trails`].
pub async fn running_pods_of(pool: &PgPool, node: NodeId) -> Result<Vec<uuid::Uuid>, Error> {
    sqlx::query_scalar(
        "SELECT task_id FROM task_heads WHERE owner_node = $1 AND pod_state = 'running'",
    )
    .bind(node.0)
    .fetch_all(pool)
    .await
    .map_err(from_sqlx)
}

/// Partitions per owner (`None`: unowned), most first.
///
/// # Errors
/// As [`trails`].
pub async fn partitions_per_node(pool: &PgPool) -> Result<Vec<PerNode>, Error> {
    let rows = sqlx::query_as(
        "SELECT owner_node, count(*) FROM partitions GROUP BY owner_node ORDER BY count(*) DESC",
    )
    .fetch_all(pool)
    .await
    .map_err(from_sqlx)?;
    Ok(per_node(rows))
}

/// The partitions `node` owns.
///
/// # Errors
/// As [`trails`].
pub async fn partitions_of(pool: &PgPool, node: NodeId) -> Result<i64, Error> {
    sqlx::query_scalar("SELECT count(*) FROM partitions WHERE owner_node = $1")
        .bind(node.0)
        .fetch_one(pool)
        .await
        .map_err(from_sqlx)
}

/// Advisory locks held in the whole server. Reading `pg_locks` copies the lock
/// manager's state, so this is for a benchmark's few reads only.
///
/// # Errors
/// As [`trails`].
pub async fn advisory_locks(pool: &PgPool) -> Result<i64, Error> {
    sqlx::query_scalar("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
        .fetch_one(pool)
        .await
        .map_err(from_sqlx)
}

/// Registered worker nodes.
///
/// # Errors
/// As [`trails`].
pub async fn nodes(pool: &PgPool) -> Result<i64, Error> {
    sqlx::query_scalar("SELECT count(*) FROM nodes")
        .fetch_one(pool)
        .await
        .map_err(from_sqlx)
}

/// How far the cluster got in taking over a lost node's work, in one read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Takeover {
    /// Whether the lost node's row is still registered.
    pub registered: bool,
    /// Partitions owned by nobody or still by the lost node.
    pub unclaimed_partitions: i64,
    /// Pods running on any other node.
    pub running_elsewhere: i64,
}

/// [`Takeover`] of `lost`'s work.
///
/// # Errors
/// As [`trails`].
pub async fn takeover(pool: &PgPool, lost: NodeId) -> Result<Takeover, Error> {
    let (rows, unclaimed_partitions, running_elsewhere): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM nodes WHERE node_id = $1), \
                (SELECT count(*) FROM partitions WHERE owner_node IS NULL OR owner_node = $1), \
                (SELECT count(*) FROM task_heads WHERE pod_state = 'running' AND owner_node <> $1)",
    )
    .bind(lost.0)
    .fetch_one(pool)
    .await
    .map_err(from_sqlx)?;
    Ok(Takeover {
        registered: rows > 0,
        unclaimed_partitions,
        running_elsewhere,
    })
}

/// The `node_lost` crash records of a node's pods: how many, and the first and last
/// one's `at` (its transaction's start).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeLost {
    pub crashes: i64,
    pub first: Option<DateTime<Utc>>,
    pub last: Option<DateTime<Utc>>,
}

/// [`NodeLost`] for `node`.
///
/// # Errors
/// As [`trails`].
pub async fn node_lost(pool: &PgPool, node: NodeId) -> Result<NodeLost, Error> {
    let (crashes, first, last) = sqlx::query_as(
        "SELECT count(*), min(at), max(at) FROM pod_crashes \
          WHERE node = $1 AND kind = 'node_lost'",
    )
    .bind(node.0)
    .fetch_one(pool)
    .await
    .map_err(from_sqlx)?;
    Ok(NodeLost {
        crashes,
        first,
        last,
    })
}

/// The database's clock (`now()`): what dates `created_at` and every stored time.
///
/// # Errors
/// As [`trails`].
pub async fn clock(pool: &PgPool) -> Result<DateTime<Utc>, Error> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(pool)
        .await
        .map_err(from_sqlx)
}
