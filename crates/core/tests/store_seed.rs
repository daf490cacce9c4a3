//! Bulk seeding (`store::seed`) and `bench limit`'s create shape (`store::shapes`):
//! both write what a create writes, and these tests hold them to it.
#![allow(clippy::unwrap_used)]

mod common;

use common::store;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use taskpod_core::domain::partition::partition_of;
use taskpod_core::domain::{Command, Event, NewTask, RequestContext, TaskId, TaskState, filter};
use taskpod_core::store::seed::Seeder;
use taskpod_core::store::{
    ListQuery, SortDirection, SortField, Store, TaskFilter, TaskOrder, shapes,
};

const ACTOR: &str = "seed-test";
const KIND: &str = "manual";

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

/// Seeds `count` tasks titled `seeded <n>` in chunks of `chunk`, as the bench does:
/// ids minted in creation order, one correlation id per chunk.
async fn seed(seeder: &Seeder, count: usize, chunk: usize) -> Vec<TaskId> {
    let ids: Vec<TaskId> = (0..count).map(|_| TaskId::new()).collect();
    for (n, part) in ids.chunks(chunk).enumerate() {
        let tasks: Vec<NewTask> = (0..part.len())
            .map(|i| NewTask::new(format!("seeded {}", n * chunk + i), KIND))
            .collect();
        let ctx = RequestContext::new(ACTOR).with_correlation_id(uuid::Uuid::new_v4().to_string());
        seeder.write(part, &tasks, &ctx).await.unwrap();
    }
    seeder.analyze().await.unwrap();
    ids
}

#[sqlx::test(migrations = "../../migrations")]
async fn seeded_tasks_read_like_created_ones(_: PgPoolOptions, opts: PgConnectOptions) {
    let store = store(opts).await;
    let created = store
        .create_task(
            &NewTask::new("seeded by the API", KIND),
            &RequestContext::new(ACTOR),
        )
        .await
        .unwrap()
        .task_id()
        .unwrap();
    let seeder = Seeder::new(store.pool()).await.unwrap();
    assert!(
        seeder.bulk_load(),
        "the test server's role is a superuser, and its Postgres has lz4"
    );
    // Two chunks and a bit.
    let count = 2 * 1500 + 7;
    let ids = seed(&seeder, count, 1500).await;

    let reference = store.get_task(created).await.unwrap();
    let reference_events = store.read_stream(created, 1, 100).await.unwrap();
    for (n, id) in [(0, ids[0]), (count - 1, ids[count - 1])] {
        // GetTask: the same shape as the created task, with its own title.
        let task = store.get_task(id).await.unwrap();
        assert_eq!(shape(&task), shape(&reference));
        assert_eq!(task.title, format!("seeded {n}"));
        assert_eq!(
            task.partition,
            partition_of(id, store.partition_count()) as i32,
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

    // A seeded task takes commands like any other: start it.
    let id = ids[1];
    store
        .execute(id, &Command::RequestStart, &RequestContext::new(ACTOR))
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

#[sqlx::test(migrations = "../../migrations")]
async fn a_chunk_is_written_whole_or_not_at_all(_: PgPoolOptions, opts: PgConnectOptions) {
    let store = store(opts).await;
    let seeder = Seeder::new(store.pool()).await.unwrap();
    let ctx = RequestContext::new(ACTOR);
    let first = TaskId::new();
    seeder
        .write(&[first], &[NewTask::new("one", KIND)], &ctx)
        .await
        .unwrap();
    // The second chunk repeats the first id: nothing of it is written.
    let fresh = TaskId::new();
    let tasks = [NewTask::new("two", KIND), NewTask::new("three", KIND)];
    assert!(seeder.write(&[fresh, first], &tasks, &ctx).await.is_err());
    assert!(store.get_task(fresh).await.is_err());
    // What the API refuses, a seed refuses too.
    let err = seeder
        .write(&[TaskId::new()], &[NewTask::new("", KIND)], &ctx)
        .await
        .unwrap_err();
    assert_eq!(err.field(), Some("title"), "{err}");
    assert!(
        seeder.write(&[fresh], &tasks, &ctx).await.is_err(),
        "one id, two tasks"
    );
    assert_eq!(store.count_tasks(&TaskFilter::default()).await.unwrap(), 1);
}

/// Columns that differ between any two tasks (ids, times, the transaction), left out
/// of the comparison; every other column, present or future, must be equal.
const OWN: &str = "- 'task_id' - 'stream_id' - 'created_at' - 'updated_at' - 'recorded_at' \
                   - 'tx_id' - 'partition'";

async fn rows(store: &Store, schema: &str, id: uuid::Uuid) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for (table, key) in [
        ("tasks", "task_id"),
        ("task_heads", "task_id"),
        ("events", "stream_id"),
    ] {
        let sql =
            format!("SELECT to_jsonb(r) {OWN} FROM {schema}.{table} r WHERE {key} = $1 ORDER BY 1");
        let found: Vec<serde_json::Value> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_all(store.pool())
            .await
            .unwrap();
        out.push(serde_json::json!({ table: found }));
    }
    out
}

#[sqlx::test(migrations = "../../migrations")]
async fn limits_create_shape_writes_what_the_store_writes(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    let created = store
        .create_task(
            &NewTask::new("limit", "manual"),
            &RequestContext::new(shapes::ACTOR)
                .with_correlation_id("6f1c1d3e-8a53-4c4e-9a3c-2f0f5b1e7a10"),
        )
        .await
        .unwrap()
        .task_id()
        .unwrap();
    sqlx::raw_sql(shapes::SETUP)
        .execute(store.pool())
        .await
        .unwrap();
    // The copies have what LIKE leaves out, as the migrations left our tables.
    for table in ["tasks", "task_heads"] {
        let catalog = |schema: &str| {
            let sql = format!(
                "SELECT coalesce(array_to_string(c.reloptions, ','), '') || ' fks: ' || \
                        (SELECT count(*) FROM pg_constraint k \
                          WHERE k.conrelid = c.oid AND k.contype = 'f') \
                   FROM pg_class c WHERE c.oid = '{schema}.{table}'::regclass"
            );
            sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql)).fetch_one(store.pool())
        };
        assert_eq!(
            catalog("taskpod_limit").await.unwrap(),
            catalog("public").await.unwrap(),
            "{table}"
        );
    }
    // Each script as pgbench runs it, its variable set as `\set` would.
    for shape in shapes::shapes().unwrap() {
        let sql: String = shape
            .script
            .lines()
            .filter(|l| !l.starts_with('\\'))
            .collect::<Vec<_>>()
            .join("\n")
            .replace(":r", "4242");
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(store.pool())
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", shape.name));
    }
    let scratch: uuid::Uuid = sqlx::query_scalar("SELECT task_id FROM taskpod_limit.tasks")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(
        rows(&store, "taskpod_limit", scratch).await,
        rows(&store, "public", created.as_uuid()).await
    );
    sqlx::raw_sql(shapes::TEARDOWN)
        .execute(store.pool())
        .await
        .unwrap();
}
