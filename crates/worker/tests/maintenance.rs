//! Each maintenance service's `run_once`, against a real, migrated Postgres.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use taskpod_core::domain::NodeId;
use taskpod_core::store::Store;
use taskpod_worker::maintenance::Service;
use taskpod_worker::maintenance::gauges::PendingGauges;
use taskpod_worker::maintenance::heartbeat::Heartbeat;
use taskpod_worker::maintenance::partitions::PartitionUpkeep;
use taskpod_worker::maintenance::probe::StoreProbe;
use taskpod_worker::maintenance::prune::CrashPrune;

async fn store(opts: PgConnectOptions) -> Store {
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(opts)
        .await
        .unwrap();
    Store::from_pool(pool).await.unwrap()
}

const EVERY: Duration = Duration::from_secs(1);

#[sqlx::test(migrations = "../../migrations")]
async fn the_heartbeat_writes_the_current_incarnations_row(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    let node = NodeId::new();
    let key = store.reserve_lock_key().await.unwrap();
    store
        .register_node(node, key, "w", 1, &["sleep".into()], &[])
        .await
        .unwrap();
    sqlx::query("UPDATE nodes SET heartbeat_at = now() - interval '1 hour'")
        .execute(store.pool())
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::watch::channel(None);
    let mut beat = Heartbeat {
        store: store.clone(),
        node: rx,
        interval: EVERY,
    };
    beat.run_once().await.unwrap();
    let stale: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM nodes WHERE heartbeat_at < now() - interval '1 minute'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(stale, 1, "no incarnation, no heartbeat");
    tx.send_replace(Some(node));
    beat.run_once().await.unwrap();
    let stale: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM nodes WHERE heartbeat_at < now() - interval '1 minute'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(stale, 0);
}

#[sqlx::test(migrations = "../../migrations")]
async fn the_crash_prune_deletes_only_rows_past_retention(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    let task = store
        .create_task(
            &taskpod_core::domain::NewTask::new("t", "sleep"),
            &taskpod_core::domain::RequestContext::new("alice"),
        )
        .await
        .unwrap()
        .task_id()
        .unwrap();
    sqlx::query(
        "INSERT INTO pod_crashes (task_id, epoch, reason, kind, at) \
         SELECT $1, e, 'x', 'handler', now() - make_interval(hours => e) \
         FROM generate_series(1, 48) AS e",
    )
    .bind(task.as_uuid())
    .execute(store.pool())
    .await
    .unwrap();
    let mut prune = CrashPrune {
        store: store.clone(),
        retention: Duration::from_secs(24 * 3600),
        interval: EVERY,
    };
    prune.run_once().await.unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pod_crashes")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(left, 23, "hours 1 to 23 are within the day");
}

#[sqlx::test(migrations = "../../migrations")]
async fn partition_upkeep_creates_the_months_ahead_again(_: PgPoolOptions, opts: PgConnectOptions) {
    let store = store(opts).await;
    let months = |store: Store| async move {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'events'::regclass",
        )
        .fetch_one(store.pool())
        .await
        .unwrap();
        n
    };
    let before = months(store.clone()).await;
    let newest: String = sqlx::query_scalar(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'events'::regclass AND c.relname <> 'events_default' \
         ORDER BY c.relname DESC LIMIT 1",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {newest}")))
        .execute(store.pool())
        .await
        .unwrap();
    assert_eq!(months(store.clone()).await, before - 1);
    let mut upkeep = PartitionUpkeep {
        store: store.clone(),
        interval: EVERY,
    };
    upkeep.run_once().await.unwrap();
    assert_eq!(months(store.clone()).await, before);
}

#[sqlx::test(migrations = "../../migrations")]
async fn the_gauges_and_the_probe_read_a_live_store(_: PgPoolOptions, opts: PgConnectOptions) {
    let store = store(opts).await;
    let mut gauges = PendingGauges {
        store: store.clone(),
        interval: EVERY,
    };
    gauges.run_once().await.unwrap();
    let (mut probe, healthy) = StoreProbe::new(store.clone(), EVERY, EVERY * 5);
    probe.run_once().await.unwrap();
    assert!(*healthy.borrow());
    assert!(probe.failing_since.is_none());
}
