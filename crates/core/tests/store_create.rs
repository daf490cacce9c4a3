//! Creating tasks, one and in bulk, and AIP-155 request ids.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic to fail the test

mod common;

use common::{ctx, store};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use taskpod_core::Error;
use taskpod_core::domain::validation::BATCH_MAX;
use taskpod_core::domain::{Command, NewTask, Phase, RequestContext, Status};
use taskpod_core::store::{Store, TaskFilter};

async fn count_all(store: &Store) -> i64 {
    store.count_tasks(&TaskFilter::default()).await.unwrap()
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_created_task_has_its_row_head_and_first_event(_: PgPoolOptions, opts: PgConnectOptions) {
    let store = store(opts).await;
    let new = NewTask {
        description: "add JWT auth".into(),
        payload: serde_json::json!({"steps": 3}),
        priority: 7,
        metadata: serde_json::json!({"team": "core"}),
        ..NewTask::new("Implement auth", "manual")
    };
    let created = store.create_task(&new, &ctx("alice")).await.unwrap();
    assert!(!created.replayed);
    let task = store.get_task(created.task_id().unwrap()).await.unwrap();
    assert_eq!(task.title, "Implement auth");
    assert_eq!(task.description, "add JWT auth");
    assert_eq!(
        (task.status, task.phase, task.version),
        (Status::Inactive, Phase::SpecClarification, 1)
    );
    assert_eq!(
        (task.kind.as_str(), task.priority, task.created_by.as_str()),
        ("manual", 7, "alice")
    );
    assert_eq!(task.payload, new.payload);
    assert_eq!(task.metadata, new.metadata);
    assert!(task.pod.is_none());
    assert!((0..store.partition_count() as i32).contains(&task.partition));
    assert_eq!(
        task.task_id.as_uuid().get_version_num(),
        7,
        "ids are time-ordered UUIDv7"
    );

    let auto = store
        .create_task(
            &NewTask {
                auto_start: true,
                ..new.clone()
            },
            &ctx("alice"),
        )
        .await
        .unwrap();
    let auto = store.get_task(auto.task_id().unwrap()).await.unwrap();
    assert_eq!((auto.status, auto.version), (Status::Active, 2));
}

#[sqlx::test(migrations = "../../migrations")]
async fn invalid_tasks_are_refused_with_their_field(_: PgPoolOptions, opts: PgConnectOptions) {
    let store = store(opts).await;
    let cases: Vec<(NewTask, &str)> = vec![
        (NewTask::new("   ", "manual"), "title"),
        (NewTask::new("x".repeat(256), "manual"), "title"),
        (NewTask::new("ok", ""), "kind"),
        (NewTask::new("ok", "Bad Kind"), "kind"),
        (
            NewTask {
                priority: 5000,
                ..NewTask::new("ok", "manual")
            },
            "priority",
        ),
        (
            NewTask {
                metadata: serde_json::json!([1]),
                ..NewTask::new("ok", "manual")
            },
            "metadata",
        ),
        (
            NewTask {
                description: "d".repeat(64 * 1024 + 1),
                ..NewTask::new("ok", "manual")
            },
            "description",
        ),
        (
            NewTask {
                payload: serde_json::json!("p".repeat(256 * 1024)),
                ..NewTask::new("ok", "manual")
            },
            "payload",
        ),
    ];
    for (task, field) in cases {
        let err = store.create_task(&task, &ctx("alice")).await.unwrap_err();
        assert_eq!(err.field(), Some(field), "{err:?}");
        if field == "title" {
            assert!(matches!(err, Error::InvalidTitle(_)), "{err:?}");
        } else {
            assert!(matches!(err, Error::InvalidArgument { .. }), "{err:?}");
        }
    }
    let err = store
        .create_task(&NewTask::new("ok", "manual"), &RequestContext::new(" "))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::MissingActorId), "{err:?}");
    assert_eq!(count_all(&store).await, 0, "nothing invalid was written");
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_batch_of_a_thousand_is_created_in_one_go(_: PgPoolOptions, opts: PgConnectOptions) {
    let store = store(opts).await;
    let tasks: Vec<_> = (0..BATCH_MAX)
        .map(|i| NewTask {
            priority: (i % 10) as i32,
            auto_start: i % 2 == 0,
            ..NewTask::new(format!("bulk {i}"), "sleep")
        })
        .collect();
    let created = store.create_tasks(&tasks, &ctx("loader")).await.unwrap();
    assert_eq!(created.task_ids.len(), BATCH_MAX);
    assert_eq!(count_all(&store).await, BATCH_MAX as i64);
    let active = TaskFilter {
        statuses: vec![Status::Active],
        ..TaskFilter::default()
    };
    assert_eq!(
        store.count_tasks(&active).await.unwrap(),
        (BATCH_MAX / 2) as i64
    );
    // Order is kept: the 3rd id is the 3rd task.
    let third = store.get_task(created.task_ids[2]).await.unwrap();
    assert_eq!(third.title, "bulk 2");
    assert_eq!(
        store
            .read_stream(created.task_ids[2], 1, 10)
            .await
            .unwrap()
            .len(),
        2
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn one_invalid_item_refuses_the_whole_batch(_: PgPoolOptions, opts: PgConnectOptions) {
    let store = store(opts).await;
    let mut tasks: Vec<_> = (0..10)
        .map(|i| NewTask::new(format!("t{i}"), "sleep"))
        .collect();
    tasks[7].title = String::new();
    let err = store
        .create_tasks(&tasks, &ctx("loader"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidBatchItem { index: 7, source } if matches!(**source, Error::InvalidTitle(_))),
        "{err:?}"
    );
    assert_eq!(err.field(), Some("title"));
    assert_eq!(count_all(&store).await, 0);

    let too_many = vec![NewTask::new("t", "sleep"); BATCH_MAX + 1];
    let err = store
        .create_tasks(&too_many, &ctx("loader"))
        .await
        .unwrap_err();
    assert_eq!(err.field(), Some("tasks"), "{err:?}");
    let err = store.create_tasks(&[], &ctx("loader")).await.unwrap_err();
    assert_eq!(err.field(), Some("tasks"), "{err:?}");
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_retried_request_id_gets_the_first_response(_: PgPoolOptions, opts: PgConnectOptions) {
    let store = store(opts).await;
    let new = NewTask::new("once", "manual");
    let alice = ctx("alice").with_request_id("req-1");

    let first = store.create_task(&new, &alice).await.unwrap();
    let retry = store
        .create_task(&new, &alice.clone().with_correlation_id("another"))
        .await
        .unwrap();
    assert_eq!(retry.task_ids, first.task_ids);
    assert!(retry.replayed && !first.replayed);
    assert_eq!(count_all(&store).await, 1);

    // The same id from another principal is another key.
    let bob = store
        .create_task(&new, &ctx("bob").with_request_id("req-1"))
        .await
        .unwrap();
    assert_ne!(bob.task_ids, first.task_ids);
    assert_eq!(count_all(&store).await, 2);

    // The same id for a different request is refused.
    let err = store
        .create_task(&NewTask::new("other", "manual"), &alice)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::IdempotencyKeyReused { ref request_id } if request_id == "req-1"),
        "{err:?}"
    );
    assert_eq!(err.field(), Some("request_id"));
    let task = first.task_id().unwrap();
    let err = store
        .execute(task, &Command::Complete, &alice)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::IdempotencyKeyReused { .. }), "{err:?}");

    // Commands: a retried cancel answers as the first did, not "already cancelled".
    let cancel = Command::Cancel {
        reason: "dup".into(),
    };
    let c = ctx("alice").with_request_id("cancel-1");
    let first = store.execute(task, &cancel, &c).await.unwrap();
    let again = store.execute(task, &cancel, &c).await.unwrap();
    assert!(again.replayed);
    assert_eq!(again.state, first.state);
    assert_eq!(
        store.get_task(task).await.unwrap().version,
        2,
        "the retry appended nothing"
    );
    // Without the request id it is a new request, and the table refuses it.
    let err = store
        .execute(task, &cancel, &ctx("alice"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyCancelled(_)), "{err:?}");
}

