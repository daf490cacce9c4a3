//! What an API replica holds follows what its clients follow, not what the cluster
//! does: 50 narrow WatchTasks streams stay at the tasks they follow while 200,000 tasks
//! change through another replica (1,000,000 with `TASKPOD_RESOURCE_CHANGES`), and the
//! replica's memory stays within 10% of its warm baseline. Counts and sizes, never
//! times. Real API processes against a real Postgres.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::StreamExt as _;
use taskpod_e2e::api::{ApiProcess, TestDb};
use taskpod_proto::v1::{self, task_service_client::TaskServiceClient, watch_tasks_response::Kind};
use tonic::Streaming;
use tonic::transport::Channel;

type Client = TaskServiceClient<Channel>;

/// Tasks changed elsewhere, for the long mode.
const CHANGES_ENV: &str = "TASKPOD_RESOURCE_CHANGES";
const STREAMS: usize = 50;
const FOLLOWED: usize = 4;

fn meta() -> Option<v1::RequestMeta> {
    Some(v1::RequestMeta {
        actor_id: "resource-test".into(),
        ..Default::default()
    })
}

fn spec(kind: &str, title: String) -> v1::TaskSpec {
    v1::TaskSpec {
        title,
        kind: kind.into(),
        // Something for the replica to carry if it read what it does not show.
        payload: Some(prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue("x".repeat(512))),
        }),
        ..Default::default()
    }
}

async fn create(c: &mut Client, kind: &str, title: &str) -> String {
    c.create_task(v1::CreateTaskRequest {
        task: Some(spec(kind, title.to_owned())),
        meta: meta(),
    })
    .await
    .unwrap()
    .into_inner()
    .task_id
}

/// Creates `n` tasks of `kind` through `clients` side by side, 1,000 a call.
async fn flood(clients: &[Client], kind: &str, n: usize) {
    let calls = n.div_ceil(1000);
    let mut set = tokio::task::JoinSet::new();
    for (lane, client) in clients.iter().enumerate() {
        let mut c = client.clone();
        let kind = kind.to_owned();
        let lanes = clients.len();
        set.spawn(async move {
            for call in (lane..calls).step_by(lanes) {
                let tasks = (call * 1000..n.min(call * 1000 + 1000))
                    .map(|i| spec(&kind, format!("elsewhere {i}")))
                    .collect();
                c.create_tasks(v1::CreateTasksRequest {
                    tasks,
                    meta: meta(),
                })
                .await
                .unwrap();
            }
        });
    }
    while let Some(done) = set.join_next().await {
        done.unwrap();
    }
}

