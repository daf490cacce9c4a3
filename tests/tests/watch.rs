//! Live status across replicas: watchers on one API replica follow tasks written through
//! another and run by workers, with the Redis bus in between, through worker crashes and
//! Redis restarts. Every check is on the versions a watcher received: each exactly once,
//! in order, none missing.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::StreamExt as _;
use taskpod_e2e::api::{ApiProcess, TestDb};
use taskpod_e2e::worker::WorkerProcess;
use taskpod_proto::v1::{self, task_service_client::TaskServiceClient};
use tonic::transport::Channel;

type Client = TaskServiceClient<Channel>;

fn meta() -> Option<v1::RequestMeta> {
    Some(v1::RequestMeta {
        actor_id: "watcher-test".into(),
        ..Default::default()
    })
}

async fn create_sleep(c: &mut Client) -> String {
    c.create_task(v1::CreateTaskRequest {
        task: Some(v1::TaskSpec {
            title: "watched".into(),
            kind: "sleep".into(),
            auto_start: true,
            ..Default::default()
        }),
        meta: meta(),
    })
    .await
    .unwrap()
    .into_inner()
    .task_id
}

/// Collects a WatchTask stream to its end: (version, type) of every event.
async fn collect(mut c: Client, id: String) -> Vec<(i64, String)> {
    let mut stream = c
        .watch_task(v1::WatchTaskRequest {
            task_id: id,
            from_version: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(60), stream.next())
        .await
        .expect("the stream stalled")
    {
        if let Some(v1::watch_task_response::Kind::Event(e)) = msg.unwrap().kind {
            seen.push((e.version, e.r#type));
        }
    }
    seen
}

fn assert_gapless(seen: &[(i64, String)]) {
    let versions: Vec<i64> = seen.iter().map(|(v, _)| *v).collect();
    assert_eq!(
        versions,
        (1..=seen.len() as i64).collect::<Vec<_>>(),
        "{seen:?}"
    );
    assert!(
        seen.last().is_some_and(|(_, t)| t == "task_completed"),
        "ends at the terminal event: {seen:?}"
    );
}

struct Redis {
    port: u16,
    child: std::process::Child,
}

impl Redis {
    fn start(port: u16) -> Self {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { port, child }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_watcher_on_another_replica_sees_every_version_through_a_worker_sigkill() {
    let redis = Redis::start(
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port(),
    );
    let url = redis.url();
    let db = TestDb::create().await.unwrap();
    let bus = [
        ("TASKPOD_BUS__URL", url.as_str()),
        ("TASKPOD_WATCH__POLL_INTERVAL_MS", "5000"),
    ];
    let a = ApiProcess::spawn(&db, &bus).await.unwrap();
    let b = ApiProcess::spawn(&db, &bus).await.unwrap();
    let slow = [
        ("TASKPOD_BUS__URL", url.as_str()),
        ("TASKPOD_HANDLERS__SLEEP_PHASE_MS", "700"),
    ];
    let mut w1 = WorkerProcess::spawn(&db, "w1", &slow).await.unwrap();
    let mut w2 = WorkerProcess::spawn(&db, "w2", &slow).await.unwrap();
    let mut writer = a.client().await.unwrap();
    let id = create_sleep(&mut writer).await;
    let watcher = tokio::spawn(collect(b.client().await.unwrap(), id.clone()));

    // Kill whichever worker runs the pod, mid-run.
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let owner = loop {
        let owner: Option<uuid::Uuid> = sqlx::query_scalar(
            "SELECT owner_node FROM task_heads WHERE task_id = $1 AND pod_state = 'running'",
        )
        .bind(uuid::Uuid::parse_str(&id).unwrap())
        .fetch_optional(&pool)
        .await
        .unwrap()
        .flatten();
        if let Some(o) = owner {
            break o.to_string();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let victim = if owner == w1.node_id {
        &mut w1
    } else {
        &mut w2
    };
    victim.signal("KILL").await.unwrap();

    let seen = watcher.await.unwrap();
    assert_gapless(&seen);
    let types: Vec<&str> = seen.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(
        types.iter().filter(|t| **t == "pod_started").count(),
        2,
        "the adopted pod started again: {types:?}"
    );
    assert!(types.contains(&"pod_crashed"), "{types:?}");
}

#[tokio::test]
async fn redis_restarting_mid_stream_costs_watchers_nothing() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let redis = Redis::start(port);
    let url = redis.url();
    let db = TestDb::create().await.unwrap();
    let api = ApiProcess::spawn(
        &db,
        &[
            ("TASKPOD_BUS__URL", url.as_str()),
            ("TASKPOD_WATCH__REPAIR_INTERVAL_MS", "200"),
        ],
    )
    .await
    .unwrap();
    let _w = WorkerProcess::spawn(
        &db,
        "w",
        &[
            ("TASKPOD_BUS__URL", url.as_str()),
            ("TASKPOD_HANDLERS__SLEEP_PHASE_MS", "600"),
        ],
    )
    .await
    .unwrap();
    let mut c = api.client().await.unwrap();
    let id = create_sleep(&mut c).await;
    let watcher = tokio::spawn(collect(api.client().await.unwrap(), id.clone()));
    tokio::time::sleep(Duration::from_millis(700)).await;
    drop(redis);
    tokio::time::sleep(Duration::from_millis(900)).await;
    let _redis = Redis::start(port);
    let seen = watcher.await.unwrap();
    assert_gapless(&seen);
}

#[tokio::test]
async fn a_hundred_watchers_of_one_task_see_the_same_sequence() {
    let redis = Redis::start(
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port(),
    );
    let url = redis.url();
    let db = TestDb::create().await.unwrap();
    let api = ApiProcess::spawn(&db, &[("TASKPOD_BUS__URL", url.as_str())])
        .await
        .unwrap();
    let _w = WorkerProcess::spawn(
        &db,
        "w",
        &[
            ("TASKPOD_BUS__URL", url.as_str()),
            ("TASKPOD_HANDLERS__SLEEP_PHASE_MS", "200"),
        ],
    )
    .await
    .unwrap();
    let mut c = api.client().await.unwrap();
    let id = create_sleep(&mut c).await;
    let channel = api.channel().await.unwrap();
    let watchers: Vec<_> = (0..100)
        .map(|_| tokio::spawn(collect(TaskServiceClient::new(channel.clone()), id.clone())))
        .collect();
    let mut first = None;
    for w in watchers {
        let seen = w.await.unwrap();
        assert_gapless(&seen);
        match &first {
            None => first = Some(seen),
            Some(f) => assert_eq!(&seen, f),
        }
    }
}

#[tokio::test]
async fn dropped_publishes_are_repaired_without_the_watcher_noticing() {
    let redis = Redis::start(
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port(),
    );
    let url = redis.url();
    let db = TestDb::create().await.unwrap();
    // The test hook: every publish is lost, from the API and the worker alike.
    let lossy = [
        ("TASKPOD_BUS__URL", url.as_str()),
        ("TASKPOD_BUS__DROP_PUBLISHES", "true"),
    ];
    let api = ApiProcess::spawn(
        &db,
        &[
            lossy[0],
            lossy[1],
            ("TASKPOD_WATCH__REPAIR_INTERVAL_MS", "200"),
        ],
    )
    .await
    .unwrap();
    let _w = WorkerProcess::spawn(
        &db,
        "w",
        &[
            lossy[0],
            lossy[1],
            ("TASKPOD_HANDLERS__SLEEP_PHASE_MS", "100"),
        ],
    )
    .await
    .unwrap();
    let mut c = api.client().await.unwrap();
    let id = create_sleep(&mut c).await;
    let seen = collect(api.client().await.unwrap(), id).await;
    assert_gapless(&seen);
}

#[tokio::test]
async fn a_cancel_through_one_replica_is_read_back_on_another() {
    let db = TestDb::create().await.unwrap();
    db.offer_kinds(&["manual"], &[]).await.unwrap();
    let a = ApiProcess::spawn(&db, &[("TASKPOD_POD_WAIT_MS", "0")])
        .await
        .unwrap();
    let b = ApiProcess::spawn(&db, &[]).await.unwrap();
    let mut ca = a.client().await.unwrap();
    let mut cb = b.client().await.unwrap();
    let id = ca
        .create_task(v1::CreateTaskRequest {
            task: Some(v1::TaskSpec {
                title: "t".into(),
                kind: "manual".into(),
                ..Default::default()
            }),
            meta: meta(),
        })
        .await
        .unwrap()
        .into_inner()
        .task_id;
    ca.cancel_task(v1::CancelTaskRequest {
        task_id: id.clone(),
        reason: "no".into(),
        meta: meta(),
    })
    .await
    .unwrap();
    let t = cb
        .get_task(v1::GetTaskRequest { task_id: id })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(
        t.status,
        v1::TaskStatus::Cancelled as i32,
        "read-your-writes on any replica"
    );
}

#[tokio::test]
async fn a_resumed_task_set_watch_misses_no_late_commit() {
    let db = TestDb::create().await.unwrap();
    db.offer_kinds(&["manual"], &[]).await.unwrap();
    let api = ApiProcess::spawn(&db, &[("TASKPOD_POD_WAIT_MS", "0")])
        .await
        .unwrap();
    let mut c = api.client().await.unwrap();
    let create = |title: &str| v1::CreateTaskRequest {
        task: Some(v1::TaskSpec {
            title: title.into(),
            kind: "manual".into(),
            ..Default::default()
        }),
        meta: meta(),
    };
    let late = c
        .create_task(create("late"))
        .await
        .unwrap()
        .into_inner()
        .task_id;
    let mut stream = c
        .watch_tasks(v1::WatchTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut token = String::new();
    loop {
        let m = stream.next().await.unwrap().unwrap();
        token = if m.resume_token.is_empty() {
            token
        } else {
            m.resume_token.clone()
        };
        if matches!(
            m.kind,
            Some(v1::watch_tasks_response::Kind::SnapshotDone(_))
        ) {
            break;
        }
    }
    // A transaction takes its id now, writes to `late`, and commits only after the
    // stream was dropped and another change committed.
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let mut held = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *held)
        .await
        .unwrap();
    let quick = c
        .create_task(create("quick"))
        .await
        .unwrap()
        .into_inner()
        .task_id;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(stream);
    // What a StartPod writes (the event, the head, the listing row), plus a priority
    // the test can recognise.
    let late_id = uuid::Uuid::parse_str(&late).unwrap();
    for sql in [
        "UPDATE tasks SET priority = 7, status = 'active', updated_at = now() WHERE task_id = $1",
        "UPDATE task_heads SET version = 2, status = 'active' WHERE task_id = $1",
        "INSERT INTO events (stream_id, version, type, data, metadata) \
         VALUES ($1, 2, 'pod_requested', '{}', '{\"actor_id\": \"late\", \"correlation_id\": \"late\"}')",
    ] {
        sqlx::query(sql)
            .bind(late_id)
            .execute(&mut *held)
            .await
            .unwrap();
    }
    held.commit().await.unwrap();

    let mut resumed = c
        .watch_tasks(v1::WatchTasksRequest {
            resume_token: token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = std::collections::HashMap::new();
    while !(got.contains_key(&quick) && got.get(&late) == Some(&7)) {
        let m = tokio::time::timeout(Duration::from_secs(20), resumed.next())
            .await
            .expect("both changes arrive")
            .unwrap()
            .unwrap();
        if let Some(v1::watch_tasks_response::Kind::Task(t)) = m.kind {
            got.insert(t.task_id.clone(), t.priority);
        }
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_does_not_grow_server_memory() {
    let db = TestDb::create().await.unwrap();
    db.offer_kinds(&["manual"], &[]).await.unwrap();
    let api = ApiProcess::spawn(&db, &[]).await.unwrap();
    let mut c = api.client().await.unwrap();
    // Enough tasks that an unbounded buffer of their snapshot would take tens of MiB
    // (each carries a 1 KiB description).
    let description = "x".repeat(1024);
    for batch in 0..40 {
        let tasks = (0..1000)
            .map(|i| v1::TaskSpec {
                title: format!("t{batch}-{i}"),
                kind: "manual".into(),
                description: description.clone(),
                ..Default::default()
            })
            .collect();
        c.create_tasks(v1::CreateTasksRequest {
            tasks,
            meta: meta(),
        })
        .await
        .unwrap();
    }
    let before = api.rss_kib().unwrap();
    // Open a watch of all 40,000 and never read it.
    let stalled = c
        .watch_tasks(v1::WatchTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = api.rss_kib().unwrap();
    assert!(
        after.saturating_sub(before) < 16 * 1024,
        "server memory grew from {before} KiB to {after} KiB for a client that does not read"
    );
    // The stream still works once the client reads again.
    let mut stalled = stalled;
    assert!(stalled.next().await.unwrap().is_ok());
}

#[tokio::test]
async fn every_update_carries_the_fields_a_filter_can_name() {
    use taskpod_core::bus::{BusEvent, BusSettings, Subscription, TaskUpdate, channels};
    let redis = Redis::start(
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port(),
    );
    let url = redis.url();
    let db = TestDb::create().await.unwrap();
    db.offer_kinds(&["manual"], &[]).await.unwrap();
    let api = ApiProcess::spawn(
        &db,
        &[
            ("TASKPOD_BUS__URL", url.as_str()),
            ("TASKPOD_POD_WAIT_MS", "0"),
        ],
    )
    .await
    .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let (sub, mut rx, _task) =
        Subscription::start(&BusSettings::with_url(url.clone()), stop.clone()).unwrap();
    sub.set_channels([channels::TASKS.to_owned()].into());
    assert_eq!(rx.recv().await, Some(BusEvent::Connected));
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut c = api.client().await.unwrap();
    let id = c
        .create_task(v1::CreateTaskRequest {
            task: Some(v1::TaskSpec {
                title: "t".into(),
                kind: "manual".into(),
                priority: 4,
                ..Default::default()
            }),
            meta: meta(),
        })
        .await
        .unwrap()
        .into_inner()
        .task_id;
    c.cancel_task(v1::CancelTaskRequest {
        task_id: id.clone(),
        reason: "r".into(),
        meta: meta(),
    })
    .await
    .unwrap();
    let mut updates: Vec<TaskUpdate> = Vec::new();
    while updates.len() < 2 {
        if let Some(BusEvent::Message { payload, .. }) =
            tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .unwrap()
        {
            updates.push(serde_json::from_slice(&payload).unwrap());
        }
    }
    for u in &updates {
        assert_eq!(u.task_id.to_string(), id);
        assert_eq!(
            (u.kind.as_str(), u.priority, u.created_by.as_deref()),
            ("manual", 4, Some("watcher-test"))
        );
        assert!(u.created_at.is_some() && u.updated_at.is_some(), "{u:?}");
    }
    assert_eq!(
        (updates[0].version, updates[0].event_type.as_str()),
        (1, "task_created")
    );
    assert_eq!(
        (updates[1].version, updates[1].event_type.as_str()),
        (2, "task_cancelled")
    );
    assert!(updates[1].updated_at >= updates[0].updated_at);
    stop.cancel();
}
