//! The statement every change shares: append events, update the head, and rewrite the
//! listing row only when status, phase or last_error changed.
//!
//! One round trip: data-modifying CTEs all run, referenced or not. The head update
//! touches no indexed column, so with the table's fillfactor it is a HOT update.

use std::time::Instant;

use sqlx::{Postgres, Transaction};

use super::errors::from_sqlx;
use super::rows::state_columns;
use super::traced::Traced as _;
use crate::domain::{Event, EventMetadata, TaskState};
use crate::error::Error;
use crate::telemetry::metrics::metrics;

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

/// Writes `events` (already checked by `evolve` from `before` to `after`).
pub(crate) async fn write_changes(
    tx: &mut Transaction<'_, Postgres>,
    before: &TaskState,
    after: &TaskState,
    events: &[Event],
    metadata: &EventMetadata,
) -> Result<(), Error> {
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
) -> Result<(), Error> {
    let mut cols = EventColumns::with_capacity(changes.iter().map(|c| c.events.len()).sum());
    let n = changes.len();
    let (mut ids, mut versions, mut epochs, mut pod_states, mut owners, mut started) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut statuses, mut phases, mut errors, mut lifecycle, mut traces) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for c in changes {
        cols.push(
            c.before.task_id.as_uuid(),
            c.before.version + 1,
            c.events,
            &metadata_json(c.metadata)?,
        )?;
        let a = c.after;
        ids.push(a.task_id.as_uuid());
        versions.push(a.version);
        epochs.push(a.pod_epoch);
        pod_states.push(a.pod_state.as_str());
        owners.push(a.owner_node.map(|n| n.0));
        started.push(a.pod_started_at);
        statuses.push(a.status.as_str());
        phases.push(a.phase.as_str());
        errors.push(a.last_error.as_deref());
        lifecycle.push(c.lifecycle_changed());
        traces.push(c.metadata.traceparent.as_deref());
    }
    sqlx::query(
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
        ), head AS (
            UPDATE task_heads h
               SET version = c.version, pod_epoch = c.pod_epoch, pod_state = c.pod_state,
                   owner_node = c.owner_node, pod_started_at = c.pod_started_at,
                   status = c.status, phase = c.phase, last_error = c.last_error,
                   traceparent = COALESCE(c.traceparent, h.traceparent)
              FROM changed c
             WHERE h.task_id = c.task_id
        )
        UPDATE tasks t
           SET status = c.status, phase = c.phase, last_error = c.last_error, updated_at = now()
          FROM changed c
         WHERE t.task_id = c.task_id AND c.lifecycle
        "#,
    )
    .bind(&cols.stream_ids)
    .bind(&cols.versions)
    .bind(&cols.types)
    .bind(&cols.data)
    .bind(&cols.metadata)
    .bind(&ids)
    .bind(&versions)
    .bind(&epochs)
    .bind(&pod_states)
    .bind(&owners)
    .bind(&started)
    .bind(&statuses)
    .bind(&phases)
    .bind(&errors)
    .bind(&lifecycle)
    .bind(&traces)
    .execute(&mut **tx)
    .traced("INSERT events UPDATE task_heads UPDATE tasks")
    .await
    .map_err(from_sqlx)?;
    Ok(())
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

/// Reads and locks the heads of `tasks`, in task-id order: every writer that locks
/// several heads takes them in that order, so two of them never wait on each other.
pub(crate) async fn lock_states(
    tx: &mut Transaction<'_, Postgres>,
    tasks: &[crate::domain::TaskId],
) -> Result<Vec<TaskState>, Error> {
    let ids: Vec<uuid::Uuid> = tasks.iter().map(|t| t.as_uuid()).collect();
    let rows: Vec<super::rows::StateRow> = sqlx::query_as(concat!(
        "SELECT ",
        state_columns!(),
        " FROM task_heads h JOIN tasks t ON t.task_id = h.task_id",
        " WHERE h.task_id = ANY($1) ORDER BY h.task_id FOR UPDATE OF h"
    ))
    .bind(ids)
    .fetch_all(&mut **tx)
    .traced("SELECT task_heads tasks")
    .await
    .map_err(from_sqlx)?;
    rows.into_iter().map(TaskState::try_from).collect()
}
