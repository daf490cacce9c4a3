//! Crash records and restart budgets, decided under the row lock by Postgres's clock.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{pod_meta, running_pod, running_pods, store};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use taskpod_core::Error;
use taskpod_core::domain::restart::{CrashKind, RestartPolicy};
use taskpod_core::domain::{Event, Status, TaskId};
use taskpod_core::store::AppendFence;
use taskpod_core::store::crashes::{CrashOutcome, CrashReport};

fn policy(backoff: Duration) -> RestartPolicy {
    RestartPolicy {
        max_restart_attempts: 3,
        window: Duration::from_secs(60),
        backoff_base: backoff,
        backoff_max: backoff * 8,
        max_node_losses: 1,
        ..RestartPolicy::default()
    }
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_crash_looping_task_restarts_within_its_budget_then_fails(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    let (task, mut epoch, live) = running_pod(&store, "sleep").await;
    let node = live.id;
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
    let (task, epoch, live) = running_pod(&store, "sleep").await;
    let node = live.id;
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
    use taskpod_core::domain::NewTask;
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
    let live = common::live_node(&store).await;
    let node = live.id;
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

#[sqlx::test(migrations = "../../migrations")]
async fn a_batch_of_crashes_gives_each_item_the_answer_it_would_get_alone(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    use taskpod_core::domain::{NodeId, TaskId};
    use taskpod_core::store::crash_batch::CrashItem;
    let store = store(opts).await;
    let pods: Vec<(TaskId, i64, NodeId)> = running_pods(&store, "sleep", 4)
        .await
        .into_iter()
        .map(|(task, epoch, node)| (task, epoch, node.id))
        .collect();
    // One survivor adopts every partition, as after a node loss.
    let survivor = common::live_node(&store).await;
    let recorder = survivor.id;
    for (task, _, _) in &pods {
        let partition = store.get_task(*task).await.unwrap().partition;
        store.claim_partition(partition, recorder).await.unwrap();
    }
    let partitions = store.partitions().await.unwrap();
    let generation_of = |task: TaskId| {
        let store = store.clone();
        let partitions = partitions.clone();
        async move {
            let partition = store.get_task(task).await.unwrap().partition;
            partitions[partition as usize].generation
        }
    };
    let policy = policy(Duration::ZERO);
    let lost = |task: TaskId, epoch: i64, node: NodeId| CrashReport {
        task_id: task,
        epoch,
        node: Some(node),
        reason: "node lost".into(),
        kind: CrashKind::NodeLost,
    };
    // `d` already lost one node: a second loss spends its budget (max_node_losses 1).
    let (d, d_epoch, d_node) = pods[3];
    let d_generation = generation_of(d).await;
    let first = store
        .record_crash(
            &lost(d, d_epoch, d_node),
            recorder,
            d_generation,
            &policy,
            0.5,
            &pod_meta(),
        )
        .await
        .unwrap();
    assert!(matches!(first, CrashOutcome::Restart { .. }), "{first:?}");
    let d_epoch = store
        .mint_pod(d, d_epoch, recorder, d_generation)
        .await
        .unwrap();
    let s = store.state(d).await.unwrap();
    store
        .append(
            d,
            s.version,
            AppendFence::Pod { epoch: d_epoch },
            &[Event::PodStarted {
                epoch: d_epoch,
                node: recorder,
                started_at: chrono::Utc::now(),
            }],
            &pod_meta(),
        )
        .await
        .unwrap();

    let (a, a_epoch, a_node) = pods[0];
    let (b, b_epoch, b_node) = pods[1];
    let (c, c_epoch, c_node) = pods[2];
    let item = |report: CrashReport, generation: i64| CrashItem {
        report,
        generation,
        jitter: 0.5,
        metadata: pod_meta(),
    };
    let nowhere = TaskId::new();
    let items = vec![
        item(lost(a, a_epoch, a_node), generation_of(a).await),
        item(lost(b, b_epoch + 1, b_node), generation_of(b).await),
        item(lost(c, c_epoch, c_node), generation_of(c).await - 1),
        item(lost(d, d_epoch, recorder), d_generation),
        item(lost(nowhere, 1, a_node), 1),
    ];
    let answers = store.record_crashes(&items, recorder, &policy).await;
    assert_eq!(answers.len(), 5);
    assert!(
        matches!(answers[0], Ok(CrashOutcome::Restart { .. })),
        "{answers:?}"
    );
    assert!(
        matches!(answers[1], Err(Error::StaleEpoch { .. })),
        "{answers:?}"
    );
    assert!(
        matches!(answers[2], Err(Error::StaleGeneration { .. })),
        "{answers:?}"
    );
    assert!(
        matches!(answers[3], Ok(CrashOutcome::Failed { .. })),
        "{answers:?}"
    );
    assert!(
        matches!(answers[4], Err(Error::TaskNotFound(t)) if t == nowhere),
        "{answers:?}"
    );

    let crashes = |task: TaskId| {
        let pool = store.pool().clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM pod_crashes WHERE task_id = $1")
                .bind(task.as_uuid())
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        (
            crashes(a).await,
            crashes(b).await,
            crashes(c).await,
            crashes(d).await
        ),
        (1, 0, 0, 2)
    );
    let events = store.read_stream(a, 1, 100).await.unwrap();
    assert_eq!(events.last().unwrap().event.type_name(), "pod_crashed");
    assert_eq!(store.get_task(d).await.unwrap().status, Status::Failed);
    assert_eq!(store.get_task(b).await.unwrap().status, Status::Active);
    // One transaction wrote both (not the item-by-item fallback).
    let last_crash_tx = |task: TaskId| {
        let pool = store.pool().clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT tx_id::text FROM events WHERE stream_id = $1 AND type = 'pod_crashed' \
                 ORDER BY version DESC LIMIT 1",
            )
            .bind(task.as_uuid())
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(last_crash_tx(a).await, last_crash_tx(d).await);
    // The same items again: nothing is counted twice.
    let again = store.record_crashes(&items[..1], recorder, &policy).await;
    assert!(
        matches!(again[0], Err(Error::StaleEpoch { .. })),
        "{again:?}"
    );
    assert_eq!(crashes(a).await, 1);
}

/// Issue 12, defect 6: a window of 1e12 s made the window query raise "timestamp out of
/// range" (the task stayed active with a phantom pod); 0 or u32::MAX attempts gave
/// unlimited restarts past the operator's settings. Refused at create, naming the field.
#[sqlx::test(migrations = "../../migrations")]
async fn regression_restart_overrides_out_of_range_are_refused_at_create(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    use taskpod_core::domain::NewTask;
    let store = store(opts).await;
    for (restart, field) in [
        (
            serde_json::json!({"restart_window_seconds": 1e12}),
            "metadata.restart.restart_window_seconds",
        ),
        (
            serde_json::json!({"restart_window_seconds": 0}),
            "metadata.restart.restart_window_seconds",
        ),
        (
            serde_json::json!({"max_restart_attempts": u32::MAX}),
            "metadata.restart.max_restart_attempts",
        ),
    ] {
        let refused = store
            .create_task(
                &NewTask {
                    auto_start: true,
                    metadata: serde_json::json!({ "restart": restart }),
                    ..NewTask::new("bad limits", "sleep")
                },
                &common::ctx("alice"),
            )
            .await;
        match refused {
            Err(Error::InvalidArgument { field: f, .. }) => assert_eq!(f, field, "{restart}"),
            other => panic!("{restart} was not refused: {other:?}"),
        }
    }
    let listed = store.count_tasks(&Default::default()).await;
    assert!(matches!(listed, Ok(0)), "nothing was created: {listed:?}");
}

/// A task stored before the limits were checked still gets its crash recorded: the
/// stored window is clamped, and its attempts cannot exceed the operator's.
#[sqlx::test(migrations = "../../migrations")]
async fn regression_a_stored_out_of_range_window_still_records_the_crash(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    let (task, epoch, live) = running_pod(&store, "sleep").await;
    let node = live.id;
    sqlx::query(
        "UPDATE tasks SET metadata = '{\"restart\": {\"restart_window_seconds\": 1e12, \
         \"max_restart_attempts\": 4294967295}}' WHERE task_id = $1",
    )
    .bind(task.as_uuid())
    .execute(store.pool())
    .await
    .unwrap();
    let partition = store.get_task(task).await.unwrap().partition;
    let generation = store.partitions().await.unwrap()[partition as usize].generation;
    let off = RestartPolicy {
        max_restart_attempts: 0,
        ..policy(Duration::ZERO)
    };
    let report = CrashReport {
        task_id: task,
        epoch,
        node: Some(node),
        reason: "boom".into(),
        kind: CrashKind::Handler,
    };
    let outcome = store
        .record_crash(&report, node, generation, &off, 0.5, &pod_meta())
        .await
        .unwrap();
    assert!(
        matches!(outcome, CrashOutcome::Failed { .. }),
        "auto_restart off is not overridden by the task: {outcome:?}"
    );
    assert_eq!(store.get_task(task).await.unwrap().status, Status::Failed);
}

/// Issue 12, defect 2: recording a lost pod did not retire its epoch, so a paused owner
/// that resumed before the adopter minted could still move the task on (19 phase
/// changes were written under crashed epochs in the SIGSTOP measurement).
#[sqlx::test(migrations = "../../migrations")]
async fn regression_a_recorded_loss_retires_the_epoch_for_every_writer(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    let (task, epoch, _paused_owner) = running_pod(&store, "sleep").await;
    let zombie_view = store.state(task).await.unwrap();
    let adopter = common::live_node(&store).await;
    let partition = store.get_task(task).await.unwrap().partition;
    let generation = store.claim_partition(partition, adopter.id).await.unwrap();
    let lost = CrashReport {
        task_id: task,
        epoch,
        node: None,
        reason: "node lost".into(),
        kind: CrashKind::NodeLost,
    };
    store
        .record_crash(
            &lost,
            adopter.id,
            generation,
            &policy(Duration::from_secs(30)),
            0.5,
            &pod_meta(),
        )
        .await
        .unwrap();
    let recorded = store.state(task).await.unwrap();
    assert_eq!(recorded.pod_epoch, epoch, "no new epoch minted yet");
    assert_eq!(recorded.status, Status::Active);

    // The old owner resumes: at the version it last saw, and at the current one.
    for version in [zombie_view.version, recorded.version] {
        let view = taskpod_core::domain::TaskState {
            version,
            ..zombie_view.clone()
        };
        let err = store
            .append(
                task,
                version,
                AppendFence::Pod { epoch },
                &[Event::PhaseChanged {
                    from: view.phase,
                    to: taskpod_core::domain::Phase::Planning,
                }],
                &pod_meta(),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::StaleEpoch { .. } | Error::VersionConflict { .. }
            ),
            "{err:?}"
        );
        let batched = store
            .append_pods(&[taskpod_core::store::PodAppend {
                before: taskpod_core::domain::TaskState {
                    version,
                    ..zombie_view.clone()
                },
                events: vec![Event::TaskCompleted {
                    from_phase: zombie_view.phase,
                }],
                metadata: pod_meta(),
            }])
            .await;
        assert!(
            matches!(batched[0], Err(Error::StaleEpoch { .. })),
            "{batched:?}"
        );
    }
    let err = store
        .save_checkpoint(
            task,
            epoch,
            recorded.version,
            &serde_json::json!({"step": 9}),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::StaleEpoch { .. }), "{err:?}");
    assert_eq!(store.state(task).await.unwrap(), recorded, "nothing moved");
}

