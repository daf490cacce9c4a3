//! Bulk seeding, for benchmarks on big tables (`taskpod bench get|list --seed N`): a
//! million tasks through CreateTasks would take minutes, so their rows are written
//! straight into the tables, in chunks of tens of thousands per statement.
//!
//! A chunk is written as a create writes it: the same rows built from the same
//! [`NewTask`]s (`TaskColumns`) by the same statement (`create::rows`): listing rows,
//! heads and first events, one correlation id per chunk as for one CreateTasks call. What a seed leaves out is what a request
//! needs and a bulk load does not: request ids, the commit-outcome check, the
//! announcement on the bus and the create metrics. So a seeded task reads back, and
//! takes commands, as any created one (`crates/core/tests/store_seed.rs` holds them
//! side by side). Ids are the caller's, minted in creation order as the store mints
//! them ([`TaskId::new`]); the caller chunks, runs chunks in parallel and shows
//! progress.
//!
//! As a superuser a chunk's transaction compresses the full-page images in the WAL
//! (`wal_compression = lz4`, where the server has it): a million tasks write gigabytes
//! of WAL, and checkpoints come round several times. Durability is untouched. Nothing
//! else is switched off: the schema has no trigger or foreign key between the rows a
//! chunk writes (the heads' key to their listing row, 40 % of a seed's time, was
//! dropped), and one added later is checked here as on every create.
//!
//! Like `store::inspect`'s, these statements are a tool's, not a request's: only the
//! insert is traced and bounded by the call limit, as every create's is.

use sqlx::PgPool;

use super::rows::{Origin, TaskColumns, insert};
use crate::domain::validation::{validate_context, validate_new_task};
use crate::domain::{NewTask, RequestContext, TaskId};
use crate::error::Error;
use crate::store::errors::from_sqlx;

/// Writes chunks of new tasks into one database.
#[derive(Clone, Debug)]
pub struct Seeder {
    pool: PgPool,
    partition_count: u32,
    /// What each chunk's transaction sets first (see the module docs); `None` for
    /// roles other than a superuser, and servers without lz4.
    bulk_settings: Option<String>,
}

impl Seeder {
    /// Reads the partition count, and what the connecting role may switch off.
    ///
    /// # Errors
    /// When the database cannot be read (or is not migrated).
    pub async fn new(pool: &PgPool) -> Result<Self, Error> {
        let partition_count: i32 = sqlx::query_scalar("SELECT partition_count FROM cluster_config")
            .fetch_one(pool)
            .await
            .map_err(from_sqlx)?;
        let partition_count = u32::try_from(partition_count)
            .map_err(|_| Error::Internal(format!("bad partition_count {partition_count}")))?;
        let (superuser, lz4): (bool, bool) = sqlx::query_as(
            "SELECT current_setting('is_superuser') = 'on', \
                    coalesce((SELECT 'lz4' = ANY(enumvals) FROM pg_settings \
                               WHERE name = 'wal_compression'), false)",
        )
        .fetch_one(pool)
        .await
        .map_err(from_sqlx)?;
        let bulk_settings =
            (superuser && lz4).then(|| "SET LOCAL wal_compression = lz4".to_owned());
        Ok(Self {
            pool: pool.clone(),
            partition_count,
            bulk_settings,
        })
    }

    /// Whether chunks compress the WAL (as a superuser; see the module docs).
    pub fn bulk_load(&self) -> bool {
        self.bulk_settings.is_some()
    }

    /// Writes `tasks` under `ids` (one each, in order) in one transaction, created by
    /// `ctx` as one create request.
    ///
    /// # Errors
    /// A task or context the API would refuse; a failed statement (nothing of the
    /// chunk is written).
    pub async fn write(
        &self,
        ids: &[TaskId],
        tasks: &[NewTask],
        ctx: &RequestContext,
    ) -> Result<(), Error> {
        if ids.len() != tasks.len() {
            return Err(Error::invalid(
                "ids",
                format!("{} ids for {} tasks", ids.len(), tasks.len()),
            ));
        }
        validate_context(ctx)?;
        for task in tasks {
            validate_new_task(task)?;
        }
        let origin = Origin::of(ctx)?;
        let rows = TaskColumns::build(
            ids.iter().zip(tasks).map(|(id, task)| (*id, task, &origin)),
            self.partition_count,
        )?;
        let mut tx = self.pool.begin().await.map_err(from_sqlx)?;
        if let Some(settings) = &self.bulk_settings {
            sqlx::raw_sql(sqlx::AssertSqlSafe(settings.clone()))
                .execute(&mut *tx)
                .await
                .map_err(from_sqlx)?;
        }
        insert(&mut tx, &rows).await?;
        tx.commit().await.map_err(from_sqlx)
    }

    /// Analyses the tables a seed wrote, as autovacuum would a little later, so the
    /// first reads are planned on their real size.
    ///
    /// # Errors
    /// When the statement fails.
    pub async fn analyze(&self) -> Result<(), Error> {
        sqlx::raw_sql("ANALYZE tasks, task_heads, events")
            .execute(&self.pool)
            .await
            .map_err(from_sqlx)?;
        Ok(())
    }
}
