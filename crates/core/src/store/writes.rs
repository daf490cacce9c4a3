//! The statement every change shares: append events, update the head, and rewrite the
//! listing row only when status, phase or last_error changed.
//!
//! One round trip: data-modifying CTEs all run, referenced or not. The head update
//! touches no indexed column, so with the table's fillfactor it is a HOT update.
//!
//! `LIMIT cardinality($n)` after an `UNNEST` of column arrays changes no result (the
//! arrays have that many rows) but is what lets Postgres reuse the prepared plan. A
//! generic plan cannot see the arrays, so it assumes 10 rows; a custom plan sees 1, is
//! estimated cheaper, and Postgres then plans every execution afresh, which costs this
//! statement about 0.7 ms of Postgres CPU, more than running it (about 0.3 ms). A
//! `LIMIT` whose count is not a constant is estimated as a tenth of its input, so the
//! generic plan expects 1 row too, looks as cheap as the custom one and is kept, with
//! index lookups even on a small table. The same applies to every statement of this
//! shape (`create`, `mint`).

use std::time::Instant;

use sqlx::{Postgres, Transaction};

use super::committed::Listing;
use super::errors::from_sqlx;
use super::keys::node_alive_sql;
use super::rows::state_columns;
use super::traced::Traced as _;
use crate::domain::{Event, EventMetadata, NodeId, TaskState};
use crate::error::Error;
use crate::telemetry::metrics::metrics;

/// The tail both writers share, after a `head` CTE that returns each written head's
/// new lifecycle fields and whether they changed: rewrites the listing rows whose
/// lifecycle changed and answers every written task's listing fields. The rewritten rows
/// come from the `UPDATE`'s own `RETURNING` (the statement's snapshot still shows their
/// old version), the others straight from `tasks`; neither is joined with another
/// batch, which the planner (estimating one row per CTE) would do by a nested loop, the
/// batch's size squared.
macro_rules! listed_sql {
    () => {
        r#"listed AS (
            UPDATE tasks t
               SET status = head.status, phase = head.phase, last_error = head.last_error,
                   updated_at = now()
              FROM head
             WHERE t.task_id = head.task_id AND head.lifecycle
            RETURNING t.task_id, t.partition, t.created_by, t.created_at, t.updated_at
        )
        SELECT task_id, partition, created_by, created_at, updated_at FROM listed
        UNION ALL
        SELECT t.task_id, t.partition, t.created_by, t.created_at, t.updated_at
          FROM head JOIN tasks t ON t.task_id = head.task_id
         WHERE NOT head.lifecycle"#
    };
}

/// Event rows in the column-array form `UNNEST` takes, so any number of events is one
/// statement.
#[derive(Default)]
pub(crate) struct EventColumns {
    pub stream_ids: Vec<uuid::Uuid>,
    pub versions: Vec<i64>,
    pub types: Vec<&'static str>,
    pub data: Vec<serde_json::Value>,
    pub metadata: Vec<serde_json::Value>,
}

impl EventColumns {
    pub fn with_capacity(n: usize) -> Self {
        Self {
            stream_ids: Vec::with_capacity(n),
            versions: Vec::with_capacity(n),
            types: Vec::with_capacity(n),
            data: Vec::with_capacity(n),
            metadata: Vec::with_capacity(n),
        }
    }

    /// Adds `events` to `stream`, numbered from `first_version`.
    pub fn push(
        &mut self,
        stream: uuid::Uuid,
        first_version: i64,
        events: &[Event],
        metadata: &serde_json::Value,
    ) -> Result<(), Error> {
        for (i, event) in events.iter().enumerate() {
            let (ty, data) = event
                .to_parts()
                .map_err(|e| Error::Internal(format!("serialising {}: {e}", event.type_name())))?;
            self.stream_ids.push(stream);
            self.versions.push(first_version + i as i64);
            self.types.push(ty);
            self.data.push(data);
            self.metadata.push(metadata.clone());
        }
        Ok(())
    }
}

pub(crate) fn metadata_json(meta: &EventMetadata) -> Result<serde_json::Value, Error> {
    serde_json::to_value(meta).map_err(|e| Error::Internal(format!("serialising metadata: {e}")))
}

/// One task's change: `events` (already checked by `evolve`) take it from `before`
/// to `after`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Change<'a> {
    pub before: &'a TaskState,
    pub after: &'a TaskState,
    pub events: &'a [Event],
    pub metadata: &'a EventMetadata,
}

