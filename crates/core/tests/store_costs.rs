//! What the batched statements cost Postgres per row, counted in buffers (shared blocks
//! hit or read, from `pg_stat_statements`): a plan that joins two batches with each
//! other instead of each row with its index grows with the square of the batch, and
//! such a plan is invisible to every functional test. Counts, never timings.
//!
//! Needs a server with `shared_preload_libraries = pg_stat_statements`, as the test
//! script starts it (`scripts/test.sh`).
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic to fail the test

mod common;

use std::collections::HashMap;

use common::{ctx, live_node, store};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use taskpod_core::domain::{Command, NewTask, Phase, TaskId};
use taskpod_core::store::seed::Seeder;
use taskpod_core::store::{
    ListQuery, MintRequest, SortDirection, SortField, Store, TaskOrder, View,
};

/// What every call of the statement whose text contains `marker` cost in this test's
/// database, summed.
struct Cost {
    buffers: f64,
    wal_records: f64,
    rows: i64,
}

async fn cost(store: &Store, marker: &str) -> Cost {
    let (calls, buffers, wal_records, rows): (Option<i64>, Option<f64>, Option<f64>, Option<i64>) =
        sqlx::query_as(
            "SELECT sum(calls)::int8, sum(shared_blks_hit + shared_blks_read)::float8, \
                sum(wal_records)::float8, sum(rows)::int8 \
           FROM pg_stat_statements \
          WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
            AND strpos(query, $1) > 0",
        )
        .bind(marker)
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert!(
        calls.unwrap_or(0) > 0,
        "no statement with {marker:?} was recorded"
    );
    Cost {
        buffers: buffers.unwrap_or(0.0),
        wal_records: wal_records.unwrap_or(0.0),
        rows: rows.unwrap_or(0),
    }
}

async fn track_statements(store: &Store) {
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(store.pool())
        .await
        .expect(
            "pg_stat_statements: start the test Postgres with \
             shared_preload_libraries=pg_stat_statements (scripts/test.sh does)",
        );
}

/// Writes `thousands` x 1,000 inactive tasks of `kind` in bulk.
async fn seed(store: &Store, thousands: usize, kind: &str) {
    let seeder = Seeder::new(store.pool()).await.unwrap();
    for chunk in 0..thousands {
        let ids: Vec<TaskId> = (0..1_000).map(|_| TaskId::new()).collect();
        let tasks: Vec<NewTask> = (0..1_000)
            .map(|i| NewTask::new(format!("seeded {chunk}/{i}"), kind))
            .collect();
        seeder.write(&ids, &tasks, &ctx("seed")).await.unwrap();
    }
}

/// A worker's mint of 512 pods, as its controller sends them (every partition of the
/// node claimed). The mint once joined the batch with the node's partitions on the
/// claim generation (equal for all of them) before looking the tasks up: 512 x 256
/// index probes, about 1,500 buffers a pod, a third of Postgres's work in the e2e bench.
#[sqlx::test(migrations = "../../migrations")]
async fn regression_minting_a_batch_costs_a_bounded_number_of_buffers_per_pod(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    track_statements(&store).await;
    let node = live_node(&store).await;
    let tasks: Vec<NewTask> = (0..512)
        .map(|i| NewTask {
            auto_start: true,
            ..NewTask::new(format!("task {i}"), "sleep")
        })
        .collect();
    let created = store.create_tasks(&tasks, &ctx("alice")).await.unwrap();
    let mut generations = HashMap::new();
    for p in 0..i32::try_from(store.partition_count()).unwrap() {
        generations.insert(p, store.claim_partition(p, node.id).await.unwrap());
    }
    let mut wanted = Vec::new();
    for &task_id in &created.task_ids {
        let partition = store.get_task(task_id).await.unwrap().partition;
        wanted.push(MintRequest {
            task_id,
            observed_epoch: 0,
            generation: generations[&partition],
        });
    }

    let minted = store.mint_pods(node.id, &wanted).await.unwrap();

    assert_eq!(minted.len(), 512, "every pod minted");
    let mint = cost(&store, "FOR SHARE OF p").await;
    assert_eq!(mint.rows, 512);
    let per_pod = mint.buffers / 512.0;
    assert!(
        per_pod < 40.0,
        "minting touched {per_pod:.0} buffers a pod (about 20 since the fix, 787 before)"
    );
}

