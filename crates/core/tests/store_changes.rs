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
