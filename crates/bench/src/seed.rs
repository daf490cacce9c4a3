//! `--seed N`: a big table in bulk, written in SQL rather than through the API.
//!
//! CreateTasks makes about 10,000 tasks a second here, so a table of a million would
//! take minutes. Seeding writes what the store's create path (`store/create.rs`)
//! writes for an inactive `manual` task, for [`CHUNK`] tasks per statement: the listing
//! row, the head at version 1, and the `task_created` event, whose data and metadata
//! are serialised here from the domain's own [`Event`] and [`EventMetadata`], so they
//! cannot drift from what the API writes. Ids are UUIDv7, minted in creation order as
//! the store mints them, with the partition from the same hash. The tasks are read
//! back as any other (the test below holds GetTask, ListTasks, the stream and its
//! replay of seeded tasks to those of a created one). Two chunks are written at once
//! (one per core), each its own transaction; the tables are analysed at the end, as
//! autovacuum would do a little later.
//!
//! As a superuser (`--dev` is one) a chunk's transaction sets
//! `session_replication_role = replica`, which skips triggers, and so the foreign key
//! check of every head against its listing row: the statement writes both, so the
//! check could only pass, and it is 40 % of the time (the bulk-load switch
//! `pg_restore --disable-triggers` uses). It also compresses the full-page images in
//! the WAL (`wal_compression = lz4`, where the server has it): a million tasks write
//! gigabytes of WAL, and checkpoints come round several times. Durability is
//! untouched. Other roles keep the check and the server's WAL settings.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use sqlx::PgPool;
use taskpod_core::domain::partition::partition_of;
use taskpod_core::domain::{Event, EventMetadata, Phase, Status, TaskId};
use tokio::time::Instant;

use super::BenchError;
use super::progress::{Progress, say};

/// Tasks per statement: large enough that per-statement costs vanish, small enough
/// that a chunk's arrays stay a few hundred kilobytes.
pub const CHUNK: usize = 20_000;
/// Chunks written at once.
const PARALLEL: usize = 2;
/// The kind of every seeded task.
const KIND: &str = "manual";

/// What a seed wrote.
#[derive(Debug)]
pub struct Seeded {
    /// In creation order.
    pub ids: Vec<uuid::Uuid>,
    pub elapsed: Duration,
}

/// The `task_created` data of a seeded task with an empty title (the statement sets
/// each task's own).
fn created_template() -> Result<serde_json::Value, BenchError> {
    let event = Event::TaskCreated {
        title: String::new(),
        description: String::new(),
        kind: KIND.to_owned(),
        payload: serde_json::Value::Null,
        priority: 0,
        metadata: serde_json::Value::Object(serde_json::Map::new()),
    };
    event
        .to_parts()
        .map(|(_, data)| data)
        .map_err(|e| BenchError::Failed(format!("serialise a task_created event: {e}")))
}

/// One chunk's event metadata: the actor, and one correlation id for the chunk (the
/// store mints one per request, and a chunk stands for one CreateTasks call).
fn chunk_metadata(actor: &str) -> Result<serde_json::Value, BenchError> {
    serde_json::to_value(EventMetadata {
        actor_id: actor.to_owned(),
        correlation_id: uuid::Uuid::new_v4().to_string(),
        ..EventMetadata::default()
    })
    .map_err(|e| BenchError::Failed(format!("serialise event metadata: {e}")))
}

/// Titles are `"<prefix><n>"`, numbered from 0 across the whole seed.
const TITLE_PREFIX: &str = "bench seed ";

/// Writes one chunk: rows, heads and first events, as the create statement does.
async fn insert_chunk(
    pool: &PgPool,
    chunk: Chunk<'_>,
    actor: &str,
    template: &serde_json::Value,
    settings: Option<&str>,
) -> Result<(), BenchError> {
    let metadata = chunk_metadata(actor)?;
    let mut tx = pool
        .begin()
        .await
        .map_err(BenchError::db("begin a seed transaction"))?;
    if let Some(settings) = settings {
        sqlx::raw_sql(sqlx::AssertSqlSafe(settings.to_owned()))
            .execute(&mut *tx)
            .await
            .map_err(BenchError::db("set up a seed transaction"))?;
    }
    sqlx::query(
        r#"
        WITH input AS (
            SELECT id, part, $3 || (n - 1 + $4)::text AS title
              FROM UNNEST($1::uuid[], $2::int4[]) WITH ORDINALITY AS u(id, part, n)
        ), new_tasks AS (
            INSERT INTO tasks (task_id, title, description, kind, payload, metadata,
                               priority, partition, status, phase, created_by)
            SELECT id, title, '', $5, 'null'::jsonb, '{}'::jsonb, 0, part, $6, $7, $8
              FROM input
        ), new_heads AS (
            INSERT INTO task_heads (task_id, version, status, phase)
            SELECT id, 1, $6, $7 FROM input
        )
        INSERT INTO events (stream_id, version, type, data, metadata)
        SELECT id, 1, 'task_created', jsonb_set($9::jsonb, '{title}', to_jsonb(title)), $10
          FROM input
        "#,
    )
    .bind(chunk.ids)
    .bind(chunk.partitions)
    .bind(TITLE_PREFIX)
    .bind(chunk.first)
    .bind(KIND)
    .bind(Status::Inactive.as_str())
    .bind(Phase::SpecClarification.as_str())
    .bind(actor)
    .bind(template)
    .bind(metadata)
    .execute(&mut *tx)
    .await
    .map_err(BenchError::db("seed a chunk of tasks"))?;
    tx.commit()
        .await
        .map_err(BenchError::db("commit a chunk of seeded tasks"))
}

