//! The Postgres event store: task streams, heads and listing rows.
//!
//! Every change is one transaction that locks the task's head row, decides with the
//! shared domain functions, appends events and updates the head (and the listing row on
//! lifecycle changes). See docs/architecture.md ("Storage") for the tables.
//!
//! Layout:
//! - [`settings`]: connection and pool settings;
//! - `errors`: the one place SQLSTATEs and driver errors become domain errors;
//! - `rows`: row <-> domain conversions;
//! - `writes`: the statement every change shares (events + head + listing row);
//! - `traced`: the client span and duration metric around every statement;
//! - [`create`], [`execute`], [`append`]: the three ways a stream grows; beside the
//!   create, [`seed`] (bulk seeding for benchmarks) and [`shapes`] (`bench limit`'s
//!   pgbench scripts, built from the create statement);
//! - [`keys`]: the advisory-lock key scheme, and the node-liveness fence in SQL;
//! - [`mint`]: pod epochs, minted in batches;
//! - `idempotency`: AIP-155 request ids;
//! - `commit`: learning the outcome of a COMMIT whose answer was lost;
//! - [`query`]: get, list (keyset pages), count, read a stream;
//! - `changes`: commit-order-safe change feeds (watermarks) for watch streams;
//! - [`nodes`]: worker membership, partition rows, the per-tick pod check;
//! - [`crashes`]: crash records and the restart decision;
//! - [`checkpoint`]: handler state saved on the head, fenced by epoch and node;
//! - [`inspect`]: read-only diagnostics for benchmarks and tests (trails, pods per
//!   node, locks, the database's clock).

pub mod append;
mod changes;
pub mod checkpoint;
mod commit;
mod committed;
pub mod crash_batch;
pub mod crashes;
pub mod create;
mod deadline;
mod errors;
pub mod execute;
mod idempotency;
pub mod inspect;
pub mod keys;
pub mod mint;
pub mod nodes;
pub mod output;
mod prune;
pub mod query;
mod rows;
pub mod settings;
mod traced;
mod writes;

use std::time::Duration;

use sqlx::Connection as _;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tracing::instrument;

pub use append::{AppendFence, Appended, PodAppend};
pub use committed::Committed;
pub use create::Created;
pub use create::{seed, shapes};
pub use execute::Executed;
pub use mint::{MintRequest, MintedPod};
pub use query::{
    Cursor, ListQuery, Page, RecordedEvent, SortDirection, SortField, SortKey, TaskFilter,
    TaskOrder, View,
};
pub use settings::{Secret, StoreSettings};

use crate::bus::Publisher;
use crate::error::Error;
use traced::Traced as _;

/// The client-side bound on one store call in this process (see `deadline`).
pub fn call_limit() -> Duration {
    deadline::call_limit()
}

/// The migrations under `migrations/` at the repository root, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// A handle on the Postgres store. Cheap to clone: it is a pool plus constants.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    /// Fixed at the first migration; every task's partition is a hash over it.
    partition_count: u32,
    /// Where every write announces what it committed (disabled: nowhere).
    bus: Publisher,
}

impl Store {
    /// Connects a pool with the settings' timeouts and reads the cluster constants.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`] when Postgres cannot be reached within the acquire
    /// timeout, or the schema is not migrated.
    #[instrument(skip_all)]
    pub async fn connect(settings: &StoreSettings) -> Result<Self, Error> {
        deadline::set_call_limit(settings.call_limit());
        let pool = pool_options(settings)
            .connect_with(connect_options(settings)?)
            .await
            .map_err(errors::from_sqlx)?;
        Self::from_pool(pool).await
    }

    /// Wraps an existing pool (tests get one per database from `#[sqlx::test]`).
    ///
    /// # Errors
    /// When the cluster constants cannot be read (not migrated, or unreachable).
    pub async fn from_pool(pool: PgPool) -> Result<Self, Error> {
        let count: i32 = sqlx::query_scalar("SELECT partition_count FROM cluster_config")
            .fetch_one(&pool)
            .traced("SELECT cluster_config")
            .await
            .map_err(errors::from_sqlx)?;
        let partition_count = u32::try_from(count)
            .map_err(|_| Error::Internal(format!("bad partition_count {count}")))?;
        Ok(Self {
            pool,
            partition_count,
            bus: Publisher::disabled(),
        })
    }

