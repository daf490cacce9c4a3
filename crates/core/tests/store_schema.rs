//! The schema's own promises: the partition count is stored, events land in the month
//! their task was created, and partition maintenance is idempotent.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic to fail the test

mod common;

use common::{create, store};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

#[sqlx::test(migrations = "../../migrations")]
async fn the_partition_count_is_fixed_at_the_first_migration(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    assert_eq!(store.partition_count(), 256);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM partitions")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(rows, 256);
}

#[sqlx::test(migrations = "../../migrations")]
async fn events_land_in_their_tasks_creation_month(_: PgPoolOptions, opts: PgConnectOptions) {
    let store = store(opts).await;
    let task = create(&store, "manual").await;
    let (partition, tx_recorded): (String, bool) = sqlx::query_as(
        "SELECT tableoid::regclass::text, tx_id < pg_current_xact_id() \
         FROM events WHERE stream_id = $1",
    )
    .bind(task.as_uuid())
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(
        partition,
        chrono::Utc::now().format("events_%Y_%m").to_string()
    );
    assert!(
        tx_recorded,
        "events record the id of the transaction that wrote them"
    );

    assert_eq!(
        store.ensure_event_partitions().await.unwrap(),
        0,
        "nothing to create twice"
    );
    let next_year = (chrono::Utc::now() + chrono::Duration::days(340))
        .format("events_%Y_%m")
        .to_string();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {next_year}")))
        .execute(store.pool())
        .await
        .unwrap();
    assert_eq!(store.ensure_event_partitions().await.unwrap(), 1);
}