/// Issue 12, defect 2: a worker whose lock session is gone could still mint epochs and
/// record crashes until someone else claimed its partitions.
#[sqlx::test(migrations = "../../migrations")]
async fn regression_a_node_without_its_lock_session_mints_and_records_nothing(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    use taskpod_core::store::MintRequest;
    use taskpod_core::store::crash_batch::CrashItem;
    let store = store(opts).await;
    let (running, epoch, mut owner) = running_pod(&store, "sleep").await;
    let waiting = store
        .create_task(
            &taskpod_core::domain::NewTask {
                auto_start: true,
                ..taskpod_core::domain::NewTask::new("waiting", "sleep")
            },
            &common::ctx("alice"),
        )
        .await
        .unwrap()
        .task_id()
        .unwrap();
    // Both tasks may hash to one partition: it is claimed once, and each task uses the
    // generation its partition holds (a second claim would have bumped it and made the
    // first task's generation stale, an error this test is not about).
    let mut claimed = std::collections::HashMap::new();
    let mut generations = Vec::new();
    for task in [running, waiting] {
        let partition = store.get_task(task).await.unwrap().partition;
        let generation = match claimed.get(&partition) {
            Some(generation) => *generation,
            None => store.claim_partition(partition, owner.id).await.unwrap(),
        };
        claimed.insert(partition, generation);
        generations.push(generation);
    }
    assert!(store.node_alive(owner.id).await.unwrap());
    owner.lose_lock(&store).await;
    assert!(!store.node_alive(owner.id).await.unwrap());

    // It cannot claim either (a claim sent just before it froze must not bump the
    // generation under the rightful owner).
    let partition = store.get_task(waiting).await.unwrap().partition;
    let err = store
        .claim_partition(partition, owner.id)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::NodeFenced(n) if n == owner.id),
        "{err:?}"
    );
    // Its claims still stand in the partition rows: only the lock says otherwise.
    let err = store
        .mint_pod(waiting, 0, owner.id, generations[1])
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::NodeFenced(n) if n == owner.id),
        "{err:?}"
    );
    let minted = store
        .mint_pods(
            owner.id,
            &[MintRequest {
                task_id: waiting,
                observed_epoch: 0,
                generation: generations[1],
            }],
        )
        .await
        .unwrap();
    assert!(minted.is_empty());
    let report = CrashReport {
        task_id: running,
        epoch,
        node: Some(owner.id),
        reason: "boom".into(),
        kind: CrashKind::Handler,
    };
    let err = store
        .record_crash(
            &report,
            owner.id,
            generations[0],
            &policy(Duration::ZERO),
            0.5,
            &pod_meta(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NodeFenced(_)), "{err:?}");
    let answers = store
        .record_crashes(
            &[CrashItem {
                report,
                generation: generations[0],
                jitter: 0.5,
                metadata: pod_meta(),
            }],
            owner.id,
            &policy(Duration::ZERO),
        )
        .await;
    assert!(
        matches!(answers[0], Err(Error::NodeFenced(_))),
        "{answers:?}"
    );
    assert_eq!(store.state(waiting).await.unwrap().pod_epoch, 0);
    assert!(store.state(running).await.unwrap().has_pod());
}