#[sqlx::test(migrations = "../../migrations")]
async fn concurrent_retries_of_one_request_create_one_task(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let store = store.clone();
        calls.spawn(async move {
            store
                .create_task(
                    &NewTask::new("racy", "manual"),
                    &ctx("alice").with_request_id("same"),
                )
                .await
        });
    }
    let mut ids = Vec::new();
    while let Some(res) = calls.join_next().await {
        ids.push(res.unwrap().unwrap().task_ids);
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "every retry got the first response");
    assert_eq!(count_all(&store).await, 1);
}

#[sqlx::test(migrations = "../../migrations")]
async fn failed_requests_leave_no_key_and_old_keys_are_pruned(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    let c = ctx("alice").with_request_id("k");
    let err = store
        .create_task(&NewTask::new("", "manual"), &c)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidTitle(_)));
    // The id is still free for a corrected request.
    store
        .create_task(&NewTask::new("fixed", "manual"), &c)
        .await
        .unwrap();

    assert_eq!(
        store
            .prune_idempotency_keys(std::time::Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    sqlx::query("UPDATE idempotency_keys SET created_at = now() - interval '2 days'")
        .execute(store.pool())
        .await
        .unwrap();
    assert_eq!(
        store
            .prune_idempotency_keys(std::time::Duration::from_secs(86_400))
            .await
            .unwrap(),
        1
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn callers_batched_into_one_create_each_get_their_own_answer(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    let trace = |n: u8| format!("00-4bf92f3577b34da6a3ce929d0e0e47{n:02x}-00f067aa0ba902b7-01");
    let caller = |actor: &str, n: u8| RequestContext {
        traceparent: Some(trace(n)),
        ..ctx(actor)
    };
    let requests = vec![
        (NewTask::new("first", "manual"), caller("alice", 1)),
        (NewTask::new("   ", "manual"), caller("bob", 2)),
        (
            NewTask {
                auto_start: true,
                ..NewTask::new("second", "sleep")
            },
            caller("carol", 3),
        ),
        (
            NewTask::new("keyed", "manual"),
            caller("dave", 4).with_request_id("req-1"),
        ),
        (NewTask::new("third", "manual"), caller("erin", 5)),
    ];
    let results = store.create_each(&requests).await;
    assert_eq!(results.len(), 5);
    assert_eq!(results[1].as_ref().unwrap_err().reason(), "INVALID_TITLE");
    for (i, actor) in [(0, "alice"), (2, "carol"), (3, "dave"), (4, "erin")] {
        let id = results[i].as_ref().unwrap().task_id().unwrap();
        let task = store.get_task(id).await.unwrap();
        assert_eq!(task.title, requests[i].0.title);
        assert_eq!(task.created_by, actor);
        let events = store.read_stream(id, 1, 10).await.unwrap();
        assert_eq!(events[0].metadata.actor_id, actor);
        assert_eq!(
            events[0].metadata.traceparent.as_deref(),
            Some(trace(i as u8 + 1).as_str())
        );
        if i == 2 {
            assert_eq!(task.status, Status::Active, "auto_start requested its pod");
            assert_eq!(events.len(), 2);
        }
    }
    // The keyed request shared the transaction: its retry gets the same task.
    let again = store
        .create_each(&requests[3..4])
        .await
        .pop()
        .unwrap()
        .unwrap();
    assert!(again.replayed);
    assert_eq!(again.task_id(), results[3].as_ref().unwrap().task_id());
}

#[sqlx::test(migrations = "../../migrations")]
async fn request_ids_share_a_batch_each_with_the_answer_it_would_have_alone(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    let keyed = |title: &str, actor: &str, id: &str| {
        (
            NewTask::new(title, "manual"),
            ctx(actor).with_request_id(id),
        )
    };
    let earlier = store
        .create_task(
            &NewTask::new("earlier", "manual"),
            &ctx("alice").with_request_id("r0"),
        )
        .await
        .unwrap();
    let requests = vec![
        keyed("one", "alice", "r1"),
        keyed("earlier", "alice", "r0"),
        (NewTask::new("plain", "manual"), ctx("alice")),
        // The same request twice in one batch, and the same id for another request.
        keyed("one", "alice", "r1"),
        keyed("not one", "alice", "r1"),
        // Request ids are the principal's own.
        keyed("bob's", "bob", "r1"),
    ];
    let results = store.create_each(&requests).await;
    let id = |i: usize| results[i].as_ref().unwrap().task_id().unwrap();
    assert!(!results[0].as_ref().unwrap().replayed);
    assert_eq!(
        id(1),
        earlier.task_id().unwrap(),
        "a retry of an earlier request"
    );
    assert!(results[1].as_ref().unwrap().replayed);
    assert_eq!(id(3), id(0), "the same request twice is one task");
    assert!(results[3].as_ref().unwrap().replayed);
    assert!(matches!(
        results[4],
        Err(Error::IdempotencyKeyReused { .. })
    ));
    assert_ne!(id(5), id(0));
    for (i, title) in [(0, "one"), (2, "plain"), (5, "bob's")] {
        assert_eq!(store.get_task(id(i)).await.unwrap().title, title);
    }
    assert_eq!(count_all(&store).await, 4, "earlier, one, plain, bob's");
    // Retried as a batch again: the same answers, nothing new.
    let again = store.create_each(&requests[..1]).await;
    assert_eq!(again[0].as_ref().unwrap().task_id(), Some(id(0)));
    assert_eq!(count_all(&store).await, 4);
}

#[sqlx::test(migrations = "../../migrations")]
async fn concurrent_batches_sharing_request_ids_create_each_task_once(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    // Four batches over the same twenty keys, in different orders: they wait on each
    // other's claims (never deadlock), and every key names one task.
    let batch = |rotate: usize| {
        let mut requests: Vec<(NewTask, RequestContext)> = (0..20)
            .map(|i| {
                (
                    NewTask::new(format!("task {i}"), "manual"),
                    ctx("alice").with_request_id(format!("r{i}")),
                )
            })
            .collect();
        requests.rotate_left(rotate);
        requests
    };
    let batches: Vec<_> = (0..4).map(|n| batch(n * 5)).collect();
    let results = futures::future::join_all(batches.iter().map(|b| store.create_each(b))).await;
    let mut by_key = std::collections::HashMap::new();
    for (requests, answers) in batches.iter().zip(&results) {
        for ((_, ctx), answer) in requests.iter().zip(answers) {
            let id = answer.as_ref().unwrap().task_id().unwrap();
            let first = by_key.entry(ctx.request_id.clone()).or_insert(id);
            assert_eq!(*first, id, "{:?}", ctx.request_id);
        }
    }
    assert_eq!(count_all(&store).await, 20);
}
