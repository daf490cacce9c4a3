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

/// Writes `events` (already checked by `evolve` from `before` to `after`).
pub(crate) async fn write_changes(
    tx: &mut Transaction<'_, Postgres>,
    before: &TaskState,
    after: &TaskState,
    events: &[Event],
    metadata: &EventMetadata,
) -> Result<(), Error> {
    let mut cols = EventColumns::with_capacity(events.len());
    cols.push(
        before.task_id.as_uuid(),
        before.version + 1,
        events,
        &metadata_json(metadata)?,
    )?;
    let lifecycle_changed = before.status != after.status
        || before.phase != after.phase
        || before.last_error != after.last_error;
    sqlx::query(
        r#"
        WITH appended AS (
            INSERT INTO events (stream_id, version, type, data, metadata)
            SELECT * FROM UNNEST($1::uuid[], $2::int8[], $3::text[], $4::jsonb[], $5::jsonb[])
        ), head AS (
            UPDATE task_heads
               SET version = $7, pod_epoch = $8, pod_state = $9, owner_node = $10,
                   pod_started_at = $11, status = $12, phase = $13, last_error = $14,
                   traceparent = COALESCE($16, traceparent)
             WHERE task_id = $6
        )
        UPDATE tasks
           SET status = $12, phase = $13, last_error = $14, updated_at = now()
         WHERE task_id = $6 AND $15
        "#,
    )
    .bind(&cols.stream_ids)
    .bind(&cols.versions)
    .bind(&cols.types)
    .bind(&cols.data)
    .bind(&cols.metadata)
    .bind(after.task_id.as_uuid())
    .bind(after.version)
    .bind(after.pod_epoch)
    .bind(after.pod_state.as_str())
    .bind(after.owner_node.map(|n| n.0))
    .bind(after.pod_started_at)
    .bind(after.status.as_str())
    .bind(after.phase.as_str())
    .bind(after.last_error.as_deref())
    .bind(lifecycle_changed)
    .bind(metadata.traceparent.as_deref())
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
