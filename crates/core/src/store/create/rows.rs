//! New tasks as rows: the listing row, the head and the first events of every task of
//! a create, written by one statement (column arrays through `UNNEST`), which also
//! names its transaction (see `store::commit`) at no extra round trip.

use super::super::Committed;
use super::super::commit::{Xact, xact_columns};
use super::super::errors::from_sqlx;
use super::super::traced::Traced as _;
use super::super::writes::{EventColumns, metadata_json};
use crate::domain::partition::partition_of;
use crate::domain::{
    Event, EventMetadata, NewTask, RequestContext, Status, TaskId, TaskState, evolve,
};
use crate::error::Error;
use crate::telemetry::metrics::metrics;

/// Who creates a task: the listing row's `created_by`, the first events' metadata and
/// the head's trace context.
pub(super) struct Origin<'a> {
    created_by: &'a str,
    metadata: serde_json::Value,
    traceparent: Option<&'a str>,
}

impl<'a> Origin<'a> {
    pub(super) fn of(ctx: &'a RequestContext) -> Result<Self, Error> {
        Ok(Self {
            created_by: &ctx.actor_id,
            metadata: metadata_json(&EventMetadata {
                actor_id: ctx.actor_id.clone(),
                correlation_id: correlation_id(ctx),
                causation_id: ctx.causation_id.clone(),
                traceparent: ctx.traceparent.clone(),
                epoch: None,
            })?,
            traceparent: ctx.traceparent.as_deref(),
        })
    }
}

/// The correlation id events record: the caller's, or a fresh one so every event of one
/// request can still be found together.
pub(crate) fn correlation_id(ctx: &RequestContext) -> String {
    ctx.correlation_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// What the insert learnt: the tasks' `created_at` (the transaction's start) and the
/// transaction itself.
pub(super) struct Inserted {
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub xact: Xact,
}

/// Why an insert wrote nothing.
#[derive(Debug, thiserror::Error)]
pub(super) enum InsertError {
    /// A row under one of the ids is already there: ids are minted per request, so an
    /// earlier attempt of this same request committed.
    #[error("the tasks are already stored")]
    AlreadyStored,
    #[error(transparent)]
    Failed(#[from] Error),
}

impl From<InsertError> for Error {
    fn from(e: InsertError) -> Self {
        match e {
            InsertError::AlreadyStored => Error::StoreUnavailable(e.to_string()),
            InsertError::Failed(e) => e,
        }
    }
}

/// The one statement that writes new tasks: listing rows, heads and first events, from
/// column arrays (the bindings of [`insert`]). Also the shape `taskpod bench limit`
/// times with pgbench (`create::shapes` builds its script from this text).
pub(super) const STATEMENT: &str = concat!(
    r#"
        WITH new_tasks AS (
            INSERT INTO tasks (task_id, title, description, kind, payload, metadata,
                               priority, partition, status, phase, created_by)
            SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[],
                                 $5::jsonb[], $6::jsonb[], $7::int4[], $8::int4[],
                                 $9::text[], $10::text[], $11::text[])
             LIMIT cardinality($1::uuid[])
        ), new_heads AS (
            INSERT INTO task_heads (task_id, version, status, phase, traceparent)
            SELECT * FROM UNNEST($1::uuid[], $12::int8[], $9::text[], $10::text[], $18::text[])
             LIMIT cardinality($1::uuid[])
        ), new_events AS (
            INSERT INTO events (stream_id, version, type, data, metadata)
            SELECT * FROM UNNEST($13::uuid[], $14::int8[], $15::text[], $16::jsonb[], $17::jsonb[])
             LIMIT cardinality($13::uuid[])
        )
        SELECT now(), "#,
    xact_columns!()
);

/// Inserts the listing rows, heads and first events of `rows` in one statement.
pub(super) async fn insert(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    rows: &TaskColumns<'_>,
) -> Result<Inserted, InsertError> {
    let (created_at, id, backend): (chrono::DateTime<chrono::Utc>, i64, i32) =
        sqlx::query_as(STATEMENT)
            .bind(&rows.ids)
            .bind(&rows.titles)
            .bind(&rows.descriptions)
            .bind(&rows.kinds)
            .bind(&rows.payloads)
            .bind(&rows.metadata)
            .bind(&rows.priorities)
            .bind(&rows.partitions)
            .bind(&rows.statuses)
            .bind(&rows.phases)
            .bind(&rows.created_by)
            .bind(&rows.versions)
            .bind(&rows.events.stream_ids)
            .bind(&rows.events.versions)
            .bind(&rows.events.types)
            .bind(&rows.events.data)
            .bind(&rows.events.metadata)
            .bind(&rows.traceparents)
            .fetch_one(&mut **tx)
            .traced("INSERT tasks task_heads events")
            .await
            .map_err(|e| match e {
                // unique_violation: on whichever of the three tables met it first.
                sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => {
                    InsertError::AlreadyStored
                }
                e => InsertError::Failed(from_sqlx(e)),
            })?;
    Ok(Inserted {
        created_at,
        xact: Xact { id, backend },
    })
}

/// A new task's first event.
pub(super) fn created_event(task: &NewTask) -> Event {
    Event::TaskCreated {
        title: task.title.clone(),
        description: task.description.clone(),
        kind: task.kind.clone(),
        payload: task.payload.clone(),
        priority: task.priority,
        metadata: task.metadata.clone(),
    }
}

/// Counts committed tasks by kind (a batch nearly always has one or two kinds).
pub(super) fn record_created<'a>(
    tasks: impl Iterator<Item = &'a NewTask>,
    started: std::time::Instant,
) {
    let m = metrics();
    m.event_append("api", started.elapsed().as_secs_f64());
    let mut by_kind: Vec<(&str, u64)> = Vec::new();
    for task in tasks {
        match by_kind.iter_mut().find(|(k, _)| *k == task.kind) {
            Some((_, n)) => *n += 1,
            None => by_kind.push((&task.kind, 1)),
        }
    }
    for (kind, n) in by_kind {
        m.tasks_created(kind, n);
    }
}