impl Change<'_> {
    fn lifecycle_changed(&self) -> bool {
        self.before.status != self.after.status
            || self.before.phase != self.after.phase
            || self.before.last_error != self.after.last_error
    }
}

/// What a guarded write requires besides the head being the change's `before`.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Guard {
    /// The task must still be `active`.
    pub require_active: bool,
    /// The head's pod must be this node's, and the node's lock session alive: a pod is
    /// fenced by its node's claim as well as by its epoch, so a node that lost its
    /// session writes nothing even before a new owner retires the epoch.
    pub node: Option<NodeId>,
}

/// Changes as the column arrays `UNNEST` takes: their events, the heads' new values,
/// and what a guarded write expects to find.
struct ChangeColumns<'a> {
    events: EventColumns,
    ids: Vec<uuid::Uuid>,
    versions: Vec<i64>,
    epochs: Vec<i64>,
    pod_states: Vec<&'static str>,
    owners: Vec<Option<uuid::Uuid>>,
    started: Vec<Option<chrono::DateTime<chrono::Utc>>>,
    statuses: Vec<&'static str>,
    phases: Vec<&'static str>,
    errors: Vec<Option<&'a str>>,
    lifecycle: Vec<bool>,
    traces: Vec<Option<&'a str>>,
    expected_versions: Vec<i64>,
    expected_epochs: Vec<i64>,
    require_active: Vec<bool>,
    expected_statuses: Vec<&'static str>,
    expected_phases: Vec<&'static str>,
    expected_pod_states: Vec<&'static str>,
    expected_errors: Vec<Option<&'a str>>,
    fence_nodes: Vec<Option<uuid::Uuid>>,
}

impl<'a> ChangeColumns<'a> {
    fn build(
        changes: impl ExactSizeIterator<Item = (&'a Change<'a>, Guard)>,
    ) -> Result<Self, Error> {
        let n = changes.len();
        let mut cols = Self {
            events: EventColumns::with_capacity(n * 2),
            ids: Vec::with_capacity(n),
            versions: Vec::with_capacity(n),
            epochs: Vec::with_capacity(n),
            pod_states: Vec::with_capacity(n),
            owners: Vec::with_capacity(n),
            started: Vec::with_capacity(n),
            statuses: Vec::with_capacity(n),
            phases: Vec::with_capacity(n),
            errors: Vec::with_capacity(n),
            lifecycle: Vec::with_capacity(n),
            traces: Vec::with_capacity(n),
            expected_versions: Vec::with_capacity(n),
            expected_epochs: Vec::with_capacity(n),
            require_active: Vec::with_capacity(n),
            expected_statuses: Vec::with_capacity(n),
            expected_phases: Vec::with_capacity(n),
            expected_pod_states: Vec::with_capacity(n),
            expected_errors: Vec::with_capacity(n),
            fence_nodes: Vec::with_capacity(n),
        };
        for (c, guard) in changes {
            cols.events.push(
                c.before.task_id.as_uuid(),
                c.before.version + 1,
                c.events,
                &metadata_json(c.metadata)?,
            )?;
            let a = c.after;
            cols.ids.push(a.task_id.as_uuid());
            cols.versions.push(a.version);
            cols.epochs.push(a.pod_epoch);
            cols.pod_states.push(a.pod_state.as_str());
            cols.owners.push(a.owner_node.map(|n| n.0));
            cols.started.push(a.pod_started_at);
            cols.statuses.push(a.status.as_str());
            cols.phases.push(a.phase.as_str());
            cols.errors.push(a.last_error.as_deref());
            cols.lifecycle.push(c.lifecycle_changed());
            cols.traces.push(c.metadata.traceparent.as_deref());
            cols.expected_versions.push(c.before.version);
            cols.expected_epochs.push(c.before.pod_epoch);
            cols.require_active.push(guard.require_active);
            cols.fence_nodes.push(guard.node.map(|n| n.0));
            let b = c.before;
            cols.expected_statuses.push(b.status.as_str());
            cols.expected_phases.push(b.phase.as_str());
            cols.expected_pod_states.push(b.pod_state.as_str());
            cols.expected_errors.push(b.last_error.as_deref());
        }
        Ok(cols)
    }
}