/// CreateTasks of 1000: the listing row with its indexes, the head, the first event.
#[sqlx::test(migrations = "../../migrations")]
async fn a_batch_create_costs_a_bounded_number_of_buffers_per_task(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    track_statements(&store).await;
    let tasks: Vec<NewTask> = (0..1000)
        .map(|i| NewTask::new(format!("task {i}"), "sleep"))
        .collect();
    for _ in 0..3 {
        store.create_tasks(&tasks, &ctx("alice")).await.unwrap();
    }
    let create = cost(&store, "new_tasks AS").await;
    let (per_task, wal_per_task) = (create.buffers / 3000.0, create.wal_records / 3000.0);
    println!(
        "a create touched {per_task:.1} buffers and wrote {wal_per_task:.1} WAL records a task"
    );
    // 22 buffers and 13 WAL records: three rows and twelve index entries. The head's
    // foreign key added 5 buffers and a WAL record (the listing row locked again); the
    // listing's three plain ordering indexes 6 buffers and 3 records (28 and 16).
    assert!(
        per_task < 25.0 && wal_per_task < 14.0,
        "a create touched {per_task:.1} buffers and wrote {wal_per_task:.1} WAL records a task"
    );
}

/// A worker's tick over the change feed after 1000 inactive tasks were created reads
/// none of their rows: they can matter to no worker. Each of them once cost every
/// worker's tick a lookup of the listing row and the head (3 buffers a task here, 6 in
/// the batch-create bench, where it was a fifth of Postgres's buffers).
#[sqlx::test(migrations = "../../migrations")]
async fn regression_a_tick_over_inactive_creates_reads_no_task_rows(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    track_statements(&store).await;
    let node = live_node(&store).await;
    let tasks: Vec<NewTask> = (0..1000)
        .map(|i| NewTask::new(format!("task {i}"), "sleep"))
        .collect();
    // A table of some size, analysed, so that the plan probes the indexes as it does
    // on a real cluster (on a tiny one it scans whole tables and costs nothing).
    for _ in 0..10 {
        store.create_tasks(&tasks, &ctx("alice")).await.unwrap();
    }
    sqlx::query("ANALYZE").execute(store.pool()).await.unwrap();
    let from = store.watermark().await.unwrap();
    store.create_tasks(&tasks, &ctx("alice")).await.unwrap();
    let to = store.watermark().await.unwrap();
    assert!(to > from);
    let all: Vec<i32> = (0..i32::try_from(store.partition_count()).unwrap()).collect();

    let changed = store
        .changed_candidates(node.id, &all, from, to)
        .await
        .unwrap();

    assert!(changed.is_empty());
    // The feed's bounds are $3 and $4 only in this statement (changed_candidates).
    let tick = cost(&store, "tx_id < $4::text::xid8").await;
    assert_eq!(tick.rows, 0);
    let per_task = tick.buffers / 1000.0;
    assert!(
        per_task < 1.0,
        "the tick touched {per_task:.1} buffers per created task"
    );
}