/// New tasks as column arrays, with their genesis events already checked by the domain.
pub(super) struct TaskColumns<'a> {
    pub ids: Vec<uuid::Uuid>,
    titles: Vec<&'a str>,
    descriptions: Vec<&'a str>,
    kinds: Vec<&'a str>,
    payloads: Vec<&'a serde_json::Value>,
    metadata: Vec<&'a serde_json::Value>,
    priorities: Vec<i32>,
    partitions: Vec<i32>,
    statuses: Vec<&'static str>,
    phases: Vec<&'static str>,
    versions: Vec<i64>,
    created_by: Vec<&'a str>,
    traceparents: Vec<Option<&'a str>>,
    events: EventColumns,
    /// Each task's state after its first events, and the last of them: what the insert
    /// commits, for the announcement.
    states: Vec<(TaskState, &'static str)>,
}

impl<'a> TaskColumns<'a> {
    /// The rows of `tasks`, each under the id its request was given before any attempt
    /// (a retry after an unanswered COMMIT must not mint another).
    pub(super) fn build(
        tasks: impl ExactSizeIterator<Item = (TaskId, &'a NewTask, &'a Origin<'a>)>,
        partition_count: u32,
    ) -> Result<Self, Error> {
        let n = tasks.len();
        let mut cols = TaskColumns {
            ids: Vec::with_capacity(n),
            titles: Vec::with_capacity(n),
            descriptions: Vec::with_capacity(n),
            kinds: Vec::with_capacity(n),
            payloads: Vec::with_capacity(n),
            metadata: Vec::with_capacity(n),
            priorities: Vec::with_capacity(n),
            partitions: Vec::with_capacity(n),
            statuses: Vec::with_capacity(n),
            phases: Vec::with_capacity(n),
            versions: Vec::with_capacity(n),
            created_by: Vec::with_capacity(n),
            traceparents: Vec::with_capacity(n),
            events: EventColumns::with_capacity(n * 2),
            states: Vec::with_capacity(n),
        };
        for (id, task, origin) in tasks {
            let mut events = vec![created_event(task)];
            let mut state = TaskState::genesis(id, &events[0])?;
            if task.auto_start {
                let start = Event::PodRequested {};
                state = evolve(&state, &start)?;
                events.push(start);
            }
            debug_assert!(matches!(state.status, Status::Inactive | Status::Active));
            cols.ids.push(id.as_uuid());
            cols.titles.push(&task.title);
            cols.descriptions.push(&task.description);
            cols.kinds.push(&task.kind);
            cols.payloads.push(&task.payload);
            cols.metadata.push(&task.metadata);
            cols.priorities.push(task.priority);
            cols.partitions
                .push(partition_of(id, partition_count) as i32);
            cols.statuses.push(state.status.as_str());
            cols.phases.push(state.phase.as_str());
            cols.versions.push(state.version);
            cols.created_by.push(origin.created_by);
            cols.traceparents.push(origin.traceparent);
            cols.events
                .push(id.as_uuid(), 1, &events, &origin.metadata)?;
            let last = events.last().map(Event::type_name).unwrap_or_default();
            cols.states.push((state, last));
        }
        Ok(cols)
    }

    /// The tasks as the insert committed them, its transaction having begun (and the
    /// rows' `created_at` and `updated_at` being) at `created_at`.
    pub(super) fn committed(&self, created_at: chrono::DateTime<chrono::Utc>) -> Vec<Committed> {
        self.states
            .iter()
            .zip(&self.partitions)
            .zip(&self.created_by)
            .zip(&self.traceparents)
            .map(
                |((((state, last), partition), created_by), trace)| Committed {
                    state: state.clone(),
                    event_type: last,
                    partition: *partition,
                    created_by: (*created_by).to_owned(),
                    created_at,
                    updated_at: created_at,
                    traceparent: trace.map(str::to_owned),
                },
            )
            .collect()
    }
}