/// What a superuser's seed transactions set (see the module docs): `None` for
/// other roles.
async fn superuser_settings(pool: &PgPool) -> Result<Option<String>, BenchError> {
    let (superuser, lz4): (bool, bool) = sqlx::query_as(
        "SELECT current_setting('is_superuser') = 'on', \
                coalesce((SELECT 'lz4' = ANY(enumvals) FROM pg_settings \
                           WHERE name = 'wal_compression'), false)",
    )
    .fetch_one(pool)
    .await
    .map_err(BenchError::db("read the role's and the server's settings"))?;
    Ok(superuser.then(|| {
        let mut settings = String::from("SET LOCAL session_replication_role = replica");
        if lz4 {
            settings.push_str("; SET LOCAL wal_compression = lz4");
        }
        settings
    }))
}

/// One statement's worth of new tasks.
#[derive(Debug, Clone, Copy)]
struct Chunk<'a> {
    ids: &'a [uuid::Uuid],
    partitions: &'a [i32],
    /// The number of the chunk's first task in the whole seed.
    first: i64,
}

/// Seeds `count` inactive `manual` tasks created by `actor`, showing progress.
///
/// # Errors
/// A failed statement (the chunks written before it stay).
pub async fn seed(
    pool: &PgPool,
    scenario: &'static str,
    count: u64,
    actor: &str,
) -> Result<Seeded, BenchError> {
    let partition_count: i32 = sqlx::query_scalar("SELECT partition_count FROM cluster_config")
        .fetch_one(pool)
        .await
        .map_err(BenchError::db("read the partition count"))?;
    let partition_count = u32::try_from(partition_count).unwrap_or(1);
    let settings = superuser_settings(pool).await?;
    let template = created_template()?;
    let total = usize::try_from(count).unwrap_or(usize::MAX);
    let done = Arc::new(AtomicU64::new(0));
    let progress = {
        let done = Arc::clone(&done);
        let started = Instant::now();
        Progress::start(scenario, move || {
            let n = done.load(Ordering::Relaxed);
            format!(
                "seeded {n}/{count} tasks ({:.0}/s)",
                n as f64 / started.elapsed().as_secs_f64().max(1e-3)
            )
        })
    };
    let started = Instant::now();
    let mut ids = Vec::with_capacity(total);
    let mut chunks = Vec::new();
    while ids.len() < total {
        let first = ids.len();
        let size = CHUNK.min(total - first);
        let chunk: Vec<uuid::Uuid> = (0..size).map(|_| TaskId::new().as_uuid()).collect();
        let partitions: Vec<i32> = chunk
            .iter()
            .map(|id| partition_of(TaskId(*id), partition_count) as i32)
            .collect();
        ids.extend_from_slice(&chunk);
        chunks.push((first, chunk, partitions));
    }
    let mut writes = futures::stream::iter(chunks)
        .map(|(first, chunk, partitions)| {
            let (template, settings, done) = (&template, settings.as_deref(), Arc::clone(&done));
            async move {
                let chunk_ref = Chunk {
                    ids: &chunk,
                    partitions: &partitions,
                    first: first as i64,
                };
                insert_chunk(pool, chunk_ref, actor, template, settings).await?;
                done.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                Ok::<_, BenchError>(())
            }
        })
        .buffer_unordered(PARALLEL);
    while let Some(written) = writes.next().await {
        written?;
    }
    drop(writes);
    sqlx::raw_sql("ANALYZE tasks, task_heads, events")
        .execute(pool)
        .await
        .map_err(BenchError::db("analyse the seeded tables"))?;
    progress.finish();
    let elapsed = started.elapsed();
    say(format!(
        "{scenario}: seeded {count} tasks in {:.2}s ({:.0}/s)",
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64().max(1e-3)
    ));
    Ok(Seeded { ids, elapsed })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
    use taskpod_core::domain::filter;
    use taskpod_core::domain::{NewTask, RequestContext, TaskState};
    use taskpod_core::store::{ListQuery, SortDirection, SortField, Store, TaskFilter, TaskOrder};

    const ACTOR: &str = "seed-test";

    /// Everything of a task that is not its own: id, title, times, partition.
    fn shape(task: &taskpod_core::domain::Task) -> serde_json::Value {
        serde_json::json!({
            "description": task.description,
            "kind": task.kind,
            "payload": task.payload,
            "metadata": task.metadata,
            "priority": task.priority,
            "status": task.status.as_str(),
            "phase": task.phase.as_str(),
            "last_error": task.last_error,
            "created_by": task.created_by,
            "version": task.version,
            "pod": task.pod.is_some(),
            "updated_is_created": task.updated_at == task.created_at,
        })
    }

    #[sqlx::test(migrations = "../../migrations")]
    async fn seeded_tasks_read_like_created_ones(_: PgPoolOptions, opts: PgConnectOptions) {
        let pool = PgPoolOptions::new().connect_with(opts).await.unwrap();
        let store = Store::from_pool(pool.clone()).await.unwrap();
        let created = store
            .create_task(&NewTask::new("bench seed made by the API", KIND), &{
                RequestContext::new(ACTOR)
            })
            .await
            .unwrap()
            .task_id()
            .unwrap();
        // Two chunks and a bit, so chunk numbering and the parallel writes are covered.
        let count = CHUNK * 2 + 7;
        let seeded = seed(&pool, "test", count as u64, ACTOR).await.unwrap();
        assert_eq!(seeded.ids.len(), count);
        let mut sorted = seeded.ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), count, "ids are unique");
        assert_eq!(sorted, seeded.ids, "ids are minted in creation order");

        let reference = store.get_task(created).await.unwrap();
        let reference_events = store.read_stream(created, 1, 100).await.unwrap();
        for (n, id) in [(0, seeded.ids[0]), (count - 1, seeded.ids[count - 1])] {
            let id = TaskId(id);
            // GetTask: the same shape as the created task, with its own title.
            let task = store.get_task(id).await.unwrap();
            assert_eq!(shape(&task), shape(&reference));
            assert_eq!(task.title, format!("{TITLE_PREFIX}{n}"));
            assert_eq!(
                task.partition,
                partition_of(id, 256) as i32,
                "partition from the same hash"
            );
            // ListTaskEvents: one task_created like the created task's, its own title.
            let events = store.read_stream(id, 1, 100).await.unwrap();
            assert_eq!(events.len(), reference_events.len());
            let Event::TaskCreated { title, .. } = &events[0].event else {
                panic!("not task_created: {:?}", events[0].event);
            };
            assert_eq!(title, &task.title);
            let mut renamed = reference_events[0].event.clone();
            if let Event::TaskCreated { title: t, .. } = &mut renamed {
                t.clone_from(&task.title);
            }
            assert_eq!(events[0].event, renamed);
            assert_eq!(events[0].metadata.actor_id, ACTOR);
            assert!(!events[0].metadata.correlation_id.is_empty());
            // Replaying the stream gives the head.
            let replayed = TaskState::replay(id, events.iter().map(|e| &e.event)).unwrap();
            assert_eq!(replayed, store.state(id).await.unwrap());
        }

        // ListTasks: every ordering and filter the list bench times sees both kinds.
        for (field, expr) in [
            (SortField::CreatedAt, None),
            (SortField::UpdatedAt, Some("kind = manual")),
            (SortField::Priority, Some("status = inactive")),
            (SortField::CreatedAt, Some("created_by = \"seed-test\"")),
        ] {
            let page = store
                .list_tasks(&ListQuery {
                    filter: TaskFilter {
                        expr: expr.and_then(|e| filter::parse(e).unwrap()),
                        ..TaskFilter::default()
                    },
                    order: TaskOrder {
                        field,
                        direction: SortDirection::Asc,
                    },
                    page_size: 1000,
                    after: None,
                    view: Default::default(),
                })
                .await
                .unwrap();
            assert_eq!(page.tasks.len(), 1000, "{field:?} {expr:?}");
            assert!(page.tasks.iter().all(|t| shape(t) == shape(&reference)));
        }
        let all = store.count_tasks(&TaskFilter::default()).await.unwrap();
        assert_eq!(all, count as i64 + 1);

        // A seeded task takes commands like any other: start it, then cancel it.
        let id = TaskId(seeded.ids[1]);
        let ctx = RequestContext::new(ACTOR);
        store
            .execute(id, &taskpod_core::domain::Command::RequestStart, &ctx)
            .await
            .unwrap();
        let events: Vec<_> = store
            .read_stream(id, 1, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.event)
            .collect();
        assert_eq!(events.len(), 2);
        let replayed = TaskState::replay(id, &events).unwrap();
        assert_eq!(replayed, store.state(id).await.unwrap());
    }
}
