//! An unreachable, silent or blocked Postgres gives StoreUnavailable quickly, never a
//! hang. Each call is wrapped in a generous outer timeout: the assertion is "answers
//! with the right error", the outer timeout only turns a hang into a failure.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic to fail the test

mod common;

use std::time::Duration;

use common::{create, ctx};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use taskpod_core::Error;
use taskpod_core::domain::{Command, NewTask, TaskId};
use taskpod_core::store::{Store, StoreSettings};

const HANG: Duration = Duration::from_secs(20);

fn settings(url: String) -> StoreSettings {
    StoreSettings {
        acquire_timeout_ms: 500,
        statement_timeout_ms: 1_000,
        lock_timeout_ms: 300,
        ..StoreSettings::with_url(url)
    }
}

fn assert_unavailable<T: std::fmt::Debug>(
    res: Result<Result<T, Error>, tokio::time::error::Elapsed>,
) {
    match res {
        Ok(Err(Error::StoreUnavailable(_))) => {}
        other => panic!("expected StoreUnavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn a_closed_port_is_unavailable() {
    // Bind then drop: nothing listens on the port any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = Store::connect_lazy(
        &settings(format!("postgres://postgres@127.0.0.1:{port}/taskpod")),
        256,
    )
    .unwrap();
    assert_unavailable(tokio::time::timeout(HANG, store.get_task(TaskId::new())).await);
    assert_unavailable(
        tokio::time::timeout(
            HANG,
            store.create_task(&NewTask::new("t", "manual"), &ctx("alice")),
        )
        .await,
    );
    let err = tokio::time::timeout(
        HANG,
        Store::connect(&settings(format!("postgres://postgres@127.0.0.1:{port}/x"))),
    )
    .await
    .expect("connect must not hang")
    .unwrap_err();
    assert!(matches!(err, Error::StoreUnavailable(_)), "{err:?}");
}

#[tokio::test]
async fn a_server_that_never_answers_is_unavailable() {
    // Accepts TCP connections (the kernel does, from the backlog) and never speaks.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let store = Store::connect_lazy(
        &settings(format!("postgres://postgres@127.0.0.1:{port}/taskpod")),
        256,
    )
    .unwrap();
    assert_unavailable(tokio::time::timeout(HANG, store.get_task(TaskId::new())).await);
    drop(silent);
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_command_blocked_on_a_row_lock_gives_up_as_unavailable(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let url = format!(
        "postgres://{}@{}:{}/{}",
        opts.get_username(),
        opts.get_host(),
        opts.get_port(),
        opts.get_database().unwrap_or("postgres")
    );
    let store = Store::connect(&settings(url)).await.unwrap();
    let task = create(&store, "manual").await;

    // Someone holds the head row lock and sits on it.
    let mut holder = store.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM task_heads WHERE task_id = $1 FOR UPDATE")
        .bind(task.as_uuid())
        .execute(&mut *holder)
        .await
        .unwrap();
    let cancel = Command::Cancel { reason: "r".into() };
    assert_unavailable(
        tokio::time::timeout(HANG, store.execute(task, &cancel, &ctx("alice"))).await,
    );
    holder.rollback().await.unwrap();

    // Nothing was half-written: the same command now goes through.
    store.execute(task, &cancel, &ctx("alice")).await.unwrap();
    assert_eq!(store.get_task(task).await.unwrap().version, 2);
}
