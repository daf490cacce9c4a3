//! The gRPC API end to end: a real `taskpod-api` process (two, where replicas matter)
//! on a real Postgres, driven by a real gRPC client.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::StreamExt as _;
use taskpod_e2e::api::{ApiProcess, TestDb};
use taskpod_proto::v1::{self, task_service_client::TaskServiceClient};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt as _;

type Client = TaskServiceClient<Channel>;

fn meta(actor: &str) -> Option<v1::RequestMeta> {
    Some(v1::RequestMeta {
        actor_id: actor.into(),
        ..Default::default()
    })
}

fn meta_with_id(actor: &str, request_id: &str) -> Option<v1::RequestMeta> {
    Some(v1::RequestMeta {
        actor_id: actor.into(),
        request_id: request_id.into(),
        ..Default::default()
    })
}

fn spec(title: &str, kind: &str) -> v1::TaskSpec {
    v1::TaskSpec {
        title: title.into(),
        kind: kind.into(),
        ..Default::default()
    }
}

fn reason(s: &Status) -> String {
    s.get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

fn violation(s: &Status) -> String {
    s.get_error_details()
        .bad_request()
        .and_then(|b| b.field_violations.first().map(|v| v.field.clone()))
        .unwrap_or_default()
}

async fn create(c: &mut Client, title: &str, kind: &str) -> String {
    c.create_task(v1::CreateTaskRequest {
        task: Some(spec(title, kind)),
        meta: meta("alice"),
    })
    .await
    .unwrap()
    .into_inner()
    .task_id
}

/// A database whose tasks no worker runs: kinds are offered by a fixture node row, and
/// lifecycle calls answer once the request is recorded instead of waiting for a pod.
async fn db() -> TestDb {
    let db = TestDb::create().await.unwrap();
    db.offer_kinds(&["manual", "sleep"], &[]).await.unwrap();
    db
}

const NO_POD_WAIT: (&str, &str) = ("TASKPOD_POD_WAIT_MS", "0");

async fn setup() -> (TestDb, ApiProcess, Client) {
    let db = db().await;
    let api = ApiProcess::spawn(&db, &[NO_POD_WAIT]).await.unwrap();
    let client = api.client().await.unwrap();
    (db, api, client)
}

#[tokio::test]
async fn every_lifecycle_rpc_works_and_answers_with_the_task() {
    let (_db, _api, mut c) = setup().await;
    let id = c
        .create_task(v1::CreateTaskRequest {
            task: Some(v1::TaskSpec {
                title: "Implement auth".into(),
                description: "JWT".into(),
                payload: Some(taskpod_proto::convert::json_to_value(
                    &serde_json::json!({"steps": 3}),
                )),
                priority: 5,
                metadata: taskpod_proto::convert::json_to_struct(
                    &serde_json::json!({"team": "core"}),
                ),
                ..Default::default()
            }),
            meta: meta("alice"),
        })
        .await
        .unwrap()
        .into_inner()
        .task_id;

    let task = c
        .get_task(v1::GetTaskRequest {
            task_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(task.title, "Implement auth");
    assert_eq!(task.kind, "manual", "the default kind");
    assert_eq!(task.status, v1::TaskStatus::Inactive as i32);
    assert_eq!(task.phase, v1::TaskPhase::SpecClarification as i32);
    assert_eq!(task.pod_status, v1::PodStatus::Stopped as i32);
    assert_eq!(
        (task.created_by.as_str(), task.version, task.priority),
        ("alice", 1, 5)
    );
    let payload = taskpod_proto::convert::value_to_json(task.payload.as_ref().unwrap());
    assert_eq!(payload, serde_json::json!({"steps": 3}));

    let moved = c
        .transition_phase(v1::TransitionPhaseRequest {
            task_id: id.clone(),
            to_phase: v1::TaskPhase::Planning as i32,
            meta: meta("alice"),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(moved.phase, v1::TaskPhase::Planning as i32);

    let started = c
        .start_pod(v1::StartPodRequest {
            task_id: id.clone(),
            meta: meta("alice"),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(started.status, v1::TaskStatus::Active as i32);
    let pods = c
        .list_active_pods(v1::ListActivePodsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        pods.tasks
            .iter()
            .map(|t| t.task_id.clone())
            .collect::<Vec<_>>(),
        vec![id.clone()]
    );

    let restarted = c
        .restart_pod(v1::RestartPodRequest {
            task_id: id.clone(),
            meta: meta("alice"),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(restarted.status, v1::TaskStatus::Active as i32);
    let stopped = c
        .stop_pod(v1::StopPodRequest {
            task_id: id.clone(),
            reason: "later".into(),
            meta: meta("alice"),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(stopped.status, v1::TaskStatus::Inactive as i32);
    let err = c
        .stop_pod(v1::StopPodRequest {
            task_id: id.clone(),
            reason: String::new(),
            meta: meta("alice"),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "NOT_RUNNING")
    );

    let done = c
        .complete_task(v1::CompleteTaskRequest {
            task_id: id.clone(),
            meta: meta("bob"),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(
        (done.status, done.phase),
        (
            v1::TaskStatus::Completed as i32,
            v1::TaskPhase::Completed as i32
        )
    );
    let err = c
        .cancel_task(v1::CancelTaskRequest {
            task_id: id.clone(),
            reason: "too late".into(),
            meta: meta("bob"),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "ALREADY_COMPLETED")
    );

    let events = c
        .list_task_events(v1::ListTaskEventsRequest {
            task_id: id.clone(),
            page_size: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        events
            .events
            .iter()
            .map(|e| e.r#type.as_str())
            .collect::<Vec<_>>(),
        ["task_created", "phase_changed", "pod_requested"]
    );
    assert!(!events.next_page_token.is_empty());
    let rest = c
        .list_task_events(v1::ListTaskEventsRequest {
            task_id: id.clone(),
            page_size: 3,
            page_token: events.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        rest.events.iter().map(|e| e.version).collect::<Vec<_>>(),
        [4, 5, 6]
    );
    assert_eq!(rest.events[2].r#type, "task_completed");
    assert_eq!(rest.events[2].actor_id, "bob");
    assert!(rest.next_page_token.is_empty());

    let count = c
        .count_tasks(v1::CountTasksRequest {
            filter: "status = completed".into(),
            criteria: None,
        })
        .await
        .unwrap();
    assert_eq!(count.into_inner().count, 1);
}

#[tokio::test]
async fn a_batch_of_a_thousand_is_all_or_nothing() {
    let (_db, _api, mut c) = setup().await;
    let tasks: Vec<_> = (0..1000)
        .map(|i| spec(&format!("bulk {i}"), "sleep"))
        .collect();
    let ids = c
        .create_tasks(v1::CreateTasksRequest {
            tasks: tasks.clone(),
            meta: meta("loader"),
        })
        .await
        .unwrap()
        .into_inner()
        .task_ids;
    assert_eq!(ids.len(), 1000);

    let mut bad = tasks;
    bad[417].title = "   ".into();
    let err = c
        .create_tasks(v1::CreateTasksRequest {
            tasks: bad,
            meta: meta("loader"),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violation(&err), "tasks[417].title");
    let count = c
        .count_tasks(v1::CountTasksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .count;
    assert_eq!(count, 1000, "nothing of the refused batch was written");

    let err = c
        .create_tasks(v1::CreateTasksRequest {
            tasks: vec![spec("t", "sleep"); 1001],
            meta: meta("loader"),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), violation(&err).as_str()),
        (Code::InvalidArgument, "tasks")
    );
}

#[tokio::test]
async fn bad_input_names_the_field_and_refusals_name_the_reason() {
    let (_db, _api, mut c) = setup().await;
    let cases: Vec<(v1::CreateTaskRequest, &str)> = vec![
        (
            v1::CreateTaskRequest {
                task: Some(spec("", "manual")),
                meta: meta("a"),
            },
            "task.title",
        ),
        (
            v1::CreateTaskRequest {
                task: Some(spec(&"x".repeat(256), "manual")),
                meta: meta("a"),
            },
            "task.title",
        ),
        (
            v1::CreateTaskRequest {
                task: Some(spec("ok", "Not A Kind")),
                meta: meta("a"),
            },
            "task.kind",
        ),
        (
            v1::CreateTaskRequest {
                task: Some(v1::TaskSpec {
                    priority: 9999,
                    ..spec("ok", "manual")
                }),
                meta: meta("a"),
            },
            "task.priority",
        ),
        (
            v1::CreateTaskRequest {
                task: Some(spec("ok", "manual")),
                meta: meta(""),
            },
            "meta.actor_id",
        ),
        (
            v1::CreateTaskRequest {
                task: None,
                meta: meta("a"),
            },
            "task",
        ),
        // Kinds are a cluster contract: no worker offers these.
        (
            v1::CreateTaskRequest {
                task: Some(spec("ok", "nobody-runs-this")),
                meta: meta("a"),
            },
            "task.kind",
        ),
        (
            v1::CreateTaskRequest {
                task: Some(spec("ok", "exec")),
                meta: meta("a"),
            },
            "task.kind",
        ),
    ];
    for (req, field) in cases {
        let err = c.create_task(req).await.unwrap_err();
        assert_eq!(
            (err.code(), violation(&err).as_str()),
            (Code::InvalidArgument, field),
            "{err:?}"
        );
    }

    let id = create(&mut c, "t", "sleep").await;
    let err = c
        .cancel_task(v1::CancelTaskRequest {
            task_id: id.clone(),
            reason: String::new(),
            meta: meta("a"),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), violation(&err).as_str(), reason(&err).as_str()),
        (Code::InvalidArgument, "reason", "MISSING_REASON")
    );
    let err = c
        .get_task(v1::GetTaskRequest {
            task_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), violation(&err).as_str()),
        (Code::InvalidArgument, "task_id")
    );
    let missing = uuid::Uuid::now_v7().to_string();
    let err = c
        .get_task(v1::GetTaskRequest {
            task_id: missing.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::NotFound, "TASK_NOT_FOUND")
    );
    let err = c
        .transition_phase(v1::TransitionPhaseRequest {
            task_id: id.clone(),
            to_phase: v1::TaskPhase::Review as i32,
            meta: meta("a"),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "INVALID_TRANSITION")
    );
    let err = c
        .transition_phase(v1::TransitionPhaseRequest {
            task_id: id.clone(),
            to_phase: 0,
            meta: meta("a"),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), violation(&err).as_str()),
        (Code::InvalidArgument, "to_phase")
    );
    c.start_pod(v1::StartPodRequest {
        task_id: id.clone(),
        meta: meta("a"),
    })
    .await
    .unwrap();
    let err = c
        .transition_phase(v1::TransitionPhaseRequest {
            task_id: id.clone(),
            to_phase: v1::TaskPhase::Planning as i32,
            meta: meta("a"),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "PHASE_OWNED_BY_HANDLER")
    );
    let bad_lists = [
        (
            v1::ListTasksRequest {
                page_size: -1,
                ..Default::default()
            },
            "page_size",
        ),
        (
            v1::ListTasksRequest {
                filter: "colour = red".into(),
                ..Default::default()
            },
            "filter",
        ),
        (
            v1::ListTasksRequest {
                order_by: "title".into(),
                ..Default::default()
            },
            "order_by",
        ),
    ];
    for (req, field) in bad_lists {
        let err = c.list_tasks(req).await.unwrap_err();
        assert_eq!(
            (err.code(), violation(&err).as_str()),
            (Code::InvalidArgument, field)
        );
    }
}

#[tokio::test]
async fn concurrent_starts_and_cancels_get_definite_answers() {
    let (_db, api, mut c) = setup().await;
    let id = create(&mut c, "contended", "manual").await;

    let mut calls = Vec::new();
    for i in 0..10 {
        let mut c = api.client().await.unwrap();
        let id = id.clone();
        calls.push(tokio::spawn(async move {
            c.start_pod(v1::StartPodRequest {
                task_id: id,
                meta: meta(&format!("u{i}")),
            })
            .await
        }));
    }
    let mut codes = Vec::new();
    for call in calls {
        codes.push(match call.await.unwrap() {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        });
    }
    assert_eq!(
        codes.iter().filter(|c| **c == Code::Ok).count(),
        1,
        "{codes:?}"
    );
    assert_eq!(
        codes.iter().filter(|c| **c == Code::AlreadyExists).count(),
        9,
        "{codes:?}"
    );

    let mut calls = Vec::new();
    for _ in 0..10 {
        let mut c = api.client().await.unwrap();
        let id = id.clone();
        calls.push(tokio::spawn(async move {
            c.cancel_task(v1::CancelTaskRequest {
                task_id: id,
                reason: "race".into(),
                meta: meta("u"),
            })
            .await
        }));
    }
    let (mut ok, mut already) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => ok += 1,
            Err(s) if s.code() == Code::FailedPrecondition && reason(&s) == "ALREADY_CANCELLED" => {
                already += 1
            }
            Err(s) => panic!("indefinite answer {s:?}"),
        }
    }
    assert_eq!((ok, already), (1, 9));
}

#[tokio::test]
async fn a_retried_request_id_gets_the_first_response() {
    let (_db, _api, mut c) = setup().await;
    let req = v1::CreateTaskRequest {
        task: Some(spec("once", "manual")),
        meta: meta_with_id("alice", "req-1"),
    };
    let first = c.create_task(req.clone()).await.unwrap().into_inner();
    let retry = c.create_task(req.clone()).await.unwrap().into_inner();
    assert_eq!(first.task_id, retry.task_id);
    let err = c
        .create_task(v1::CreateTaskRequest {
            task: Some(spec("different", "manual")),
            meta: meta_with_id("alice", "req-1"),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), violation(&err).as_str()),
        (Code::InvalidArgument, "meta.request_id")
    );
    // Another actor (the principal without auth) has its own request ids.
    let other = c
        .create_task(v1::CreateTaskRequest {
            task: Some(spec("once", "manual")),
            meta: meta_with_id("bob", "req-1"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(other.task_id, first.task_id);

    let cancel = v1::CancelTaskRequest {
        task_id: first.task_id.clone(),
        reason: "dup".into(),
        meta: meta_with_id("alice", "cancel-1"),
    };
    let a = c
        .cancel_task(cancel.clone())
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let b = c
        .cancel_task(cancel)
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(
        (a.status, a.version),
        (b.status, b.version),
        "the retry answers as the first did"
    );
    assert_eq!(
        c.count_tasks(v1::CountTasksRequest::default())
            .await
            .unwrap()
            .into_inner()
            .count,
        2
    );
}

#[tokio::test]
async fn pages_continue_on_any_replica_and_refuse_other_parameters() {
    let db = db().await;
    let a = ApiProcess::spawn(&db, &[NO_POD_WAIT]).await.unwrap();
    let b = ApiProcess::spawn(&db, &[NO_POD_WAIT]).await.unwrap();
    let (mut ca, mut cb) = (a.client().await.unwrap(), b.client().await.unwrap());
    let tasks: Vec<_> = (0..25)
        .map(|i| v1::TaskSpec {
            priority: i % 4,
            ..spec(&format!("t{i}"), "manual")
        })
        .collect();
    ca.create_tasks(v1::CreateTasksRequest {
        tasks,
        meta: meta("loader"),
    })
    .await
    .unwrap();

    let list = |page_token: String| v1::ListTasksRequest {
        page_size: 10,
        page_token,
        filter: "priority >= 1".into(),
        order_by: "priority desc".into(),
        ..Default::default()
    };
    let mut seen = Vec::new();
    let mut token = String::new();
    for round in 0.. {
        let replica = if round % 2 == 0 { &mut ca } else { &mut cb };
        let page = replica.list_tasks(list(token)).await.unwrap().into_inner();
        seen.extend(page.tasks.iter().map(|t| (t.priority, t.task_id.clone())));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut sorted = seen.clone();
    sorted.sort_by(|x, y| y.cmp(x));
    assert_eq!(seen, sorted, "priority desc, then task id desc");
    assert_eq!(seen.len(), 25 - 7, "25 tasks, 7 of priority 0");

    let first = cb
        .list_tasks(list(String::new()))
        .await
        .unwrap()
        .into_inner();
    let mut other = list(first.next_page_token.clone());
    other.filter = "priority >= 2".into();
    let err = ca.list_tasks(other).await.unwrap_err();
    assert_eq!(
        (err.code(), violation(&err).as_str()),
        (Code::InvalidArgument, "page_token")
    );
    let mut forged = list(first.next_page_token);
    forged.page_token.push('x');
    let err = ca.list_tasks(forged).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let default = ca
        .list_tasks(v1::ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(default.tasks.len(), 25);
    assert!(default.next_page_token.is_empty(), "empty only at the end");
}

#[tokio::test]
async fn tokens_authenticate_and_bound_who_may_act_for_whom() {
    let db = db().await;
    let tokens = format!(
        "[{{principal=\"ci\", sha256=\"{}\"}}, {{principal=\"gateway\", sha256=\"{}\", act_on_behalf=true}}]",
        taskpod_api::auth::token_hash("ci-token"),
        taskpod_api::auth::token_hash("gw-token"),
    );
    let api = ApiProcess::spawn(
        &db,
        &[
            ("TASKPOD_AUTH__ENABLED", "true"),
            ("TASKPOD_AUTH__TOKENS", &tokens),
        ],
    )
    .await
    .unwrap();
    let mut c = api.client().await.unwrap();
    let with = |token: Option<&str>, actor: &str| {
        let mut r = Request::new(v1::CreateTaskRequest {
            task: Some(spec("authd", "manual")),
            meta: meta(actor),
        });
        if let Some(t) = token {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        r
    };
    assert_eq!(
        c.create_task(with(None, "")).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        c.create_task(with(Some("wrong"), ""))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert_eq!(
        c.create_task(with(Some("ci-token"), "mallory"))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    let own = c
        .create_task(with(Some("ci-token"), ""))
        .await
        .unwrap()
        .into_inner()
        .task_id;
    let mut get = Request::new(v1::GetTaskRequest { task_id: own });
    get.metadata_mut()
        .insert("authorization", "Bearer ci-token".parse().unwrap());
    assert_eq!(
        c.get_task(get)
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap()
            .created_by,
        "ci",
        "the principal is the actor"
    );

    let onbehalf = c
        .create_task(with(Some("gw-token"), "carol"))
        .await
        .unwrap()
        .into_inner()
        .task_id;
    let mut get = Request::new(v1::GetTaskRequest { task_id: onbehalf });
    get.metadata_mut()
        .insert("authorization", "Bearer gw-token".parse().unwrap());
    assert_eq!(
        c.get_task(get)
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap()
            .created_by,
        "carol"
    );
    assert_eq!(
        c.get_task(v1::GetTaskRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
}

#[tokio::test]
async fn watch_task_streams_every_version_then_ends_at_the_terminal_state() {
    let (_db, api, mut c) = setup().await;
    let id = create(&mut c, "watched", "manual").await;
    let mut stream = c
        .watch_task(v1::WatchTaskRequest {
            task_id: id.clone(),
            from_version: -5,
        })
        .await
        .unwrap()
        .into_inner();
    let mut writer = api.client().await.unwrap();
    for to in [v1::TaskPhase::Planning, v1::TaskPhase::Development] {
        writer
            .transition_phase(v1::TransitionPhaseRequest {
                task_id: id.clone(),
                to_phase: to as i32,
                meta: meta("a"),
            })
            .await
            .unwrap();
    }
    writer
        .cancel_task(v1::CancelTaskRequest {
            task_id: id.clone(),
            reason: "done watching".into(),
            meta: meta("a"),
        })
        .await
        .unwrap();
    let mut versions = Vec::new();
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .unwrap()
    {
        if let Some(v1::watch_task_response::Kind::Event(e)) = msg.unwrap().kind {
            versions.push((e.version, e.r#type));
        }
    }
    assert_eq!(
        versions,
        [
            (1, "task_created".to_string()),
            (2, "phase_changed".into()),
            (3, "phase_changed".into()),
            (4, "task_cancelled".into())
        ]
    );
    let err = c
        .watch_task(v1::WatchTaskRequest {
            task_id: uuid::Uuid::now_v7().to_string(),
            from_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

async fn next(s: &mut tonic::Streaming<v1::WatchTasksResponse>) -> v1::WatchTasksResponse {
    tokio::time::timeout(Duration::from_secs(20), s.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn watch_tasks_lists_then_follows_and_resumes_without_gaps() {
    let (_db, api, mut c) = setup().await;
    let early = create(&mut c, "early", "sleep").await;
    create(&mut c, "other kind", "manual").await;
    let filter = || v1::WatchTasksRequest {
        filter: "kind = sleep".into(),
        ..Default::default()
    };
    let mut stream = c.watch_tasks(filter()).await.unwrap().into_inner();
    let first = next(&mut stream).await;
    assert!(
        matches!(&first.kind, Some(v1::watch_tasks_response::Kind::Task(t)) if t.task_id == early)
    );
    let done = next(&mut stream).await;
    assert!(matches!(
        done.kind,
        Some(v1::watch_tasks_response::Kind::SnapshotDone(_))
    ));

    let mut writer = api.client().await.unwrap();
    writer
        .start_pod(v1::StartPodRequest {
            task_id: early.clone(),
            meta: meta("a"),
        })
        .await
        .unwrap();
    let mut token;
    loop {
        let m = next(&mut stream).await;
        token = m.resume_token.clone();
        if let Some(v1::watch_tasks_response::Kind::Task(t)) = m.kind {
            assert_eq!(t.status, v1::TaskStatus::Active as i32);
            break;
        }
    }
    drop(stream);

    // Changes made while disconnected arrive after the resume; so does a task leaving.
    let late = create(&mut writer, "late", "sleep").await;
    writer
        .cancel_task(v1::CancelTaskRequest {
            task_id: early.clone(),
            reason: "r".into(),
            meta: meta("a"),
        })
        .await
        .unwrap();
    let mut resumed = c
        .watch_tasks(v1::WatchTasksRequest {
            resume_token: token.clone(),
            ..filter()
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = std::collections::HashMap::new();
    while got.len() < 2 {
        let m = next(&mut resumed).await;
        if let Some(v1::watch_tasks_response::Kind::Task(t)) = m.kind {
            got.insert(t.task_id.clone(), t.status);
        }
    }
    assert_eq!(got.get(&late), Some(&(v1::TaskStatus::Inactive as i32)));
    assert_eq!(got.get(&early), Some(&(v1::TaskStatus::Cancelled as i32)));

    token.push('x');
    let err = c
        .watch_tasks(v1::WatchTasksRequest {
            resume_token: token,
            ..filter()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), violation(&err).as_str()),
        (Code::InvalidArgument, "resume_token")
    );
}

#[tokio::test]
async fn health_reflection_and_graceful_shutdown() {
    let (_db, mut api, mut c) = setup().await;
    let channel = api.channel().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let check = |service: &str| tonic_health::pb::HealthCheckRequest {
        service: service.into(),
    };
    let serving = health
        .check(check("taskpod.v1.TaskService"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(futures::stream::iter([ask]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("no service list");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"taskpod.v1.TaskService"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

    // A watch stream is open when the drain starts: it ends cleanly, and the process exits.
    let id = create(&mut c, "t", "manual").await;
    let mut stream = c
        .watch_task(v1::WatchTaskRequest {
            task_id: id,
            from_version: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stream.next().await.is_some());
    api.terminate().await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the stream ended when the drain started");
    let status = api.wait(Duration::from_secs(20)).await.unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn tls_is_served_when_configured() {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let dir = std::env::temp_dir().join(format!("taskpod-tls-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(
        status.success(),
        "openssl could not make a test certificate"
    );

    let db = db().await;
    let api = ApiProcess::spawn(
        &db,
        &[
            NO_POD_WAIT,
            ("TASKPOD_TLS__CERT_PATH", cert.to_str().unwrap()),
            ("TASKPOD_TLS__KEY_PATH", key.to_str().unwrap()),
        ],
    )
    .await
    .unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&cert).unwrap()))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://{}", api.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = TaskServiceClient::new(channel);
    let id = create(&mut c, "over tls", "manual").await;
    assert!(!id.is_empty());
    // Plaintext is refused.
    let mut plain = TaskServiceClient::new(
        Endpoint::from_shared(api.endpoint())
            .unwrap()
            .connect_lazy(),
    );
    assert!(
        plain
            .get_task(v1::GetTaskRequest { task_id: id })
            .await
            .is_err()
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn watch_tasks_shows_every_status_change_even_when_they_land_together() {
    let (_db, api, mut c) = setup().await;
    let id = create(&mut c, "flicker", "manual").await;
    let mut stream = c
        .watch_tasks(v1::WatchTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    loop {
        if matches!(
            next(&mut stream).await.kind,
            Some(v1::watch_tasks_response::Kind::SnapshotDone(_))
        ) {
            break;
        }
    }
    // Two changes within one poll: active, then cancelled.
    let mut writer = api.client().await.unwrap();
    writer
        .start_pod(v1::StartPodRequest {
            task_id: id.clone(),
            meta: meta("a"),
        })
        .await
        .unwrap();
    writer
        .cancel_task(v1::CancelTaskRequest {
            task_id: id.clone(),
            reason: "r".into(),
            meta: meta("a"),
        })
        .await
        .unwrap();
    let mut statuses = Vec::new();
    while statuses.last() != Some(&(v1::TaskStatus::Cancelled as i32)) {
        if let Some(v1::watch_tasks_response::Kind::Task(t)) = next(&mut stream).await.kind {
            statuses.push(t.status);
        }
    }
    assert_eq!(
        statuses,
        [
            v1::TaskStatus::Active as i32,
            v1::TaskStatus::Cancelled as i32
        ]
    );
}

#[tokio::test]
async fn concurrent_creates_share_transactions_and_each_gets_its_own_task() {
    let db = db().await;
    let api = ApiProcess::spawn(
        &db,
        &[NO_POD_WAIT, ("TASKPOD_METRICS_LISTEN", "127.0.0.1:0")],
    )
    .await
    .unwrap();
    let c = api.client().await.unwrap();
    // 300 callers at once, as 30 actors; one of them sends an invalid title.
    let calls: Vec<_> = (0..300)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move {
                let title = if i == 150 {
                    String::new()
                } else {
                    format!("t{i}")
                };
                let answer = c
                    .create_task(v1::CreateTaskRequest {
                        task: Some(spec(&title, "manual")),
                        meta: meta(&format!("actor{}", i % 30)),
                    })
                    .await;
                (i, answer)
            })
        })
        .collect();
    let mut ids = std::collections::HashSet::new();
    let mut c = c;
    for call in calls {
        let (i, answer) = call.await.unwrap();
        if i == 150 {
            let err = answer.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument);
            assert_eq!(violation(&err), "task.title");
            continue;
        }
        let id = answer.unwrap().into_inner().task_id;
        let task = c
            .get_task(v1::GetTaskRequest {
                task_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap();
        assert_eq!(task.title, format!("t{i}"));
        assert_eq!(task.created_by, format!("actor{}", i % 30));
        assert!(ids.insert(id), "every caller its own task");
    }
    assert_eq!(ids.len(), 299);
    // Fewer create transactions than tasks: concurrent callers shared them.
    let text = api.scrape().await.unwrap();
    let transactions: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(r#"taskpod_event_append_seconds_count{writer="api"} "#))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no api appends counted:\n{text}"));
    assert!(
        transactions < 299.0,
        "{transactions} transactions for 299 tasks"
    );
}

/// Defects at the edges a gRPC user meets: an oversized request answered OUT_OF_RANGE
/// (gRPC says RESOURCE_EXHAUSTED); NUL characters answered INTERNAL (Postgres cannot
/// store them: they are bad input); reflection spoke v1 only (grpcio, Postman and older
/// grpcurl speak v1alpha) and could not be switched off; a client's traceparent of any
/// size was stored on every event.
#[tokio::test]
async fn regression_grpc_edges_answer_with_the_codes_grpc_clients_expect() {
    let (db, api, mut c) = setup().await;

    let huge = c
        .create_task(v1::CreateTaskRequest {
            task: Some(v1::TaskSpec {
                description: "d".repeat(5 * 1024 * 1024),
                ..spec("big", "manual")
            }),
            meta: meta("a"),
        })
        .await
        .unwrap_err();
    assert_eq!(huge.code(), Code::ResourceExhausted, "{huge:?}");
    assert!(huge.message().contains("too large"), "{huge:?}");

    let nul = |s: v1::TaskSpec| v1::CreateTaskRequest {
        task: Some(s),
        meta: meta("a"),
    };
    for (request, field) in [
        (nul(spec("a\0b", "manual")), "task.title"),
        (
            nul(v1::TaskSpec {
                description: "a\0b".into(),
                ..spec("ok", "manual")
            }),
            "task.description",
        ),
        (
            nul(v1::TaskSpec {
                payload: Some(prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue("x\0".into())),
                }),
                ..spec("ok", "manual")
            }),
            "task.payload",
        ),
        (
            v1::CreateTaskRequest {
                task: Some(spec("ok", "manual")),
                meta: meta("al\0ice"),
            },
            "meta.actor_id",
        ),
    ] {
        let err = c.create_task(request).await.unwrap_err();
        assert_eq!(
            (err.code(), violation(&err).as_str()),
            (Code::InvalidArgument, field),
            "{err:?}"
        );
    }
    let id = create(&mut c, "to cancel", "manual").await;
    let err = c
        .cancel_task(v1::CancelTaskRequest {
            task_id: id,
            reason: "because\0".into(),
            meta: meta("a"),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), violation(&err).as_str()),
        (Code::InvalidArgument, "reason")
    );
    let err = c
        .list_tasks(v1::ListTasksRequest {
            filter: "kind = \"a\0\"".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), violation(&err).as_str()),
        (Code::InvalidArgument, "filter")
    );

    // A traceparent is stored only when valid, and then in its 55 characters (headers
    // past 16 KiB in all are refused by the transport before any of this).
    let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut stored = Vec::new();
    for sent in [
        valid.to_owned(),
        format!("{valid}-{}", "f".repeat(8 * 1024)),
        "garbage".into(),
    ] {
        let mut req = Request::new(v1::CreateTaskRequest {
            task: Some(spec("traced", "manual")),
            meta: meta("a"),
        });
        req.metadata_mut()
            .insert("traceparent", sent.parse().unwrap());
        let id = c.create_task(req).await.unwrap().into_inner().task_id;
        let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
        let tp: Option<String> = sqlx::query_scalar(
            "SELECT metadata->>'traceparent' FROM events WHERE stream_id = $1 AND version = 1",
        )
        .bind(uuid::Uuid::parse_str(&id).unwrap())
        .fetch_one(&pool)
        .await
        .unwrap();
        stored.push(tp);
    }
    assert_eq!(stored, vec![Some(valid.to_owned()), None, None]);

    // Reflection in both versions, and none when switched off.
    let channel = api.channel().await.unwrap();
    assert!(
        list_services_v1alpha(channel)
            .await
            .unwrap()
            .contains(&"taskpod.v1.TaskService".to_owned())
    );
    let closed = ApiProcess::spawn(&db, &[NO_POD_WAIT, ("TASKPOD_REFLECTION", "false")])
        .await
        .unwrap();
    let err = list_services_v1alpha(closed.channel().await.unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
}

async fn list_services_v1alpha(channel: Channel) -> Result<Vec<String>, Status> {
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = ServerReflectionClient::new(channel)
        .server_reflection_info(futures::stream::iter([ask]))
        .await?
        .into_inner();
    match answers.next().await {
        Some(Ok(answer)) => match answer.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                Ok(list.service.into_iter().map(|s| s.name).collect())
            }
            other => panic!("not a service list: {other:?}"),
        },
        Some(Err(status)) => Err(status),
        None => panic!("no answer"),
    }
}

/// Defect: pages were bounded by rows only: 20 tasks with 250 KB payloads made every
/// ListTasks call fail ("encoded message length too large"), so no client could list
/// past them. Lists now default to the BASIC view, and a FULL page ends before
/// `max_page_bytes` with a token that continues after its last task.
#[tokio::test]
async fn regression_large_tasks_list_in_byte_capped_pages_and_basic_by_default() {
    let (_db, _api, mut c) = setup().await;
    let big = |i: usize| v1::TaskSpec {
        description: "d".repeat(1000),
        payload: Some(prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(
                "p".repeat(250 * 1024),
            )),
        }),
        auto_start: i.is_multiple_of(2),
        ..spec(&format!("big {i}"), "manual")
    };
    let mut ids = Vec::new();
    for chunk in 0..4 {
        let tasks = (chunk * 5..chunk * 5 + 5).map(big).collect();
        let created = c
            .create_tasks(v1::CreateTasksRequest {
                tasks,
                meta: meta("a"),
            })
            .await
            .unwrap()
            .into_inner();
        ids.extend(created.task_ids);
    }

    // BASIC: every task in one page, without payload or description.
    let basic = c
        .list_tasks(v1::ListTasksRequest {
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(basic.tasks.len(), 20);
    assert!(basic.next_page_token.is_empty());
    assert!(
        basic
            .tasks
            .iter()
            .all(|t| t.payload.is_none() && t.description.is_empty() && !t.title.is_empty())
    );

    // FULL: pages under 1 MiB, each task exactly once, in order.
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_tasks(v1::ListTasksRequest {
                page_size: 100,
                page_token: token.clone(),
                order_by: "created_at asc".into(),
                view: v1::TaskView::Full as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        let bytes: usize = page.tasks.iter().map(prost::Message::encoded_len).sum();
        assert!(bytes <= 1024 * 1024, "page {pages} is {bytes} bytes");
        assert!(!page.tasks.is_empty());
        assert!(
            page.tasks
                .iter()
                .all(|t| t.payload.is_some() && t.description.len() == 1000)
        );
        seen.extend(page.tasks.into_iter().map(|t| t.task_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ids, "every task once, in creation order");
    assert!(
        pages >= 5,
        "20 tasks of ~250 KiB need at least 5 pages of 1 MiB: {pages}"
    );

    // The active ones, the same way.
    let pods = c
        .list_active_pods(v1::ListActivePodsRequest {
            page_size: 100,
            view: v1::TaskView::Full as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !pods.tasks.is_empty() && pods.tasks.len() < 10,
        "{}",
        pods.tasks.len()
    );
    assert!(!pods.next_page_token.is_empty());

    // WatchTasks: BASIC unless asked.
    for (view, with_payload) in [
        (v1::TaskView::Unspecified, false),
        (v1::TaskView::Full, true),
    ] {
        let mut s = c
            .watch_tasks(v1::WatchTasksRequest {
                filter: "kind = manual".into(),
                view: view as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let first = next(&mut s).await;
        let Some(v1::watch_tasks_response::Kind::Task(t)) = first.kind else {
            panic!("a task first: {first:?}");
        };
        assert_eq!(t.payload.is_some(), with_payload, "{view:?}");
    }

    let err = c
        .list_tasks(v1::ListTasksRequest {
            view: 7,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), violation(&err).as_str()),
        (Code::InvalidArgument, "view")
    );
}
