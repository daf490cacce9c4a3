//! `--seed N`: a big table in bulk, written straight into the tables rather than
//! through the API.
//!
//! CreateTasks makes about 10,000 tasks a second here, so a table of a million would
//! take minutes. The store's bulk writer (`store::seed`) writes a chunk of tasks as its
//! create path does, in one statement: the listing rows, the heads at version 1 and the
//! `task_created` events (`crates/core/tests/store_seed.rs` holds GetTask, ListTasks,
//! the stream and its replay of seeded tasks to those of a created one). What is left
//! here is the orchestration: inactive `manual` tasks titled `bench seed <n>`, ids
//! minted in creation order as the store mints them, [`CHUNK`] tasks per statement, one
//! correlation id per chunk (as for one CreateTasks call), two chunks written at once
//! (one per core), each its own transaction, progress on stderr, and the tables
//! analysed at the end, as autovacuum would do a little later. As a superuser (`--dev`
//! is one) the writer also compresses the WAL; see `store::seed`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use sqlx::PgPool;
use taskpod_core::domain::{NewTask, RequestContext, TaskId};
use taskpod_core::store::seed::Seeder;
use tokio::time::Instant;

use super::BenchError;
use super::progress::{Progress, say};

/// Tasks per statement: large enough that per-statement costs vanish, small enough
/// that a chunk's arrays stay a few megabytes.
pub const CHUNK: usize = 20_000;
/// Chunks written at once.
const PARALLEL: usize = 2;
/// The kind of every seeded task.
const KIND: &str = "manual";
/// Titles are `"<prefix><n>"`, numbered from 0 across the whole seed.
const TITLE_PREFIX: &str = "bench seed ";

/// What a seed wrote.
#[derive(Debug)]
pub struct Seeded {
    /// In creation order.
    pub ids: Vec<uuid::Uuid>,
    pub elapsed: Duration,
}

/// Writes one chunk: the tasks numbered from `first`, under `ids`.
async fn write_chunk(
    seeder: &Seeder,
    ids: &[TaskId],
    first: usize,
    actor: &str,
) -> Result<(), BenchError> {
    let tasks: Vec<NewTask> = (first..first + ids.len())
        .map(|n| NewTask::new(format!("{TITLE_PREFIX}{n}"), KIND))
        .collect();
    // One correlation id for the chunk: the store mints one per request, and a chunk
    // stands for one CreateTasks call.
    let ctx = RequestContext::new(actor).with_correlation_id(uuid::Uuid::new_v4().to_string());
    seeder
        .write(ids, &tasks, &ctx)
        .await
        .map_err(BenchError::store("seed a chunk of tasks"))
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
    let seeder = Seeder::new(pool).await.map_err(BenchError::store(
        "read the partition count and the role's settings",
    ))?;
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
    let ids: Vec<TaskId> = (0..total).map(|_| TaskId::new()).collect();
    let mut writes = futures::stream::iter(ids.chunks(CHUNK).enumerate())
        .map(|(n, chunk)| {
            let (seeder, done) = (&seeder, Arc::clone(&done));
            async move {
                write_chunk(seeder, chunk, n * CHUNK, actor).await?;
                done.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                Ok::<_, BenchError>(())
            }
        })
        .buffer_unordered(PARALLEL);
    while let Some(written) = writes.next().await {
        written?;
    }
    drop(writes);
    seeder
        .analyze()
        .await
        .map_err(BenchError::store("analyse the seeded tables"))?;
    progress.finish();
    let elapsed = started.elapsed();
    say(format!(
        "{scenario}: seeded {count} tasks in {:.2}s ({:.0}/s)",
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64().max(1e-3)
    ));
    Ok(Seeded {
        ids: ids.iter().map(TaskId::as_uuid).collect(),
        elapsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
    use taskpod_core::store::{ListQuery, SortDirection, SortField, Store, TaskFilter, TaskOrder};

    /// The orchestration: chunks in parallel, numbered across the seed, ids in creation
    /// order. That a seeded task reads like a created one is the store's test
    /// (`crates/core/tests/store_seed.rs`).
    #[sqlx::test(migrations = "../../migrations")]
    async fn a_seed_numbers_its_tasks_across_parallel_chunks(
        _: PgPoolOptions,
        opts: PgConnectOptions,
    ) {
        let pool = PgPoolOptions::new().connect_with(opts).await.unwrap();
        // Two chunks and a bit, so chunk numbering and the parallel writes are covered.
        let count = CHUNK * 2 + 7;
        let seeded = seed(&pool, "test", count as u64, "seed-test")
            .await
            .unwrap();
        assert_eq!(seeded.ids.len(), count);
        let mut sorted = seeded.ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), count, "ids are unique");
        assert_eq!(sorted, seeded.ids, "ids are minted in creation order");

        let store = Store::from_pool(pool).await.unwrap();
        for n in [0, CHUNK - 1, CHUNK, count - 1] {
            let task = store.get_task(TaskId(seeded.ids[n])).await.unwrap();
            assert_eq!(task.title, format!("{TITLE_PREFIX}{n}"));
            assert_eq!(
                (task.kind.as_str(), task.created_by.as_str()),
                (KIND, "seed-test")
            );
        }
        let first_chunk = store
            .read_stream(TaskId(seeded.ids[0]), 1, 1)
            .await
            .unwrap();
        let same_chunk = store
            .read_stream(TaskId(seeded.ids[CHUNK - 1]), 1, 1)
            .await
            .unwrap();
        let next_chunk = store
            .read_stream(TaskId(seeded.ids[CHUNK]), 1, 1)
            .await
            .unwrap();
        let correlation =
            |e: &[taskpod_core::store::RecordedEvent]| e[0].metadata.correlation_id.clone();
        assert_eq!(
            correlation(&first_chunk),
            correlation(&same_chunk),
            "one per chunk"
        );
        assert_ne!(correlation(&first_chunk), correlation(&next_chunk));
        let page = store
            .list_tasks(&ListQuery {
                filter: TaskFilter::default(),
                order: TaskOrder {
                    field: SortField::CreatedAt,
                    direction: SortDirection::Asc,
                },
                page_size: 10,
                after: None,
                view: Default::default(),
            })
            .await
            .unwrap();
        assert_eq!(page.tasks.len(), 10);
        assert_eq!(
            store.count_tasks(&TaskFilter::default()).await.unwrap(),
            count as i64
        );
    }
}
