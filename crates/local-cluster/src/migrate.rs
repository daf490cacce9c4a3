//! Brings a database to the schema this binary was built with: `taskpod migrate` on
//! any database, and the first step of `taskpod dev` and `taskpod bench --dev` on the
//! one they start.
//!
//! It connects with a pool of its own rather than through `Store::connect`, because the
//! store reads cluster constants that exist only after the first migration, and because
//! the store's statement timeout is sized for requests, not for schema changes.

use std::fmt;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection as _, PgConnection, PgPool};
use taskpod_core::store::{MIGRATOR, Store};

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("invalid database url")]
    InvalidUrl(#[source] sqlx::Error),
    #[error("could not connect to the database")]
    Connect(#[source] sqlx::Error),
    #[error("could not read which migrations are applied")]
    Inspect(#[source] sqlx::Error),
    #[error("could not apply the migrations")]
    Apply(#[source] taskpod_core::Error),
    #[error("could not create the event partitions")]
    Partitions(#[source] taskpod_core::Error),
}

/// What a migration run changed, printed by both `migrate` and `dev`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrateReport {
    pub newly_applied: i64,
    /// The newest migration this binary knows, which the database is now at.
    pub schema_version: i64,
    pub partitions_created: i32,
}

impl fmt::Display for MigrateReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let applied = match self.newly_applied {
            0 => "no new migrations".to_owned(),
            1 => "1 migration applied".to_owned(),
            n => format!("{n} migrations applied"),
        };
        write!(
            f,
            "schema at version {} ({applied}), {} event partitions created",
            self.schema_version, self.partitions_created
        )
    }
}

/// Applies every pending migration, then makes sure the coming months have events
/// partitions (migrations create them once; later runs keep the window moving).
///
/// # Errors
/// When the URL is invalid, Postgres is unreachable, or a migration fails.
pub async fn run(database_url: &str) -> Result<MigrateReport, MigrateError> {
    let options: PgConnectOptions = database_url.parse().map_err(MigrateError::InvalidUrl)?;
    let options = options.application_name("taskpod-migrate");
    // A pool reports an unreachable server only as "timed out" after its acquire
    // timeout; one plain connection first fails at once, with the real reason.
    PgConnection::connect_with(&options)
        .await
        .map_err(MigrateError::Connect)?
        .close()
        .await
        .map_err(MigrateError::Connect)?;
    let pool = PgPoolOptions::new()
        // The migrator holds one connection (and its advisory lock); one more lets the
        // bookkeeping queries run beside it.
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(MigrateError::Connect)?;
    let report = migrate(&pool).await;
    pool.close().await;
    report
}

async fn migrate(pool: &PgPool) -> Result<MigrateReport, MigrateError> {
    let before = applied_count(pool).await?;
    Store::migrate(pool).await.map_err(MigrateError::Apply)?;
    let after = applied_count(pool).await?;
    let store = Store::from_pool(pool.clone())
        .await
        .map_err(MigrateError::Apply)?;
    let partitions_created = store
        .ensure_event_partitions()
        .await
        .map_err(MigrateError::Partitions)?;
    Ok(MigrateReport {
        newly_applied: after - before,
        schema_version: MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0),
        partitions_created,
    })
}

/// Counts successful migrations in sqlx's bookkeeping table, which a fresh database
/// does not have yet.
async fn applied_count(pool: &PgPool) -> Result<i64, MigrateError> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await
        .map_err(MigrateError::Inspect)?;
    if !exists {
        return Ok(0);
    }
    sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(pool)
        .await
        .map_err(MigrateError::Inspect)
}
