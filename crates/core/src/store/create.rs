//! Creating tasks: stream, head and listing row in one transaction, one statement.
//!
//! CreateTask is a batch of one, so single creates and CreateTasks share the same
//! multi-row statement (column arrays through `UNNEST`): one round trip for the rows of
//! up to [`BATCH_MAX`] tasks.

use serde::{Deserialize, Serialize};
use tracing::instrument;

use super::Store;
use super::errors::from_sqlx;
use super::idempotency::{self, Claim, Key};
use super::traced::Traced as _;
use super::writes::{EventColumns, metadata_json};
use crate::domain::partition::partition_of;
use crate::domain::validation::{BATCH_MAX, validate_context, validate_new_task};
use crate::domain::{
    Event, EventMetadata, NewTask, RequestContext, Status, TaskId, TaskState, evolve,
};
use crate::error::Error;
use crate::telemetry::metrics::metrics;

/// What a create answered, and whether it is the stored answer to an earlier request
/// with the same request_id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Created {
    /// In the order the tasks were given.
    pub task_ids: Vec<TaskId>,
    /// When the creating transaction began: the tasks' `created_at`.
    #[serde(default)]
    pub created_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(skip)]
    pub replayed: bool,
}

impl Created {
    /// The first (for CreateTask, the only) task id.
    pub fn task_id(&self) -> Option<TaskId> {
        self.task_ids.first().copied()
    }
}

#[derive(Serialize)]
struct Fingerprint<'a> {
    actor_id: &'a str,
    tasks: &'a [NewTask],
}

impl Store {
    /// Creates one task (and requests its pod when `auto_start` is set).
    ///
    /// # Errors
    /// Validation errors; [`Error::IdempotencyKeyReused`]; [`Error::StoreUnavailable`].
    #[instrument(skip_all, fields(task.kind = %task.kind))]
    pub async fn create_task(
        &self,
        task: &NewTask,
        ctx: &RequestContext,
    ) -> Result<Created, Error> {
        validate_new_task(task)?;
        self.create(std::slice::from_ref(task), ctx, "create_task")
            .await
    }

    /// Creates up to [`BATCH_MAX`] tasks, all or nothing.
    ///
    /// # Errors
    /// [`Error::InvalidBatchItem`] naming the first invalid item; the others as for
    /// [`Store::create_task`].
    #[instrument(skip_all, fields(batch.size = tasks.len()))]
    pub async fn create_tasks(
        &self,
        tasks: &[NewTask],
        ctx: &RequestContext,
    ) -> Result<Created, Error> {
        if tasks.is_empty() {
            return Err(Error::invalid("tasks", "at least one task is required"));
        }
        if tasks.len() > BATCH_MAX {
            return Err(Error::invalid(
                "tasks",
                format!("{} tasks, at most {BATCH_MAX} per call", tasks.len()),
            ));
        }
        for (index, task) in tasks.iter().enumerate() {
            validate_new_task(task).map_err(|e| Error::InvalidBatchItem {
                index,
                source: Box::new(e),
            })?;
        }
        self.create(tasks, ctx, "create_tasks").await
    }

    async fn create(
        &self,
        tasks: &[NewTask],
        ctx: &RequestContext,
        method: &'static str,
    ) -> Result<Created, Error> {
        validate_context(ctx)?;
        let started = std::time::Instant::now();
        let mut tx = self.pool.begin().traced("BEGIN").await.map_err(from_sqlx)?;
        let key = match &ctx.request_id {
            Some(id) => {
                let key = Key::new(
                    &ctx.principal,
                    id,
                    method,
                    &Fingerprint {
                        actor_id: &ctx.actor_id,
                        tasks,
                    },
                )?;
                if let Claim::Replay(stored) = idempotency::claim(&mut tx, &key).await? {
                    let mut created: Created = idempotency::decode(stored)?;
                    created.replayed = true;
                    return Ok(created);
                }
                Some(key)
            }
            None => None,
        };

        let origin = Origin::of(ctx)?;
        let rows = TaskColumns::build(tasks.iter().map(|t| (t, &origin)), self.partition_count)?;
        let created_at = insert(&mut tx, &rows).await?;
        let created = Created {
            task_ids: rows.ids.iter().copied().map(TaskId).collect(),
            created_at: Some(created_at),
            replayed: false,
        };
        if let Some(key) = &key {
            idempotency::record(&mut tx, key, &created).await?;
        }
        tx.commit().traced("COMMIT").await.map_err(from_sqlx)?;
        record_created(tasks.iter(), started);
        Ok(created)
    }

