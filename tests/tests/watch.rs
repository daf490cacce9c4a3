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