/// Issue 12, defect 10: the crash prune was one unbounded DELETE; it now deletes in
/// batches of its own statements, and still takes everything past the retention.
#[sqlx::test(migrations = "../../migrations")]
async fn the_crash_prune_takes_every_old_row_in_batches(_: PgPoolOptions, opts: PgConnectOptions) {
    let store = store(opts).await;
    let task = common::create(&store, "sleep").await;
    sqlx::query(
        "INSERT INTO pod_crashes (task_id, epoch, node, reason, kind, at) \
         SELECT $1, e, NULL, 'old', 'handler', now() - interval '2 days' \
         FROM generate_series(1, 2500) AS e",
    )
    .bind(task.as_uuid())
    .execute(store.pool())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO pod_crashes (task_id, epoch, node, reason, kind) VALUES ($1, 9999, NULL, 'new', 'handler')",
    )
    .bind(task.as_uuid())
    .execute(store.pool())
    .await
    .unwrap();
    let pruned = store
        .prune_crashes(Duration::from_secs(86_400))
        .await
        .unwrap();
    assert_eq!(pruned, 2500);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pod_crashes")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(left, 1);
}

/// Issue 19: an `exec` output chunk held in a cut worker's socket reached Postgres after
/// the heal and was stored under an epoch whose loss had been recorded, beside the next
/// epoch's output. Chunks are fenced like the pod's appends now.
#[sqlx::test(migrations = "../../migrations")]
async fn regression_output_of_a_retired_epoch_is_refused(_: PgPoolOptions, opts: PgConnectOptions) {
    let store = store(opts).await;
    let (task, epoch, _cut_off) = running_pod(&store, "exec").await;
    store
        .append_output(task, epoch, 0, "stdout", b"before the cut\n")
        .await
        .unwrap();
    let adopter = common::live_node(&store).await;
    let partition = store.get_task(task).await.unwrap().partition;
    let generation = store.claim_partition(partition, adopter.id).await.unwrap();
    store
        .record_crash(
            &CrashReport {
                task_id: task,
                epoch,
                node: None,
                reason: "node lost".into(),
                kind: CrashKind::NodeLost,
            },
            adopter.id,
            generation,
            &policy(Duration::from_secs(30)),
            0.5,
            &pod_meta(),
        )
        .await
        .unwrap();
    let err = store
        .append_output(task, epoch, 2, "stdout", b"after the heal\n")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::StaleEpoch { .. }), "{err:?}");
    let stored = store.read_output(task).await.unwrap();
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].data, b"before the cut\n");
}