/// A stream read all along, as a watcher reads it: what it shows arrives on `shown`.
///
/// Reading only when the test looks would not do: the streams share one HTTP/2
/// connection, and messages a client leaves unread hold the connection's flow-control
/// window. Left unread through a million changes, the heartbeats of fifty streams held
/// all of it, so nothing more reached the client on that connection (found by the long
/// mode: the test waited forever on a reply the server could not send).
struct Reader {
    shown: tokio::sync::mpsc::UnboundedReceiver<Result<String, String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Reader {
    fn spawn(mut stream: Streaming<v1::WatchTasksResponse>) -> Self {
        let (tx, shown) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Some(m) = stream.next().await {
                let item = match m.map(|m| m.kind) {
                    Ok(Some(Kind::Task(t))) => Ok(t.task_id),
                    Ok(Some(Kind::Left(l))) => {
                        Err(format!("nothing leaves a kind filter: {}", l.task_id))
                    }
                    Ok(Some(Kind::Heartbeat(_) | Kind::SnapshotDone(_))) => continue,
                    Ok(None) => Err("a message without a kind".to_owned()),
                    Err(status) => Err(format!("the stream failed: {status}")),
                };
                if tx.send(item).is_err() {
                    return;
                }
            }
            let _ = tx.send(Err("the stream ended".to_owned()));
        });
        Self { shown, task }
    }

    /// Every task shown until `id`, `id` included.
    async fn read_to(&mut self, id: &str) -> Vec<String> {
        let mut shown = Vec::new();
        loop {
            let next = tokio::time::timeout(Duration::from_secs(300), self.shown.recv())
                .await
                .expect("the stream stalled")
                .expect("the reader is gone")
                .unwrap_or_else(|why| panic!("{why}"));
            let done = next == id;
            shown.push(next);
            if done {
                return shown;
            }
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn gauge(metrics: &str, name: &str) -> i64 {
    taskpod_e2e::metric_count(metrics, name)
}

/// Creates a narrow task and waits until every stream has shown it: each has then read
/// the feed past everything committed before it.
async fn catch_up(c: &mut Client, streams: &mut [Reader], title: &str) {
    let marker = create(c, "narrow", title).await;
    for s in streams.iter_mut() {
        let shown = s.read_to(&marker).await;
        assert_eq!(shown, vec![marker.clone()], "only the narrow marker");
    }
}

#[tokio::test]
async fn fifty_narrow_streams_hold_what_they_follow_while_the_cluster_changes() {
    let changes: usize = std::env::var(CHANGES_ENV)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(200_000);
    let db = TestDb::create().await.unwrap();
    db.offer_kinds(&["narrow", "other"], &[]).await.unwrap();
    let env = [
        ("TASKPOD_POD_WAIT_MS", "0"),
        ("TASKPOD_METRICS_LISTEN", "127.0.0.1:0"),
        ("TASKPOD_WATCH__POLL_INTERVAL_MS", "200"),
    ];
    let watched = ApiProcess::spawn(&db, &env).await.unwrap();
    let elsewhere = ApiProcess::spawn(&db, &env).await.unwrap();
    let mut c = watched.client().await.unwrap();
    for i in 0..FOLLOWED {
        create(&mut c, "narrow", &format!("followed {i}")).await;
    }
    // The streams on a connection of their own, as a dashboard's would be; the markers
    // go through `c`.
    let mut watching = watched.client().await.unwrap();
    let mut streams = Vec::with_capacity(STREAMS);
    for _ in 0..STREAMS {
        let mut s = watching
            .watch_tasks(v1::WatchTasksRequest {
                filter: r#"kind = "narrow""#.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut snapshot = 0;
        loop {
            match s.next().await.unwrap().unwrap().kind.unwrap() {
                Kind::Task(_) => snapshot += 1,
                Kind::SnapshotDone(_) => break,
                other => panic!("before snapshot_done: {other:?}"),
            }
        }
        assert_eq!(snapshot, FOLLOWED);
        streams.push(Reader::spawn(s));
    }
    let writers: Vec<Client> = vec![
        elsewhere.client().await.unwrap(),
        elsewhere.client().await.unwrap(),
        elsewhere.client().await.unwrap(),
    ];

    // Warm up: the replica's pools, buffers and allocator reach their working size.
    flood(&writers, "other", 20_000).await;
    catch_up(&mut c, &mut streams, "warm").await;
    let baseline = watched.rss_kib().unwrap();
    let metrics = watched.scrape().await.unwrap();
    assert_eq!(
        gauge(&metrics, "taskpod_watch_tracked") as usize,
        STREAMS * (FOLLOWED + 1)
    );

    flood(&writers, "other", changes).await;
    catch_up(&mut c, &mut streams, "after").await;
    let after = watched.rss_kib().unwrap();
    let metrics = watched.scrape().await.unwrap();
    assert_eq!(
        gauge(&metrics, "taskpod_watch_tracked") as usize,
        STREAMS * (FOLLOWED + 2),
        "each stream follows its six narrow tasks, none of the {changes} others"
    );
    eprintln!("watched replica RSS: {baseline} KiB warm, {after} KiB after {changes} changes");
    assert!(
        after * 10 < baseline * 11,
        "RSS grew more than 10%: {baseline} KiB warm, {after} KiB after {changes} changes elsewhere"
    );
}
