//! Crash records and restart budgets, decided under the row lock by Postgres's clock.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{pod_meta, running_pod, store};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use taskpod_core::Error;
use taskpod_core::domain::restart::{CrashKind, RestartPolicy};
use taskpod_core::domain::{Event, Status};
use taskpod_core::store::AppendFence;
use taskpod_core::store::crashes::{CrashOutcome, CrashReport};

fn policy(backoff: Duration) -> RestartPolicy {
    RestartPolicy {
        max_restart_attempts: 3,
        window: Duration::from_secs(60),
        backoff_base: backoff,
        backoff_max: backoff * 8,
        max_node_losses: 1,
    }
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_crash_looping_task_restarts_within_its_budget_then_fails(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    let (task, mut epoch, node) = running_pod(&store, "sleep").await;
    let partition = store.get_task(task).await.unwrap().partition;
    let generation = store.partitions().await.unwrap()[partition as usize].generation;
    let policy = policy(Duration::ZERO);
    let mut outcomes = Vec::new();
    for attempt in 0..4 {
        let report = CrashReport {
            task_id: task,
            epoch,
            node: Some(node),
            reason: format!("boom {attempt}"),
            kind: CrashKind::Handler,
        };
        let outcome = store
            .record_crash(&report, node, generation, &policy, 0.5, &pod_meta())
            .await
            .unwrap();
        // Recording the same failure twice counts it once.
        assert_eq!(
            store
                .record_crash(&report, node, generation, &policy, 0.5, &pod_meta())
                .await
                .unwrap_err()
                .reason(),
            "STALE_EPOCH"
        );
        outcomes.push(outcome.clone());
        if let CrashOutcome::Restart { .. } = outcome {
            epoch = store.mint_pod(task, epoch, node, generation).await.unwrap();
            let s = store.state(task).await.unwrap();
            store
                .append(
                    task,
                    s.version,
                    AppendFence::Pod { epoch },
                    &[Event::PodStarted {
                        epoch,
                        node,
                        started_at: chrono::Utc::now(),
                    }],
                    &pod_meta(),
                )
                .await
                .unwrap();
        }
    }
    assert!(matches!(outcomes[0], CrashOutcome::Restart { .. }));
    assert!(matches!(outcomes[1], CrashOutcome::Restart { .. }));
    assert!(matches!(outcomes[2], CrashOutcome::Restart { .. }));
    assert!(
        matches!(outcomes[3], CrashOutcome::Failed { .. }),
        "{outcomes:?}"
    );
    let got = store.get_task(task).await.unwrap();
    assert_eq!(got.status, Status::Failed);
    assert!(got.last_error.unwrap().contains("boom 3"));
    let crashes: i64 = sqlx::query_scalar("SELECT count(*) FROM pod_crashes WHERE task_id = $1")
        .bind(task.as_uuid())
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(crashes, 4);
}

#[sqlx::test(migrations = "../../migrations")]
async fn backoff_holds_the_next_pod_and_stale_owners_cannot_record(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    let (task, epoch, node) = running_pod(&store, "sleep").await;
    let partition = store.get_task(task).await.unwrap().partition;
    let generation = store.partitions().await.unwrap()[partition as usize].generation;
    let report = CrashReport {
        task_id: task,
        epoch,
        node: Some(node),
        reason: "lost".into(),
        kind: CrashKind::NodeLost,
    };

    let err = store
        .record_crash(
            &report,
            node,
            generation - 1,
            &policy(Duration::from_secs(30)),
            0.0,
            &pod_meta(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::StaleGeneration { .. }), "{err:?}");

    let outcome = store
        .record_crash(
            &report,
            node,
            generation,
            &policy(Duration::from_secs(30)),
            0.0,
            &pod_meta(),
        )
        .await
        .unwrap();
    assert!(
        matches!(outcome, CrashOutcome::Restart { .. }),
        "{outcome:?}"
    );
    let err = store
        .mint_pod(task, epoch, node, generation)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::BackingOff { wait, .. } if wait > Duration::from_secs(10)),
        "{err:?}"
    );
    assert_eq!(
        store.pending_pods().await.unwrap().0,
        1,
        "active without a running pod"
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_task_can_tighten_its_own_restart_budget(_: PgPoolOptions, opts: PgConnectOptions) {
    use taskpod_core::domain::{NewTask, NodeId};
    let store = store(opts).await;
    let task = store
        .create_task(
            &NewTask {
                auto_start: true,
                metadata: serde_json::json!({"restart": {"max_restart_attempts": 0}}),
                ..NewTask::new("fragile", "sleep")
            },
            &common::ctx("alice"),
        )
        .await
        .unwrap()
        .task_id()
        .unwrap();
    let node = NodeId::new();
    let partition = store.get_task(task).await.unwrap().partition;
    let generation = store.claim_partition(partition, node).await.unwrap();
    let epoch = store.mint_pod(task, 0, node, generation).await.unwrap();
    let report = CrashReport {
        task_id: task,
        epoch,
        node: Some(node),
        reason: "boom".into(),
        kind: CrashKind::Handler,
    };
    let outcome = store
        .record_crash(
            &report,
            node,
            generation,
            &policy(Duration::ZERO),
            0.5,
            &pod_meta(),
        )
        .await
        .unwrap();
    assert!(
        matches!(outcome, CrashOutcome::Failed { .. }),
        "no restart allowed: {outcome:?}"
    );
}