    /// Creates one task for each of several callers in one transaction, each with the
    /// answer [`Store::create_task`] would give it: an invalid request is refused alone,
    /// a request with a request_id is run alone (its key is its own transaction's), and
    /// on any unexpected error every request is run alone.
    #[instrument(skip_all, fields(requests = requests.len()))]
    pub async fn create_each(
        &self,
        requests: &[(NewTask, RequestContext)],
    ) -> Vec<Result<Created, Error>> {
        let mut results: Vec<Option<Result<Created, Error>>> = std::iter::repeat_with(|| None)
            .take(requests.len())
            .collect();
        let mut batch = Vec::with_capacity(requests.len());
        for (i, (task, ctx)) in requests.iter().enumerate() {
            match validate_new_task(task).and_then(|()| validate_context(ctx)) {
                Err(e) => results[i] = Some(Err(e)),
                Ok(()) if ctx.request_id.is_some() => {}
                Ok(()) => batch.push(i),
            }
        }
        if batch.len() > 1 {
            match self.create_batch(requests, &batch).await {
                Ok(created) => {
                    for (i, c) in batch.iter().zip(created) {
                        results[*i] = Some(Ok(c));
                    }
                }
                Err(e) => tracing::debug!(error = %e, "batched create failed; creating alone"),
            }
        }
        let mut out = Vec::with_capacity(requests.len());
        for ((task, ctx), result) in requests.iter().zip(results) {
            out.push(match result {
                Some(r) => r,
                None => self.create_task(task, ctx).await,
            });
        }
        out
    }

    async fn create_batch(
        &self,
        requests: &[(NewTask, RequestContext)],
        batch: &[usize],
    ) -> Result<Vec<Created>, Error> {
        let started = std::time::Instant::now();
        let origins = batch
            .iter()
            .map(|&i| Origin::of(&requests[i].1))
            .collect::<Result<Vec<_>, _>>()?;
        let rows = TaskColumns::build(
            batch
                .iter()
                .zip(&origins)
                .map(|(&i, o)| (&requests[i].0, o)),
            self.partition_count,
        )?;
        let mut tx = self.pool.begin().traced("BEGIN").await.map_err(from_sqlx)?;
        let created_at = insert(&mut tx, &rows).await?;
        tx.commit().traced("COMMIT").await.map_err(from_sqlx)?;
        record_created(batch.iter().map(|&i| &requests[i].0), started);
        Ok(rows
            .ids
            .iter()
            .map(|id| Created {
                task_ids: vec![TaskId(*id)],
                created_at: Some(created_at),
                replayed: false,
            })
            .collect())
    }
}

/// Who creates a task: the listing row's `created_by`, the first events' metadata and
/// the head's trace context.
struct Origin<'a> {
    created_by: &'a str,
    metadata: serde_json::Value,
    traceparent: Option<&'a str>,
}

impl<'a> Origin<'a> {
    fn of(ctx: &'a RequestContext) -> Result<Self, Error> {
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

/// Inserts the listing rows, heads and first events of `rows` in one statement;
/// returns the transaction's start, the tasks' `created_at`.
async fn insert(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    rows: &TaskColumns<'_>,
) -> Result<chrono::DateTime<chrono::Utc>, Error> {
    sqlx::query_scalar(
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
        SELECT now()
        "#,
    )
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
    .map_err(from_sqlx)
}

/// Counts committed tasks by kind (a batch nearly always has one or two kinds).
fn record_created<'a>(tasks: impl Iterator<Item = &'a NewTask>, started: std::time::Instant) {
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

/// The correlation id events record: the caller's, or a fresh one so every event of one
/// request can still be found together.
pub(crate) fn correlation_id(ctx: &RequestContext) -> String {
    ctx.correlation_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// New tasks as column arrays, with their genesis events already checked by the domain.
struct TaskColumns<'a> {
    ids: Vec<uuid::Uuid>,
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
}

impl<'a> TaskColumns<'a> {
    fn build(
        tasks: impl ExactSizeIterator<Item = (&'a NewTask, &'a Origin<'a>)>,
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
        };
        for (task, origin) in tasks {
            let id = TaskId::new();
            let mut events = vec![Event::TaskCreated {
                title: task.title.clone(),
                description: task.description.clone(),
                kind: task.kind.clone(),
                payload: task.payload.clone(),
                priority: task.priority,
                metadata: task.metadata.clone(),
            }];
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
        }
        Ok(cols)
    }
}
