//! The change feed never skips a transaction that commits late.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;

use common::{create, store};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

#[sqlx::test(migrations = "../../migrations")]
async fn a_transaction_that_commits_late_is_not_skipped(_: PgPoolOptions, opts: PgConnectOptions) {
    let store = store(opts).await;
    let early = create(&store, "manual").await;
    let w0 = store.watermark().await.unwrap();

    // A transaction takes its id now and commits only after others have.
    let mut late = store.pool().begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *late)
        .await
        .unwrap();
    let quick = create(&store, "manual").await;

    let w1 = store.watermark().await.unwrap();
    let first: HashSet<_> = store
        .changed_tasks(w0, w1)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert!(
        !first.contains(&quick),
        "served above the oldest running transaction"
    );

    // The late writer touches a task created before the resume point, then commits.
    sqlx::query(
        "INSERT INTO events (stream_id, version, type, data, metadata) \
         VALUES ($1, 99, 'late_write', '{}', '{}')",
    )
    .bind(early.as_uuid())
    .execute(&mut *late)
    .await
    .unwrap();
    late.commit().await.unwrap();

    // Other tests' open transactions (the server is shared) can hold the watermark back
    // for a moment: follow the feed range after range, as a watcher does, until the
    // watermark passes both writes. Nothing may have been skipped on the way.
    let mut seen = first;
    let mut from = w1;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while !(seen.contains(&quick) && seen.contains(&early)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the feed never delivered both writes: {seen:?}"
        );
        let to = store.watermark().await.unwrap();
        seen.extend(store.changed_tasks(from, to).await.unwrap());
        from = to;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let both = store.get_tasks(&[early, quick]).await.unwrap();
    assert_eq!(both.len(), 2);
}

/// Issue 13, defect 3: the watermark was the cluster-wide snapshot `xmin`, so a
/// transaction left open in another database (another application, a migration, a
/// prepared transaction) froze every change feed of this one while heartbeats went on.
#[sqlx::test(migrations = "../../migrations")]
async fn regression_an_open_transaction_in_another_database_does_not_hold_the_feed(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts.clone()).await;
    let from = store.watermark().await.unwrap();

    // Another database's session takes a transaction id and keeps it.
    let elsewhere = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(opts.clone().database("postgres"))
        .await
        .unwrap();
    let mut held = elsewhere.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *held)
        .await
        .unwrap();

    let created = create(&store, "manual").await;
    let to = store.watermark().await.unwrap();
    let changed = store.changed_tasks(from, to).await.unwrap();
    assert!(
        changed.contains(&created),
        "a write committed here waits for another database's transaction: [{from}, {to})"
    );
    assert_eq!(
        taskpod_core::telemetry::metrics::metrics().change_feed_lag_now(),
        0.0,
        "nothing of this database holds the feed"
    );

    // One of this database's own open writers still holds it, and the lag shows it.
    let mut own = store.pool().begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *own)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let after = create(&store, "manual").await;
    let held_at = store.watermark().await.unwrap();
    assert!(
        !store
            .changed_tasks(to, held_at)
            .await
            .unwrap()
            .contains(&after),
        "served a write above this database's oldest running transaction"
    );
    assert!(
        taskpod_core::telemetry::metrics::metrics().change_feed_lag_now() >= 1.0,
        "the lag gauge shows how long the open transaction has held the feed"
    );
    own.rollback().await.unwrap();
    let released = store.watermark().await.unwrap();
    assert!(
        store
            .changed_tasks(held_at, released)
            .await
            .unwrap()
            .contains(&after)
    );
    held.rollback().await.unwrap();
}

/// A narrow stream's look at the feed returns what its filter matches and what it
/// follows, nothing of the rest of the cluster.
#[sqlx::test(migrations = "../../migrations")]
async fn changed_rows_between_returns_only_matches_and_the_followed(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    let from = store.watermark().await.unwrap();
    let shown = create(&store, "narrow").await;
    let followed = create(&store, "other").await;
    let mut elsewhere = Vec::new();
    for _ in 0..20 {
        elsewhere.push(create(&store, "other").await);
    }
    let to = store.watermark().await.unwrap();
    let filter = taskpod_core::store::TaskFilter {
        kinds: vec!["narrow".into()],
        ..Default::default()
    };
    let rows = store
        .changed_rows_between(
            from,
            to,
            &filter,
            &[followed],
            taskpod_core::store::View::Basic,
        )
        .await
        .unwrap();
    let mut ids: Vec<_> = rows.iter().map(|t| t.task_id).collect();
    ids.sort();
    let mut want = vec![shown, followed];
    want.sort();
    assert_eq!(ids, want);
    // The same range, read again from its end: nothing.
    assert!(
        store
            .changed_rows_between(
                to,
                to,
                &filter,
                &[followed],
                taskpod_core::store::View::Basic
            )
            .await
            .unwrap()
            .is_empty()
    );
}
