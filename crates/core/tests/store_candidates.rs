//! What a worker's checks read: the tasks of its partitions that need something of it.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic to fail the test

mod common;

use std::time::Duration;

use common::{ctx, live_node, pod_meta, running_pod, store};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use taskpod_core::domain::restart::{CrashKind, RestartPolicy};
use taskpod_core::domain::{Command, NewTask, PodState, Status};
use taskpod_core::store::crashes::{CrashOutcome, CrashReport};

/// Issue 12, defect 9: a pod whose node died after its task ended stayed `stopping`
/// forever, because the checks read only active tasks.
#[sqlx::test(migrations = "../../migrations")]
async fn regression_a_live_pod_of_an_ended_task_is_read_by_the_partitions_new_owner(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    let (task, epoch, dead) = running_pod(&store, "sleep").await;
    store
        .execute(
            task,
            &Command::Cancel {
                reason: "no longer needed".into(),
            },
            &ctx("alice"),
        )
        .await
        .unwrap();
    let feed_from = store.watermark().await.unwrap();
    drop(dead);
    let adopter = live_node(&store).await;
    let partition = store.get_task(task).await.unwrap().partition;
    store.claim_partition(partition, adopter.id).await.unwrap();

    let full = store
        .pod_candidates(adopter.id, &[partition], &[])
        .await
        .unwrap();
    let found = full.iter().find(|c| c.task_id == task).unwrap();
    assert_eq!(found.status, Status::Cancelled);
    assert_eq!(found.pod_state, PodState::Stopping);
    assert_eq!(found.pod_epoch, epoch);
    // The full check reads it once, though it matches two of its conditions.
    assert_eq!(full.iter().filter(|c| c.task_id == task).count(), 1);
    // A feed range that holds the cancel finds it too.
    store
        .execute(
            store
                .create_task(&NewTask::new("bump", "sleep"), &ctx("alice"))
                .await
                .unwrap()
                .task_id()
                .unwrap(),
            &Command::RequestStart,
            &ctx("alice"),
        )
        .await
        .unwrap();
    let to = store.watermark().await.unwrap();
    let changed = store
        .changed_candidates(adopter.id, &[partition], feed_from.saturating_sub(10), to)
        .await
        .unwrap();
    assert!(changed.iter().any(|c| c.task_id == task));
}

/// Issue 12, defect 10: backoff timers compared Postgres's `not_before` with the
/// worker's clock; the check now reads what is left of it, by Postgres's clock.
#[sqlx::test(migrations = "../../migrations")]
async fn a_backoff_is_read_as_the_time_left_by_postgres_clock(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    let (task, epoch, live) = running_pod(&store, "sleep").await;
    let partition = store.get_task(task).await.unwrap().partition;
    let generation = store.partitions().await.unwrap()[partition as usize].generation;
    let policy = RestartPolicy {
        max_restart_attempts: 5,
        window: Duration::from_secs(60),
        backoff_base: Duration::from_secs(30),
        backoff_max: Duration::from_secs(30),
        max_node_losses: 5,
        ..RestartPolicy::default()
    };
    let outcome = store
        .record_crash(
            &CrashReport {
                task_id: task,
                epoch,
                node: Some(live.id),
                reason: "boom".into(),
                kind: CrashKind::Handler,
            },
            live.id,
            generation,
            &policy,
            0.5,
            &pod_meta(),
        )
        .await
        .unwrap();
    let CrashOutcome::Restart { after, .. } = outcome else {
        panic!("{outcome:?}");
    };
    assert!(
        after > Duration::from_secs(10) && after <= Duration::from_secs(30),
        "{after:?}"
    );
    let c = store
        .pod_candidates_of(live.id, &[task])
        .await
        .unwrap()
        .pop()
        .unwrap();
    let left = c.backoff.unwrap();
    assert!(
        left <= after && left > after - Duration::from_secs(5),
        "{left:?} of {after:?}"
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn an_exec_tasks_program_is_read_for_placement(_: PgPoolOptions, opts: PgConnectOptions) {
    let store = store(opts).await;
    let node = live_node(&store).await;
    let task = store
        .create_task(
            &NewTask {
                payload: serde_json::json!({"program": "build", "args": 1}),
                auto_start: true,
                ..NewTask::new("build it", "exec")
            },
            &ctx("alice"),
        )
        .await
        .unwrap()
        .task_id()
        .unwrap();
    let sleepy = common::create(&store, "sleep").await;
    let read = store
        .pod_candidates_of(node.id, &[task, sleepy])
        .await
        .unwrap();
    let program = |id| {
        read.iter()
            .find(|c| c.task_id == id)
            .unwrap()
            .program
            .clone()
    };
    assert_eq!(program(task).as_deref(), Some("build"));
    assert_eq!(program(sleepy), None);
}