/// Writes `events` (already checked by `evolve` from `before` to `after`).
pub(crate) async fn write_changes(
    tx: &mut Transaction<'_, Postgres>,
    before: &TaskState,
    after: &TaskState,
    events: &[Event],
    metadata: &EventMetadata,
) -> Result<Vec<Listing>, Error> {
    write_many(
        tx,
        &[Change {
            before,
            after,
            events,
            metadata,
        }],
    )
    .await
}

/// Writes several tasks' changes in one statement: their events, their heads, and the
/// listing rows whose lifecycle changed. At most one change per task: a head row can be
/// updated once per statement.
pub(crate) async fn write_many(
    tx: &mut Transaction<'_, Postgres>,
    changes: &[Change<'_>],
) -> Result<Vec<Listing>, Error> {
    let cols = ChangeColumns::build(changes.iter().map(|c| (c, Guard::default())))?;
    let listed: Vec<Listing> = sqlx::query_as(concat!(
        r#"
        WITH appended AS (
            INSERT INTO events (stream_id, version, type, data, metadata)
            SELECT * FROM UNNEST($1::uuid[], $2::int8[], $3::text[], $4::jsonb[], $5::jsonb[])
        ), changed AS (
            SELECT * FROM UNNEST($6::uuid[], $7::int8[], $8::int8[], $9::text[], $10::uuid[],
                                 $11::timestamptz[], $12::text[], $13::text[], $14::text[],
                                 $15::bool[], $16::text[])
                AS c(task_id, version, pod_epoch, pod_state, owner_node, pod_started_at,
                     status, phase, last_error, lifecycle, traceparent)
             LIMIT cardinality($6::uuid[])
        ), head AS (
            UPDATE task_heads h
               SET version = c.version, pod_epoch = c.pod_epoch, pod_state = c.pod_state,
                   owner_node = c.owner_node, pod_started_at = c.pod_started_at,
                   status = c.status, phase = c.phase, last_error = c.last_error,
                   traceparent = COALESCE(c.traceparent, h.traceparent)
              FROM changed c
             WHERE h.task_id = c.task_id
            RETURNING h.task_id, h.status, h.phase, h.last_error, c.lifecycle
        ), "#,
        listed_sql!(),
        r#"
        "#
    ))
    .bind(&cols.events.stream_ids)
    .bind(&cols.events.versions)
    .bind(&cols.events.types)
    .bind(&cols.events.data)
    .bind(&cols.events.metadata)
    .bind(&cols.ids)
    .bind(&cols.versions)
    .bind(&cols.epochs)
    .bind(&cols.pod_states)
    .bind(&cols.owners)
    .bind(&cols.started)
    .bind(&cols.statuses)
    .bind(&cols.phases)
    .bind(&cols.errors)
    .bind(&cols.lifecycle)
    .bind(&cols.traces)
    .fetch_all(&mut **tx)
    .traced("INSERT events UPDATE task_heads UPDATE tasks")
    .await
    .map_err(from_sqlx)?;
    Ok(listed)
}

/// Reads the task's state and locks its head row until the transaction ends. Every
/// mutable field comes from the locked row itself (see the `task_heads` migration).
pub(crate) async fn lock_state(
    tx: &mut Transaction<'_, Postgres>,
    task_id: crate::domain::TaskId,
) -> Result<TaskState, Error> {
    let row: Option<super::rows::StateRow> = sqlx::query_as(concat!(
        "SELECT ",
        state_columns!(),
        " FROM task_heads h JOIN tasks t ON t.task_id = h.task_id",
        " WHERE h.task_id = $1 FOR UPDATE OF h"
    ))
    .bind(task_id.as_uuid())
    .fetch_optional(&mut **tx)
    .traced("SELECT task_heads tasks")
    .await
    .map_err(from_sqlx)?;
    row.ok_or(Error::TaskNotFound(task_id))?.try_into()
}

/// Records a committed change in the metrics: the transaction's duration by writer
/// (`api`, `pod`, `worker`), and the task's end when it reached a terminal status.
pub(crate) fn record_commit(
    writer: &'static str,
    started: Instant,
    before: &TaskState,
    after: &TaskState,
) {
    let m = metrics();
    m.event_append(writer, started.elapsed().as_secs_f64());
    if after.status.is_terminal() && !before.status.is_terminal() {
        let age = after
            .task_id
            .created_at()
            .map_or(0.0, |t| (chrono::Utc::now() - t).as_seconds_f64());
        m.task_finished(after.status.as_str(), &after.kind, age.max(0.0));
    }
}

/// Writes each change only if its task's head still is `before` (same version, pod
/// epoch, status, phase, pod state and last error: the version alone would do, the
/// rest make a caller's stale view harmless; and still `active` where
/// the guard says so, and its pod's node alive where it names one), in one statement
/// that needs no transaction of its own: the optimistic form of lock, decide, write
/// (`UPDATE ... WHERE version = $v RETURNING`). Returns the listing rows of the tasks
/// written; a change whose head moved is left out, for the caller to decide again
/// under the lock. At most one change per task.
pub(crate) async fn write_guarded<'e, E>(
    executor: E,
    changes: &[(Change<'_>, Guard)],
) -> Result<Vec<Listing>, Error>
where
    E: sqlx::PgExecutor<'e>,
{
    let cols = ChangeColumns::build(changes.iter().map(|(c, guard)| (c, *guard)))?;
    let written: Vec<Listing> = sqlx::query_as(concat!(
        r#"
        WITH changed AS (
            SELECT * FROM UNNEST($6::uuid[], $7::int8[], $8::int8[], $9::text[], $10::uuid[],
                                 $11::timestamptz[], $12::text[], $13::text[], $14::text[],
                                 $15::bool[], $16::text[], $17::int8[], $18::int8[], $19::bool[],
                                 $20::text[], $21::text[], $22::text[], $23::text[], $24::uuid[])
                AS c(task_id, version, pod_epoch, pod_state, owner_node, pod_started_at,
                     status, phase, last_error, lifecycle, traceparent,
                     expected_version, expected_epoch, require_active,
                     expected_status, expected_phase, expected_pod_state, expected_last_error,
                     fence_node)
             LIMIT cardinality($6::uuid[])
        ), head AS (
            UPDATE task_heads h
               SET version = c.version, pod_epoch = c.pod_epoch, pod_state = c.pod_state,
                   owner_node = c.owner_node, pod_started_at = c.pod_started_at,
                   status = c.status, phase = c.phase, last_error = c.last_error,
                   traceparent = COALESCE(c.traceparent, h.traceparent)
              FROM changed c
             WHERE h.task_id = c.task_id
               AND h.version = c.expected_version AND h.pod_epoch = c.expected_epoch
               AND h.status = c.expected_status AND h.phase = c.expected_phase
               AND h.pod_state = c.expected_pod_state
               AND h.last_error IS NOT DISTINCT FROM c.expected_last_error
               AND (NOT c.require_active OR h.status = 'active')
               AND (c.fence_node IS NULL OR (h.owner_node = c.fence_node AND "#,
        node_alive_sql!("c.fence_node"),
        r#"))
            RETURNING h.task_id, h.status, h.phase, h.last_error, c.lifecycle
        ), appended AS (
            INSERT INTO events (stream_id, version, type, data, metadata)
            SELECT e.* FROM UNNEST($1::uuid[], $2::int8[], $3::text[], $4::jsonb[], $5::jsonb[])
                AS e(stream_id, version, type, data, metadata)
             WHERE e.stream_id IN (SELECT task_id FROM head)
        ), "#,
        listed_sql!(),
        r#"
        "#
    ))
    .bind(&cols.events.stream_ids)
    .bind(&cols.events.versions)
    .bind(&cols.events.types)
    .bind(&cols.events.data)
    .bind(&cols.events.metadata)
    .bind(&cols.ids)
    .bind(&cols.versions)
    .bind(&cols.epochs)
    .bind(&cols.pod_states)
    .bind(&cols.owners)
    .bind(&cols.started)
    .bind(&cols.statuses)
    .bind(&cols.phases)
    .bind(&cols.errors)
    .bind(&cols.lifecycle)
    .bind(&cols.traces)
    .bind(&cols.expected_versions)
    .bind(&cols.expected_epochs)
    .bind(&cols.require_active)
    .bind(&cols.expected_statuses)
    .bind(&cols.expected_phases)
    .bind(&cols.expected_pod_states)
    .bind(&cols.expected_errors)
    .bind(&cols.fence_nodes)
    .fetch_all(executor)
    .traced("UPDATE task_heads INSERT events UPDATE tasks")
    .await
    .map_err(from_sqlx)?;
    Ok(written)
}
