//! Pod and worker appends: fenced by epoch and partition generation, refused on a stale
//! version, and cheap (HOT updates of the head).
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic to fail the test

mod common;

use std::time::Duration;

use common::{create, ctx, live_node, pod_meta, running_pod, running_pods, store};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use taskpod_core::Error;
use taskpod_core::domain::restart::CrashKind;
use taskpod_core::domain::{Command, Event, Phase, PodState, Status, TaskState};
use taskpod_core::store::AppendFence;

fn next_phase(from: Phase) -> Event {
    let to = match from {
        Phase::SpecClarification => Phase::Planning,
        Phase::Planning => Phase::Development,
        Phase::Development => Phase::Review,
        _ => Phase::Development,
    };
    Event::PhaseChanged { from, to }
}

#[sqlx::test(migrations = "../../migrations")]
async fn two_appends_at_the_same_version_have_exactly_one_winner(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    let (task, epoch, _node) = running_pod(&store, "sleep").await;
    let state = store.state(task).await.unwrap();

    let (events, meta) = ([next_phase(state.phase)], pod_meta());
    let (a, b) = tokio::join!(
        store.append(
            task,
            state.version,
            AppendFence::Pod { epoch },
            &events,
            &meta
        ),
        store.append(
            task,
            state.version,
            AppendFence::Pod { epoch },
            &events,
            &meta
        ),
    );
    let (won, lost) = match (a, b) {
        (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w, l),
        other => panic!("expected one winner: {other:?}"),
    };
    assert_eq!(won.state.version, state.version + 1);
    assert!(
        matches!(lost, Error::VersionConflict { expected, actual } if expected == state.version && actual == state.version + 1),
        "{lost:?}"
    );
    assert_eq!(
        store.read_stream(task, 1, 100).await.unwrap().len() as i64,
        state.version + 1
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn stale_epochs_and_inactive_tasks_are_refused(_: PgPoolOptions, opts: PgConnectOptions) {
    let store = store(opts).await;
    let (task, epoch, _node) = running_pod(&store, "sleep").await;
    let state = store.state(task).await.unwrap();

    let err = store
        .append(
            task,
            state.version,
            AppendFence::Pod { epoch: epoch - 1 },
            &[next_phase(state.phase)],
            &pod_meta(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::StaleEpoch { held, current } if held == epoch - 1 && current == epoch),
        "{err:?}"
    );
    let err = store
        .append(
            task,
            state.version,
            AppendFence::Pod { epoch: epoch + 1 },
            &[next_phase(state.phase)],
            &pod_meta(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::StaleEpoch { .. }), "{err:?}");

    // A pod may not append what only the API writes.
    let err = store
        .append(
            task,
            state.version,
            AppendFence::Pod { epoch },
            &[Event::TaskCancelled {
                reason: "x".into(),
                from_phase: state.phase,
            }],
            &pod_meta(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::IllegalEvent { ref event_type, .. } if event_type == "task_cancelled"),
        "{err:?}"
    );

    store
        .execute(
            task,
            &Command::Cancel {
                reason: "stop it".into(),
            },
            &ctx("alice"),
        )
        .await
        .unwrap();
    let state = store.state(task).await.unwrap();
    let err = store
        .append(
            task,
            state.version,
            AppendFence::Pod { epoch },
            &[next_phase(Phase::SpecClarification)],
            &pod_meta(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotRunning(_)), "{err:?}");

    // A task that was never started has no pod to append for.
    let idle = create(&store, "sleep").await;
    let err = store
        .append(
            idle,
            1,
            AppendFence::Pod { epoch: 0 },
            &[next_phase(Phase::SpecClarification)],
            &pod_meta(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotRunning(_)), "{err:?}");
}

#[sqlx::test(migrations = "../../migrations")]
async fn epochs_are_minted_only_by_the_partition_owner_at_its_generation(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    let task = create(&store, "sleep").await;
    store
        .execute(task, &Command::RequestStart, &ctx("alice"))
        .await
        .unwrap();
    let partition = store.get_task(task).await.unwrap().partition;
    let (old_node, new_node) = (live_node(&store).await, live_node(&store).await);
    let (old, new) = (old_node.id, new_node.id);
    let old_gen = store.claim_partition(partition, old).await.unwrap();
    let new_gen = store.claim_partition(partition, new).await.unwrap();
    assert_eq!(new_gen, old_gen + 1, "every claim bumps the generation");

    let err = store.mint_pod(task, 0, old, old_gen).await.unwrap_err();
    assert!(
        matches!(err, Error::StaleGeneration { held, current } if held == old_gen && current == new_gen),
        "{err:?}"
    );
    let epoch = store.mint_pod(task, 0, new, new_gen).await.unwrap();
    assert_eq!(epoch, 1);
    // The bus wake-up and the periodic pass both try: only one mints.
    let err = store.mint_pod(task, 0, new, new_gen).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::StaleEpoch {
                held: 0,
                current: 1
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        store.state(task).await.unwrap().pod_state,
        PodState::Starting
    );

    // Worker appends are fenced by the generation too.
    let state = store.state(task).await.unwrap();
    let crash = [Event::PodCrashed {
        epoch,
        reason: "node lost".into(),
        kind: CrashKind::NodeLost,
    }];
    let err = store
        .append(
            task,
            state.version,
            AppendFence::Worker {
                node: old,
                generation: old_gen,
            },
            &crash,
            &pod_meta(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::StaleGeneration { .. }), "{err:?}");
    let after = store
        .append(
            task,
            state.version,
            AppendFence::Worker {
                node: new,
                generation: new_gen,
            },
            &crash,
            &pod_meta(),
        )
        .await
        .unwrap();
    assert_eq!(after.state.pod_state, PodState::None);
    assert_eq!(after.state.last_error.as_deref(), Some("node lost"));
    let recorded = store
        .read_stream(task, after.state.version, 1)
        .await
        .unwrap();
    assert_eq!(recorded[0].metadata.epoch, Some(epoch));

    // Minting on a task nobody wants running is refused by the state table.
    let idle = create(&store, "sleep").await;
    let p = store.get_task(idle).await.unwrap().partition;
    let g = store.claim_partition(p, new).await.unwrap();
    let err = store.mint_pod(idle, 0, new, g).await.unwrap_err();
    assert!(matches!(err, Error::NotRunning(_)), "{err:?}");
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_pod_can_finish_its_task(_: PgPoolOptions, opts: PgConnectOptions) {
    let store = store(opts).await;
    let (task, epoch, live) = running_pod(&store, "sleep").await;
    let node = live.id;
    let got = store.get_task(task).await.unwrap();
    let pod = got.pod.expect("pod fields while running");
    assert_eq!(
        (pod.state, pod.epoch, pod.node),
        (PodState::Running, epoch, Some(node))
    );
    assert!(pod.started_at.is_some());

    let walk = [
        Event::PhaseChanged {
            from: Phase::SpecClarification,
            to: Phase::Planning,
        },
        Event::PhaseChanged {
            from: Phase::Planning,
            to: Phase::Development,
        },
        Event::PhaseChanged {
            from: Phase::Development,
            to: Phase::Review,
        },
        Event::TaskCompleted {
            from_phase: Phase::Review,
        },
    ];
    let done = store
        .append(
            task,
            got.version,
            AppendFence::Pod { epoch },
            &walk,
            &pod_meta(),
        )
        .await
        .unwrap();
    assert_eq!(done.state.status, Status::Completed);
    let stopped = store
        .append(
            task,
            done.state.version,
            AppendFence::Pod { epoch },
            &[Event::PodStopped {
                epoch,
                reason: "completed".into(),
            }],
            &pod_meta(),
        )
        .await
        .unwrap();
    assert_eq!(stopped.state.pod_state, PodState::None);
    let row = store.get_task(task).await.unwrap();
    assert_eq!(
        (row.status, row.phase, row.version),
        (Status::Completed, Phase::Completed, stopped.state.version)
    );
    assert!(row.updated_at >= row.created_at);
}

#[sqlx::test(migrations = "../../migrations")]
async fn appends_update_the_head_row_in_place(_: PgPoolOptions, opts: PgConnectOptions) {
    let store = store(opts).await;
    let (task, epoch, _node) = running_pod(&store, "sleep").await;
    let before = hot_counts(&store).await;
    let appends = 200;
    for _ in 0..appends {
        let s = store.state(task).await.unwrap();
        store
            .append(
                task,
                s.version,
                AppendFence::Pod { epoch },
                &[next_phase(s.phase)],
                &pod_meta(),
            )
            .await
            .unwrap();
    }
    // Statistics reach the collector asynchronously: poll until they include the burst.
    let mut after = hot_counts(&store).await;
    for _ in 0..100 {
        if after.0 - before.0 >= appends {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = hot_counts(&store).await;
    }
    let (updates, hot) = (after.0 - before.0, after.1 - before.1);
    assert!(updates >= appends, "only {updates} head updates counted");
    assert!(
        hot * 100 >= updates * 95,
        "{hot} of {updates} head updates were HOT"
    );
}

async fn hot_counts(store: &taskpod_core::store::Store) -> (i64, i64) {
    let mut conn = store.pool().acquire().await.unwrap();
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query_as(
        "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'task_heads'",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap()
}

#[sqlx::test(migrations = "../../migrations")]
async fn replaying_a_stored_stream_gives_the_head_state(_: PgPoolOptions, opts: PgConnectOptions) {
    use taskpod_core::domain::TaskState;
    let store = store(opts).await;
    // A pod that started, moved a phase and was restarted; then a pod minted but lost
    // before it started (the mint writes no event, replay must infer it).
    let (task, epoch, live) = running_pod(&store, "sleep").await;
    let node = live.id;
    let s = store.state(task).await.unwrap();
    store
        .append(
            task,
            s.version,
            AppendFence::Pod { epoch },
            &[next_phase(s.phase)],
            &pod_meta(),
        )
        .await
        .unwrap();
    let s = store
        .execute(task, &Command::RequestRestart, &ctx("alice"))
        .await
        .unwrap()
        .state;
    store
        .append(
            task,
            s.version,
            AppendFence::Pod { epoch },
            &[Event::PodStopped {
                epoch,
                reason: "restart".into(),
            }],
            &pod_meta(),
        )
        .await
        .unwrap();
    let partition = store.get_task(task).await.unwrap().partition;
    let generation = store.claim_partition(partition, node).await.unwrap();
    let second = store.mint_pod(task, epoch, node, generation).await.unwrap();
    let s = store.state(task).await.unwrap();
    store
        .append(
            task,
            s.version,
            AppendFence::Worker { node, generation },
            &[Event::PodCrashed {
                epoch: second,
                reason: "node lost".into(),
                kind: CrashKind::NodeLost,
            }],
            &pod_meta(),
        )
        .await
        .unwrap();

    let events: Vec<_> = store
        .read_stream(task, 1, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.event)
        .collect();
    let replayed = TaskState::replay(task, &events).unwrap();
    assert_eq!(replayed, store.state(task).await.unwrap());
}

#[sqlx::test(migrations = "../../migrations")]
async fn checkpoints_are_fenced_by_epoch_and_survive_the_pod(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    let (task, epoch, live) = running_pod(&store, "sleep").await;
    let node = live.id;
    assert_eq!(store.load_checkpoint(task).await.unwrap(), None);
    let v = store.state(task).await.unwrap().version;
    store
        .save_checkpoint(task, epoch, v, &serde_json::json!({"step": 3}))
        .await
        .unwrap();
    let err = store
        .save_checkpoint(task, epoch + 1, v, &serde_json::json!({"step": 4}))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::StaleEpoch { .. }), "{err:?}");
    // The next pod loads the checkpoint plus the events after it.
    store
        .append(
            task,
            v,
            AppendFence::Pod { epoch },
            &[Event::PodStopped {
                epoch,
                reason: "restart".into(),
            }],
            &pod_meta(),
        )
        .await
        .unwrap();
    let partition = store.get_task(task).await.unwrap().partition;
    let generation = store.claim_partition(partition, node).await.unwrap();
    store.mint_pod(task, epoch, node, generation).await.unwrap();
    let cp = store.load_checkpoint(task).await.unwrap().unwrap();
    assert_eq!((cp.version, cp.state), (v, serde_json::json!({"step": 3})));
    let after = store.read_stream(task, cp.version + 1, 100).await.unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].event.type_name(), "pod_stopped");
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_mint_batch_mints_exactly_the_tasks_that_may_start(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    use taskpod_core::store::MintRequest;
    let store = store(opts).await;
    let live = live_node(&store).await;
    let node = live.id;
    let mut generations = std::collections::HashMap::new();
    let mut claim = async |task| {
        let partition = store.get_task(task).await.unwrap().partition;
        if let Some(g) = generations.get(&partition) {
            return *g;
        }
        let g = store.claim_partition(partition, node).await.unwrap();
        generations.insert(partition, g);
        g
    };
    let mut ready = Vec::new();
    for _ in 0..5 {
        let t = create(&store, "sleep").await;
        store
            .execute(t, &Command::RequestStart, &ctx("alice"))
            .await
            .unwrap();
        ready.push(t);
    }
    let idle = create(&store, "sleep").await;
    let stale = ready[4];
    let mut wanted = Vec::new();
    for &t in &ready {
        wanted.push(MintRequest {
            task_id: t,
            // One request carries an epoch the worker never saw.
            observed_epoch: if t == stale { 7 } else { 0 },
            generation: claim(t).await,
        });
    }
    wanted.push(MintRequest {
        task_id: idle,
        observed_epoch: 0,
        generation: claim(idle).await,
    });
    // A partition claimed at an older generation mints nothing.
    let other = create(&store, "sleep").await;
    store
        .execute(other, &Command::RequestStart, &ctx("alice"))
        .await
        .unwrap();
    let old = claim(other).await;
    let partition = store.get_task(other).await.unwrap().partition;
    let reclaimed = store.claim_partition(partition, node).await.unwrap();
    wanted.push(MintRequest {
        task_id: other,
        observed_epoch: 0,
        generation: old,
    });

    assert!(reclaimed > old, "the re-claim bumps the generation");

    let minted = store.mint_pods(node, &wanted).await.unwrap();
    let mut ids: Vec<_> = minted.iter().map(|m| m.task.task_id).collect();
    ids.sort();
    // The four ready tasks asked for at their epoch, unless one happens to share the
    // re-claimed partition (asked for at its old generation too).
    let mut expected = Vec::new();
    for &t in &ready[..4] {
        if store.get_task(t).await.unwrap().partition != partition {
            expected.push(t);
        }
    }
    expected.sort();
    assert_eq!(ids, expected);
    for m in &minted {
        assert_eq!(m.epoch, 1);
        assert_eq!(m.task.status, Status::Active);
        assert_eq!(m.task.pod.as_ref().unwrap().state, PodState::Starting);
        assert_eq!(m.task.title, "a task");
        assert_eq!(m.checkpoint, None);
    }
    for t in [stale, idle, other] {
        assert_eq!(store.state(t).await.unwrap().pod_epoch, 0, "{t} not minted");
    }
    // A second try mints nothing: every epoch moved or was refused.
    assert!(store.mint_pods(node, &wanted).await.unwrap().is_empty());
    assert_eq!(
        store
            .lost_partitions(node, &[(partition, old), (partition, reclaimed)])
            .await
            .unwrap(),
        vec![partition],
        "only the old generation is lost"
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_batch_of_pod_appends_gives_each_item_its_own_outcome(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    use taskpod_core::store::PodAppend;
    let store = store(opts).await;
    let pods = running_pods(&store, "sleep", 4).await;
    let item = |before: TaskState| PodAppend {
        before,
        events: vec![Event::PhaseChanged {
            from: Phase::SpecClarification,
            to: Phase::Planning,
        }],
        metadata: pod_meta(),
    };
    let mut items = Vec::new();
    for (i, (task, _, _)) in pods.iter().enumerate() {
        let state = store.state(*task).await.unwrap();
        items.push(match i {
            0 => item(state),
            // A pod whose view is a version behind: the head moved without it.
            1 => item(TaskState {
                version: state.version - 1,
                ..state
            }),
            // A pod of an epoch that is not the head's.
            2 => item(TaskState {
                pod_epoch: state.pod_epoch + 1,
                ..state
            }),
            _ => {
                store
                    .execute(
                        *task,
                        &Command::Cancel {
                            reason: "no".into(),
                        },
                        &ctx("alice"),
                    )
                    .await
                    .unwrap();
                // Cancelled since the pod looked: its view is stale.
                item(state)
            }
        });
    }
    let results = store.append_pods(&items).await;
    assert_eq!(results.len(), 4);
    let ok = results[0].as_ref().unwrap();
    assert_eq!(ok.state.phase, Phase::Planning);
    assert_eq!(ok.last_event, "phase_changed");
    assert!(
        matches!(results[1], Err(Error::VersionConflict { .. })),
        "{:?}",
        results[1]
    );
    assert!(
        matches!(results[2], Err(Error::StaleEpoch { .. })),
        "{:?}",
        results[2]
    );
    assert!(
        matches!(results[3], Err(Error::NotRunning(_))),
        "{:?}",
        results[3]
    );
    // Only the accepted item wrote, with the pod's epoch recorded, and the listing row.
    let (first, epoch, _) = pods[0];
    let stream = store.read_stream(first, 1, 100).await.unwrap();
    assert_eq!(stream.last().unwrap().metadata.epoch, Some(epoch));
    assert_eq!(store.get_task(first).await.unwrap().phase, Phase::Planning);
    for (task, _, _) in &pods[1..3] {
        assert_eq!(
            store.get_task(*task).await.unwrap().phase,
            Phase::SpecClarification
        );
    }
    // The same task twice in one batch: the second, appended alone after the first,
    // at the version the first left.
    let twice = vec![
        PodAppend {
            events: vec![Event::PhaseChanged {
                from: Phase::Planning,
                to: Phase::Development,
            }],
            ..item(ok.state.clone())
        },
        PodAppend {
            events: vec![Event::PhaseChanged {
                from: Phase::Development,
                to: Phase::Review,
            }],
            ..item(TaskState {
                version: ok.state.version + 1,
                phase: Phase::Development,
                ..ok.state.clone()
            })
        },
    ];
    let results = store.append_pods(&twice).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(store.state(first).await.unwrap().phase, Phase::Review);
}

/// A pod is fenced by its node's claim as well as by its epoch: once the node's lock
/// session is gone, nothing its pods send is written, even before a new owner has
/// recorded the loss and retired the epoch. Found by the crash storm: pods of a worker
/// whose session died with a Postgres restart wrote `pod_started` 22 s later under their
/// unretired epoch, so their later loss read as one the restart caused.
#[sqlx::test(migrations = "../../migrations")]
async fn regression_a_pod_whose_node_lost_its_lock_session_cannot_write(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    use taskpod_core::store::PodAppend;
    let store = store(opts).await;
    let mut pods = running_pods(&store, "sleep", 2).await;
    pods[0].2.lose_lock(&store).await;
    let (dead, epoch, _) = &pods[0];
    let (alive, _, _) = &pods[1];
    let before = store.state(*dead).await.unwrap();
    let step = |before: TaskState| PodAppend {
        events: vec![next_phase(before.phase)],
        before,
        metadata: pod_meta(),
    };

    // In a batch beside a live node's pod: each gets its own answer.
    let results = store
        .append_pods(&[
            step(before.clone()),
            step(store.state(*alive).await.unwrap()),
        ])
        .await;
    assert!(
        matches!(results[0], Err(Error::NodeFenced(n)) if Some(n) == before.owner_node),
        "{:?}",
        results[0]
    );
    assert!(results[1].is_ok(), "{:?}", results[1]);

    // Alone, and acknowledging a stop (the one append allowed past `active`).
    let alone = store
        .append(
            *dead,
            before.version,
            AppendFence::Pod { epoch: *epoch },
            &[next_phase(before.phase)],
            &pod_meta(),
        )
        .await;
    assert!(matches!(alone, Err(Error::NodeFenced(_))), "{alone:?}");
    let stopped = store
        .append_pods(&[PodAppend {
            events: vec![Event::PodStopped {
                epoch: *epoch,
                reason: "fenced".into(),
            }],
            ..step(before.clone())
        }])
        .await;
    assert!(
        matches!(stopped[0], Err(Error::NodeFenced(_))),
        "{:?}",
        stopped[0]
    );
    // Nor its checkpoints and output.
    let saved = store
        .save_checkpoint(
            *dead,
            *epoch,
            before.version,
            &serde_json::json!({"step": 1}),
        )
        .await;
    assert!(matches!(saved, Err(Error::NodeFenced(_))), "{saved:?}");
    let chunk = store
        .append_output(*dead, *epoch, 0, "stdout", b"late")
        .await;
    assert!(matches!(chunk, Err(Error::NodeFenced(_))), "{chunk:?}");
    assert_eq!(store.load_checkpoint(*dead).await.unwrap(), None);
    assert!(store.read_output(*dead).await.unwrap().is_empty());
    assert_eq!(
        store.state(*dead).await.unwrap(),
        before,
        "nothing was written"
    );
}

/// A takeover claims a peer's partitions in one statement: each generation bumps once,
/// a partition that does not exist is left out, and a node whose lock session is gone
/// claims nothing.
#[sqlx::test(migrations = "../../migrations")]
async fn claiming_many_partitions_bumps_each_once_and_only_while_alive(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    let (old, mut new) = (live_node(&store).await, live_node(&store).await);
    let before: Vec<i64> = generations_of(&store, &[3, 4, 5]).await;
    let claimed = store
        .claim_partitions(&[5, 3, 4, 100_000], old.id)
        .await
        .unwrap();
    let mut claimed_sorted = claimed.clone();
    claimed_sorted.sort_unstable();
    assert_eq!(
        claimed_sorted,
        vec![(3, before[0] + 1), (4, before[1] + 1), (5, before[2] + 1)],
        "each once, the missing one left out"
    );
    let owners: Vec<Option<uuid::Uuid>> =
        sqlx::query_scalar("SELECT owner_node FROM partitions WHERE partition = ANY($1)")
            .bind(vec![3, 4, 5])
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert!(owners.iter().all(|o| *o == Some(old.id.0)), "{owners:?}");
    assert!(
        store
            .claim_partitions(&[], old.id)
            .await
            .unwrap()
            .is_empty()
    );

    new.lose_lock(&store).await;
    let err = store.claim_partitions(&[3, 4], new.id).await.unwrap_err();
    assert!(
        matches!(err, Error::NodeFenced(n) if n == new.id),
        "{err:?}"
    );
    assert_eq!(
        generations_of(&store, &[3, 4, 5]).await,
        vec![before[0] + 1, before[1] + 1, before[2] + 1],
        "a fenced claim bumps nothing"
    );
}

async fn generations_of(store: &taskpod_core::store::Store, partitions: &[i32]) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT generation FROM partitions WHERE partition = ANY($1) ORDER BY partition",
    )
    .bind(partitions)
    .fetch_all(store.pool())
    .await
    .unwrap()
}