/// A worker's full check, on a store whose tables were never analyzed (a fresh deploy,
/// a bulk load faster than autovacuum): it asked for live pods as `pod_state <> 'none'`,
/// which the planner, without statistics, takes for nearly every row, and read
/// `tasks` and `task_heads` in full on every check (290 ms at 600k tasks in the batch
/// create bench, a quarter of Postgres's time). The live-pods index serves it now,
/// whatever the statistics say.
#[sqlx::test(migrations = "../../migrations")]
async fn regression_a_full_check_reads_no_table_in_full_before_the_first_analyze(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    track_statements(&store).await;
    sqlx::raw_sql(
        "ALTER TABLE tasks SET (autovacuum_enabled = false); \
         ALTER TABLE task_heads SET (autovacuum_enabled = false)",
    )
    .execute(store.pool())
    .await
    .unwrap();
    seed(&store, 100, "sleep").await;
    let node = live_node(&store).await;
    let partitions: Vec<i32> = (0..16).collect();
    let found = store
        .pod_candidates(node.id, &partitions, &[])
        .await
        .unwrap();
    assert!(found.is_empty(), "no task is active, no pod lives");
    let check = cost(&store, "AND t.partition = ANY($2)) OR t.task_id = ANY($3)").await;
    // The indexes: a few dozen buffers. Either table in full: hundreds.
    assert!(
        check.buffers < 200.0,
        "a full check of 16 partitions with no live pod touched {} buffers over 100,000 tasks",
        check.buffers
    );
}

/// A lifecycle change (TransitionPhase of 300 manual tasks, one call each): the event
/// and its two index entries, the head's HOT update, and the listing row rewritten with
/// an entry in each of its indexes (never HOT: `updated_at` is indexed). The rewrite is
/// most of it, so every listing index is paid for on every lifecycle change; the three
/// plain ordering indexes dropped by migrations 20261208000001-3 were three of its
/// records.
#[sqlx::test(migrations = "../../migrations")]
async fn a_lifecycle_change_costs_a_bounded_number_of_wal_records(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    track_statements(&store).await;
    let mut tasks = Vec::new();
    for _ in 0..300 {
        tasks.push(common::create(&store, "manual").await);
    }
    for task in &tasks {
        store
            .execute(
                *task,
                &Command::TransitionPhase {
                    to: Phase::Planning,
                },
                &ctx("alice"),
            )
            .await
            .unwrap();
    }
    let change = cost(&store, "UPDATE tasks t").await;
    assert_eq!(change.rows, 300, "one statement a change");
    let wal_per_change = change.wal_records / 300.0;
    // 12.3 records; 15.3 with the three plain ordering indexes.
    assert!(
        wal_per_change < 13.0,
        "a lifecycle change wrote {wal_per_change:.1} WAL records"
    );
}

/// A ListTasks page of 100 over 50,000 tasks, in every ordering: the page merges one
/// ordered walk per status, and reads about as many rows as it returns. Written first as
/// a plain `UNION ALL` of the statuses, Postgres could not read the branches in index
/// order (a branch with a WHERE is planned on its own) and sorted the whole table for
/// each page: a second a page at a million rows.
#[sqlx::test(migrations = "../../migrations")]
async fn a_listing_page_reads_about_the_rows_it_returns(_: PgPoolOptions, opts: PgConnectOptions) {
    let store = store(opts).await;
    track_statements(&store).await;
    seed(&store, 50, "manual").await;
    sqlx::raw_sql("ANALYZE tasks; ANALYZE task_heads")
        .execute(store.pool())
        .await
        .unwrap();
    let mut pages = 0;
    for field in [
        SortField::CreatedAt,
        SortField::UpdatedAt,
        SortField::Priority,
    ] {
        for direction in [SortDirection::Asc, SortDirection::Desc] {
            let mut query = ListQuery {
                order: TaskOrder { field, direction },
                page_size: 100,
                view: View::Basic,
                ..ListQuery::default()
            };
            for _ in 0..2 {
                let page = store.list_tasks(&query).await.unwrap();
                assert_eq!(page.tasks.len(), 100);
                query.after = page.next;
                pages += 1;
            }
        }
    }
    let list = cost(&store, "UNION ALL").await;
    let per_page = list.buffers / f64::from(pages);
    // 322: a hundred rows, their heads and the index pages. The whole table: 26,208.
    assert!(
        per_page < 600.0,
        "a page of 100 touched {per_page:.0} buffers over 50,000 tasks"
    );
}