/// Found by the partition suite: an adopter waited the fence margin only when it had
/// recorded the loss itself, so a task whose loss another node recorded ran its `exec`
/// program 0.8-2.4 s after the loss (margin 4.3 s). The margin is now the recorded
/// restart's `not_before`, whoever records it, by single and batched recorders alike,
/// for node losses and interruptions, and only for the kinds that need it.
#[sqlx::test(migrations = "../../migrations")]
async fn regression_a_pod_lost_with_its_node_waits_the_adoption_margin_whoever_adopts(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    use taskpod_core::store::crash_batch::CrashItem;
    let store = store(opts).await;
    let policy = RestartPolicy {
        adoption_margin: Duration::from_secs(5),
        adoption_margin_kinds: vec!["exec".into()],
        ..policy(Duration::ZERO)
    };
    let margin_of = |outcome: &CrashOutcome| match outcome {
        CrashOutcome::Restart { after, .. } => *after,
        other => panic!("expected a restart, got {other:?}"),
    };
    let generation_of = |task: TaskId| {
        let store = store.clone();
        async move {
            let partition = store.get_task(task).await.unwrap().partition;
            store.partitions().await.unwrap()[partition as usize].generation
        }
    };
    let report = |task, epoch, node, kind| CrashReport {
        task_id: task,
        epoch,
        node: Some(node),
        reason: "lost".into(),
        kind,
    };
    for (kind, lost, expected) in [
        ("exec", CrashKind::NodeLost, Duration::from_secs(5)),
        ("exec", CrashKind::Interrupted, Duration::from_secs(5)),
        ("sleep", CrashKind::NodeLost, Duration::ZERO),
        ("exec", CrashKind::Handler, Duration::ZERO),
    ] {
        let (task, epoch, live) = running_pod(&store, kind).await;
        let generation = generation_of(task).await;
        let outcome = store
            .record_crash(
                &report(task, epoch, live.id, lost),
                live.id,
                generation,
                &policy,
                0.0,
                &pod_meta(),
            )
            .await
            .unwrap();
        assert_eq!(margin_of(&outcome), expected, "{kind} {lost:?}");
        let waits: f64 = sqlx::query_scalar(
            "SELECT extract(epoch FROM not_before - now())::float8 FROM task_heads WHERE task_id = $1",
        )
        .bind(task.as_uuid())
        .fetch_one(store.pool())
        .await
        .unwrap();
        assert!(
            (waits - expected.as_secs_f64()).abs() < 1.0,
            "{kind} {lost:?}: not_before is {waits} s away"
        );
    }
    // The batched recorder decides alike.
    let (task, epoch, live) = running_pod(&store, "exec").await;
    let answers = store
        .record_crashes(
            &[CrashItem {
                report: report(task, epoch, live.id, CrashKind::NodeLost),
                generation: generation_of(task).await,
                jitter: 0.0,
                metadata: pod_meta(),
            }],
            live.id,
            &policy,
        )
        .await;
    assert_eq!(
        margin_of(answers[0].as_ref().unwrap()),
        Duration::from_secs(5)
    );
}
