//! Lifecycle commands through `Store::execute` against a real Postgres: the state
//! table's answers, decided under the row lock, and concurrency.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic to fail the test

mod common;

use common::{create, ctx, running_pod, store};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use taskpod_core::Error;
use taskpod_core::domain::{
    Command, Event, NewTask, Phase, PodState, RequestContext, Status, TaskId,
};
use taskpod_core::store::AppendFence;

fn cancel() -> Command {
    Command::Cancel {
        reason: "no longer needed".into(),
    }
}

#[sqlx::test(migrations = "../../migrations")]
async fn ten_concurrent_cancels_give_one_ok_and_nine_already_cancelled(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    let task = create(&store, "manual").await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..10 {
        let store = store.clone();
        calls.spawn(async move {
            store
                .execute(task, &cancel(), &ctx(&format!("user-{i}")))
                .await
        });
    }
    let (mut ok, mut already) = (0, 0);
    while let Some(res) = calls.join_next().await {
        match res.expect("join") {
            Ok(_) => ok += 1,
            Err(Error::AlreadyCancelled(id)) => {
                assert_eq!(id, task);
                already += 1;
            }
            Err(other) => panic!("indefinite answer: {other:?}"),
        }
    }
    assert_eq!((ok, already), (1, 9));

    let err = store
        .execute(task, &Command::Complete, &ctx("bob"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyCancelled(_)), "{err:?}");
    let got = store.get_task(task).await.unwrap();
    assert_eq!(
        (got.status, got.phase, got.version),
        (Status::Cancelled, Phase::Cancelled, 2)
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn cancels_racing_pod_appends_always_get_a_definite_answer(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    let (task, epoch, _node) = running_pod(&store, "sleep").await;

    // The pod walks the phases as fast as it can, catching up on every conflict.
    let pod = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut appended = 0u32;
            loop {
                let state = store.state(task).await.expect("state");
                let to = match state.phase {
                    Phase::SpecClarification => Phase::Planning,
                    Phase::Planning => Phase::Development,
                    Phase::Development => Phase::Review,
                    _ => Phase::Development,
                };
                let event = Event::PhaseChanged {
                    from: state.phase,
                    to,
                };
                match store
                    .append(
                        task,
                        state.version,
                        AppendFence::Pod { epoch },
                        &[event],
                        &common::pod_meta(),
                    )
                    .await
                {
                    Ok(_) => appended += 1,
                    Err(Error::VersionConflict { .. } | Error::IllegalEvent { .. }) => continue,
                    Err(Error::NotRunning(_)) => return appended,
                    Err(other) => panic!("pod got {other:?}"),
                }
            }
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;

    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let store = store.clone();
        calls.spawn(async move { store.execute(task, &cancel(), &ctx("carol")).await });
    }
    let mut ok = 0;
    while let Some(res) = calls.join_next().await {
        match res.expect("join") {
            Ok(_) => ok += 1,
            Err(Error::AlreadyCancelled(_)) => {}
            Err(other) => panic!("cancel got an indefinite answer: {other:?}"),
        }
    }
    assert_eq!(ok, 1);
    let appended = pod.await.expect("pod task");
    assert!(
        appended > 0,
        "the pod never appended: the race was not exercised"
    );
    let state = store.state(task).await.unwrap();
    assert_eq!(state.status, Status::Cancelled);
    assert_eq!(
        state.pod_state,
        PodState::Stopping,
        "the pod is asked to stop"
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn state_table_refusals_reach_callers_with_their_variant(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    let task = create(&store, "sleep").await;
    let c = ctx("alice");

    let err = store
        .execute(task, &Command::RequestStop { reason: None }, &c)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotRunning(_)), "{err:?}");
    let err = store
        .execute(task, &Command::TransitionPhase { to: Phase::Review }, &c)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidTransition {
                from: Phase::SpecClarification,
                to: Phase::Review
            }
        ),
        "{err:?}"
    );
    // Inactive tasks move by TransitionPhase, whatever their kind.
    store
        .execute(
            task,
            &Command::TransitionPhase {
                to: Phase::Planning,
            },
            &c,
        )
        .await
        .unwrap();

    store
        .execute(task, &Command::RequestStart, &c)
        .await
        .unwrap();
    let err = store
        .execute(task, &Command::RequestStart, &c)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyStarted(_)), "{err:?}");
    // Active `sleep` task: its handler owns the phases.
    let err = store
        .execute(
            task,
            &Command::TransitionPhase {
                to: Phase::Development,
            },
            &c,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::PhaseOwnedByHandler { ref kind } if kind == "sleep"),
        "{err:?}"
    );

    store.execute(task, &Command::Complete, &c).await.unwrap();
    for (cmd, what) in [
        (Command::Complete, "complete"),
        (cancel(), "cancel"),
        (Command::RequestStart, "start"),
        (Command::RequestRestart, "restart"),
    ] {
        let err = store.execute(task, &cmd, &c).await.unwrap_err();
        assert!(matches!(err, Error::AlreadyCompleted(_)), "{what}: {err:?}");
    }

    let failed = running_pod(&store, "sleep").await;
    let phase = store.state(failed.0).await.unwrap().phase;
    let version = store.state(failed.0).await.unwrap().version;
    store
        .append(
            failed.0,
            version,
            AppendFence::Pod { epoch: failed.1 },
            &[Event::TaskFailed {
                error: "boom".into(),
                from_phase: phase,
            }],
            &common::pod_meta(),
        )
        .await
        .unwrap();
    let err = store.execute(failed.0, &cancel(), &c).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyFailed(_)), "{err:?}");
    assert_eq!(
        store
            .get_task(failed.0)
            .await
            .unwrap()
            .last_error
            .as_deref(),
        Some("boom")
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn active_manual_tasks_move_by_transition_phase(_: PgPoolOptions, opts: PgConnectOptions) {
    let store = store(opts).await;
    let task = create(&store, "manual").await;
    let c = ctx("alice");
    store
        .execute(task, &Command::RequestStart, &c)
        .await
        .unwrap();
    for to in [
        Phase::Planning,
        Phase::Development,
        Phase::Review,
        Phase::Development,
        Phase::Review,
    ] {
        store
            .execute(task, &Command::TransitionPhase { to }, &c)
            .await
            .unwrap();
    }
    let done = store
        .execute(
            task,
            &Command::TransitionPhase {
                to: Phase::Completed,
            },
            &c,
        )
        .await
        .unwrap();
    assert_eq!(
        (done.state.status, done.state.phase),
        (Status::Completed, Phase::Completed)
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn invalid_commands_are_refused_before_anything_is_written(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    let task = create(&store, "manual").await;

    let err = store
        .execute(
            task,
            &Command::Cancel {
                reason: "  ".into(),
            },
            &ctx("alice"),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::MissingReason), "{err:?}");
    let err = store
        .execute(task, &cancel(), &RequestContext::new(""))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::MissingActorId), "{err:?}");
    let missing = TaskId::new();
    let err = store
        .execute(missing, &cancel(), &ctx("alice"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::TaskNotFound(id) if id == missing),
        "{err:?}"
    );
    let err = store.get_task(missing).await.unwrap_err();
    assert!(matches!(err, Error::TaskNotFound(_)), "{err:?}");

    assert_eq!(
        store.get_task(task).await.unwrap().version,
        1,
        "nothing was appended"
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn every_event_records_actor_and_correlation(_: PgPoolOptions, opts: PgConnectOptions) {
    let store = store(opts).await;
    let created = store
        .create_task(
            &NewTask {
                auto_start: true,
                ..NewTask::new("audited", "manual")
            },
            &RequestContext::new("alice").with_correlation_id("req-1"),
        )
        .await
        .unwrap();
    let task = created.task_id().unwrap();
    // No correlation id given: the store mints one rather than leaving it empty.
    store
        .execute(task, &cancel(), &RequestContext::new("bob"))
        .await
        .unwrap();

    let events = store.read_stream(task, 0, 100).await.unwrap();
    let summary: Vec<_> = events
        .iter()
        .map(|e| (e.version, e.event.type_name(), e.metadata.actor_id.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            (1, "task_created", "alice"),
            (2, "pod_requested", "alice"),
            (3, "task_cancelled", "bob")
        ]
    );
    assert_eq!(events[0].metadata.correlation_id, "req-1");
    assert_eq!(events[1].metadata.correlation_id, "req-1");
    assert!(!events[2].metadata.correlation_id.is_empty());
    assert!(
        matches!(&events[2].event, Event::TaskCancelled { reason, .. } if reason == "no longer needed")
    );

    let tail = store.read_stream(task, 3, 100).await.unwrap();
    assert_eq!(tail.len(), 1);
    assert!(store.read_stream(task, 4, 100).await.unwrap().is_empty());
    let err = store.read_stream(TaskId::new(), 1, 10).await.unwrap_err();
    assert!(matches!(err, Error::TaskNotFound(_)), "{err:?}");
}

#[sqlx::test(migrations = "../../migrations")]
async fn stop_and_restart_requests_reach_the_pod_through_the_head(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    let (task, epoch, _node) = running_pod(&store, "sleep").await;
    let c = ctx("alice");

    let restarted = store
        .execute(task, &Command::RequestRestart, &c)
        .await
        .unwrap();
    assert_eq!(restarted.state.status, Status::Active);
    assert_eq!(restarted.state.pod_state, PodState::Stopping);

    let stopped = store
        .execute(
            task,
            &Command::RequestStop {
                reason: Some("maintenance".into()),
            },
            &c,
        )
        .await
        .unwrap();
    assert_eq!(stopped.state.status, Status::Inactive);
    // The pod may still acknowledge its stop, but nothing else.
    let err = store
        .append(
            task,
            stopped.state.version,
            AppendFence::Pod { epoch },
            &[Event::PhaseChanged {
                from: Phase::SpecClarification,
                to: Phase::Planning,
            }],
            &common::pod_meta(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotRunning(_)), "{err:?}");
    let acked = store
        .append(
            task,
            stopped.state.version,
            AppendFence::Pod { epoch },
            &[Event::PodStopped {
                epoch,
                reason: "requested".into(),
            }],
            &common::pod_meta(),
        )
        .await
        .unwrap();
    assert_eq!(acked.state.pod_state, PodState::None);
    let got = store.get_task(task).await.unwrap();
    assert!(got.pod.is_none());
}