    /// The same store, announcing every committed change on `bus` after its commit.
    #[must_use]
    pub fn with_bus(mut self, bus: Publisher) -> Self {
        self.bus = bus;
        self
    }

    /// A store whose pool connects on first use, so an unreachable Postgres shows as
    /// [`Error::StoreUnavailable`] on each call rather than at start-up. The partition
    /// count is taken on trust.
    ///
    /// # Errors
    /// When the settings do not form a valid connection.
    pub fn connect_lazy(settings: &StoreSettings, partition_count: u32) -> Result<Self, Error> {
        deadline::set_call_limit(settings.call_limit());
        let pool = pool_options(settings).connect_lazy_with(connect_options(settings)?);
        Ok(Self {
            pool,
            partition_count,
            bus: Publisher::disabled(),
        })
    }

    /// Applies every pending migration.
    ///
    /// # Errors
    /// When a migration fails or Postgres is unreachable.
    #[instrument(skip_all)]
    pub async fn migrate(pool: &PgPool) -> Result<(), Error> {
        MIGRATOR
            .run(pool)
            .await
            .map_err(|e| Error::StoreUnavailable(format!("migration failed: {e}")))
    }

    /// Creates the monthly events partitions around now that do not exist yet. Binaries
    /// run it at start-up; it is cheap when there is nothing to do.
    ///
    /// # Errors
    /// When Postgres refuses (for example a month already present in the default).
    pub async fn ensure_event_partitions(&self) -> Result<i32, Error> {
        sqlx::query_scalar("SELECT taskpod_ensure_event_partitions(1, 12)")
            .fetch_one(&self.pool)
            .traced("SELECT taskpod_ensure_event_partitions")
            .await
            .map_err(errors::from_sqlx)
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn partition_count(&self) -> u32 {
        self.partition_count
    }

    /// One round trip through the pool: whether the store answers at all.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    pub async fn ping(&self) -> Result<(), Error> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .traced("SELECT 1")
            .await
            .map_err(errors::from_sqlx)?;
        Ok(())
    }

    /// Deletes idempotency records older than `ttl`. Returns how many went.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`] when Postgres cannot be reached.
    pub async fn prune_idempotency_keys(&self, ttl: Duration) -> Result<u64, Error> {
        idempotency::prune(&self.pool, ttl).await
    }
}

fn pool_options(settings: &StoreSettings) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .min_connections(0)
        .acquire_timeout(settings.acquire_timeout())
        // A ping per acquire costs a round trip on every call; a dead connection shows
        // as StoreUnavailable once instead, and the pool replaces it.
        .test_before_acquire(false)
        // While calls time out, a released connection must answer a bounded ping or
        // be closed: sqlx's own check on release has no bound (see `deadline`).
        .after_release(|conn, _| {
            Box::pin(async move {
                if !deadline::suspect() {
                    return Ok(true);
                }
                let answered = tokio::time::timeout(deadline::RELEASE_PING, conn.ping()).await;
                Ok(matches!(answered, Ok(Ok(()))))
            })
        })
}

fn connect_options(settings: &StoreSettings) -> Result<PgConnectOptions, Error> {
    let opts: PgConnectOptions = settings
        .url
        .expose()
        .parse()
        .map_err(|e| Error::invalid("store.url", format!("{e}")))?;
    let statement_timeout = format!("{}ms", settings.statement_timeout_ms);
    let lock_timeout = format!("{}ms", settings.lock_timeout_ms);
    // A live client sends a transaction's next statement at once: one idle in it for
    // longer than a call may take has been given up (its call timed out on a silent
    // connection) and must not keep holding row locks and request ids.
    let idle_in_transaction = format!("{}ms", settings.call_limit().as_millis());
    Ok(opts.application_name(&settings.application_name).options([
        ("statement_timeout", statement_timeout.as_str()),
        ("lock_timeout", lock_timeout.as_str()),
        (
            "idle_in_transaction_session_timeout",
            idle_in_transaction.as_str(),
        ),
        // The server's side of a connection whose client vanished (a partition, a dead
        // host) ends within half a minute instead of the system's two hours, and its
        // transaction with it. sqlx sets no socket options on the client's side: there
        // every call has its own bound (`deadline`), and the pool drops a connection
        // whose call was abandoned.
        ("tcp_keepalives_idle", "10"),
        ("tcp_keepalives_interval", "5"),
        ("tcp_keepalives_count", "3"),
        ("tcp_user_timeout", "30000"),
    ]))
}
