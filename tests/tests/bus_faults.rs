//! The status bus under Redis faults (issue 13, defect 8): a stalled Redis costs
//! watchers latency, never writers; a subscription that went silent is replaced within
//! seconds; a subscription Redis cuts (`CLIENT KILL`, the pubsub output buffer limit)
//! costs no watcher a version.
//!
//! Each test runs a cluster with its own Redis (paused, reconfigured, its clients
//! killed). The watching replicas repair and send heartbeats only every two minutes
//! here, so a stream that keeps up does so through the bus, or through the polling a
//! replica falls back to while it knows the bus is down, never by waiting out a repair.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::StreamExt as _;
use taskpod_e2e::cluster::{Cluster, ClusterSpec};
use taskpod_e2e::eventually;
use taskpod_proto::v1::{self, task_service_client::TaskServiceClient};
use tokio::time::Instant;
use tonic::transport::Channel;

type Client = TaskServiceClient<Channel>;

/// Within this a watcher must see a change: well under the two minutes of the repair
/// read and the heartbeat, well over a subscription's detection of a dead connection
/// (a ping every 2 s, answered within `bus.timeout_ms`).
const PROMPT: Duration = Duration::from_secs(10);

/// The old publisher waited up to `bus.timeout_ms` on Redis inside a write; with it at
/// 3 s here, a write that answers within this waited on nothing of Redis.
const WRITE_BOUND: Duration = Duration::from_secs(1);

/// What makes the watching replicas depend on the bus (see the module docs).
fn watching_replica(spec: ClusterSpec) -> ClusterSpec {
    spec.api_env("TASKPOD_WATCH__REPAIR_INTERVAL_MS", 120_000)
        .api_env("TASKPOD_WATCH__HEARTBEAT_INTERVAL_MS", 120_000)
        .api_env("TASKPOD_WATCH__POLL_INTERVAL_MS", 200)
}

fn meta() -> Option<v1::RequestMeta> {
    Some(v1::RequestMeta {
        actor_id: "bus-faults".into(),
        ..Default::default()
    })
}

fn spec(kind: &str, auto_start: bool) -> v1::TaskSpec {
    v1::TaskSpec {
        title: "bus".into(),
        kind: kind.into(),
        auto_start,
        ..Default::default()
    }
}

async fn create(c: &mut Client, kind: &str, auto_start: bool) -> String {
    c.create_task(v1::CreateTaskRequest {
        task: Some(spec(kind, auto_start)),
        meta: meta(),
    })
    .await
    .unwrap()
    .into_inner()
    .task_id
}

/// The phase after `from` on the way `spec_clarification -> planning -> development`,
/// then back and forth between `development` and `review`.
fn next_phase(from: i32) -> v1::TaskPhase {
    use v1::TaskPhase as P;
    match P::try_from(from).unwrap() {
        P::SpecClarification => P::Planning,
        P::Planning | P::Review => P::Development,
        P::Development => P::Review,
        other => panic!("no next phase after {other:?}"),
    }
}

/// Moves a manual task on by one phase; its new version.
async fn step(c: &mut Client, id: &str) -> i64 {
    let task = c
        .get_task(v1::GetTaskRequest {
            task_id: id.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    c.transition_phase(v1::TransitionPhaseRequest {
        task_id: id.to_owned(),
        to_phase: next_phase(task.phase).into(),
        meta: meta(),
    })
    .await
    .unwrap()
    .into_inner()
    .task
    .unwrap()
    .version
}

/// A WatchTask stream and the versions it delivered, checked to come exactly once and
/// in order.
struct Watcher {
    id: String,
    stream: tonic::Streaming<v1::WatchTaskResponse>,
    versions: Vec<i64>,
    last_type: String,
}

impl Watcher {
    async fn open(c: &mut Client, id: &str) -> Self {
        let stream = c
            .watch_task(v1::WatchTaskRequest {
                task_id: id.to_owned(),
                from_version: 1,
            })
            .await
            .unwrap()
            .into_inner();
        Self {
            id: id.to_owned(),
            stream,
            versions: Vec::new(),
            last_type: String::new(),
        }
    }

    fn last(&self) -> i64 {
        self.versions.last().copied().unwrap_or(0)
    }

    /// Reads until `version` arrived, each message within `within`.
    async fn until(&mut self, version: i64, within: Duration) {
        while self.last() < version {
            let msg = tokio::time::timeout(within, self.stream.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "{}: version {version} not delivered within {within:?}; got {:?}",
                        self.id, self.versions
                    )
                })
                .unwrap_or_else(|| panic!("{}: the stream ended", self.id))
                .unwrap();
            if let Some(v1::watch_task_response::Kind::Event(e)) = msg.kind {
                assert_eq!(
                    e.version,
                    self.last() + 1,
                    "{}: every version once, in order: {:?} then {}",
                    self.id,
                    self.versions,
                    e.version
                );
                self.versions.push(e.version);
                self.last_type = e.r#type;
            }
        }
    }

    /// Reads to the end of a task that completes, each message within `within`.
    async fn until_completed(&mut self, within: Duration) {
        while self.last_type != "task_completed" {
            let next = self.last() + 1;
            self.until(next, within).await;
        }
    }
}

/// How many subscribers Redis has on `channel` (`PUBSUB NUMSUB`).
async fn subscribers(cluster: &Cluster, channel: &str) -> i64 {
    let reply = cluster
        .redis()
        .unwrap()
        .command(&["PUBSUB", "NUMSUB", channel])
        .await
        .unwrap();
    match reply {
        redis::Value::Array(items) => match items.get(1) {
            Some(redis::Value::Int(n)) => *n,
            other => panic!("PUBSUB NUMSUB answered {other:?}"),
        },
        other => panic!("PUBSUB NUMSUB answered {other:?}"),
    }
}

async fn subscribed(cluster: &Cluster, id: &str) {
    let channel = format!("task:{id}");
    eventually(&format!("a replica subscribes to {channel}"), || async {
        subscribers(cluster, &channel).await >= 1
    })
    .await;
}

/// Defect 8: the publisher held its mutex across a connect of up to `bus.timeout_ms`
/// and every publish was awaited inline after the commit, so a black-holed Redis
/// stalled every API answer and every pod step. With Redis SIGSTOPped, creates,
/// commands and a pod's whole run answer promptly; watchers get every change from the
/// store meanwhile, and from the bus again once Redis resumes.
#[tokio::test]
async fn regression_a_black_holed_redis_never_stalls_a_write() {
    let spec = watching_replica(ClusterSpec::new(1, 1))
        .api_env("TASKPOD_BUS__TIMEOUT_MS", 3_000)
        .worker_env("TASKPOD_BUS__TIMEOUT_MS", 3_000)
        .worker_env("TASKPOD_HANDLERS__SLEEP_PHASE_MS", 100);
    let mut cluster = Cluster::start(spec).await.unwrap();
    let mut c = cluster.api("api1").unwrap().client().unwrap();

    // Warm up every connection to Redis: a run watched through the bus.
    let warm = create(&mut c, "sleep", true).await;
    let mut watcher = Watcher::open(&mut c, &warm).await;
    watcher.until_completed(PROMPT).await;
    let manual = create(&mut c, "manual", false).await;
    let mut manual_watch = Watcher::open(&mut c, &manual).await;
    manual_watch.until(1, PROMPT).await;
    subscribed(&cluster, &manual).await;

    cluster.pause_redis().unwrap();
    let mut slowest = Duration::ZERO;
    let mut timed = |started: Instant| slowest = slowest.max(started.elapsed());
    for _ in 0..50 {
        let started = Instant::now();
        create(&mut c, "manual", false).await;
        timed(started);
    }
    let mut version = 1;
    for _ in 0..10 {
        let started = Instant::now();
        version = step(&mut c, &manual).await;
        timed(started);
    }
    assert!(
        slowest < WRITE_BOUND,
        "with Redis black-holed a write took {slowest:?}"
    );
    // A pod's steps publish too: the whole run takes its phases, not Redis timeouts.
    let started = Instant::now();
    let run = create(&mut c, "sleep", true).await;
    let mut run_watch = Watcher::open(&mut c, &run).await;
    run_watch.until_completed(PROMPT).await;
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "a run of four 100 ms phases took {:?} with Redis black-holed",
        started.elapsed()
    );
    // Every change reached the watcher, from the store.
    manual_watch.until(version, PROMPT).await;

    // Back from the bus once Redis answers again.
    cluster.resume_redis().unwrap();
    subscribed(&cluster, &manual).await;
    for _ in 0..5 {
        let version = step(&mut c, &manual).await;
        manual_watch.until(version, PROMPT).await;
    }
    let after = create(&mut c, "sleep", true).await;
    Watcher::open(&mut c, &after)
        .await
        .until_completed(PROMPT)
        .await;
}

/// Defect 8: the subscriber had no keepalive, so a subscription whose connection went
/// silent (no FIN, no RST) was never noticed and its replica's watchers waited for the
/// repair read. The replica watching here reaches Redis through a proxy that strands
/// its open connections; its streams keep up through a new subscription within seconds.
#[tokio::test]
async fn regression_a_half_open_subscription_is_replaced_within_seconds() {
    // api1 watches through the proxy, api2 writes with a direct link.
    let spec = watching_replica(ClusterSpec::new(1, 2)).api_redis_via_proxy(0);
    let cluster = Cluster::start(spec).await.unwrap();
    let mut reader = cluster.api("api1").unwrap().client().unwrap();
    let mut writer = cluster.api("api2").unwrap().client().unwrap();
    let id = create(&mut writer, "manual", false).await;
    let mut watcher = Watcher::open(&mut reader, &id).await;
    watcher.until(1, PROMPT).await;
    subscribed(&cluster, &id).await;
    let version = step(&mut writer, &id).await;
    watcher.until(version, PROMPT).await;

    let proxy = cluster.api("api1").unwrap().redis_proxy().unwrap();
    let before = proxy.connections();
    proxy.strand_open();
    for _ in 0..6 {
        let version = step(&mut writer, &id).await;
        watcher.until(version, PROMPT).await;
    }
    assert!(
        proxy.connections() > before,
        "the replica connected again past the stranded connections"
    );
}

/// Redis cutting subscribers itself: `CLIENT KILL TYPE pubsub`, and a pubsub output
/// buffer limit so small that a burst on `tasks` larger than the socket buffers
/// disconnects its subscribers (the test publishes the burst itself: the product's own
/// would take thousands of tasks to outgrow a loopback socket's buffers). The watchers
/// of a replica whose subscription keeps being cut get every version, in order,
/// promptly.
#[tokio::test]
async fn subscriptions_cut_by_redis_cost_no_version() {
    let cluster = Cluster::start(watching_replica(ClusterSpec::new(1, 1)))
        .await
        .unwrap();
    let redis = cluster.redis().unwrap();
    let mut c = cluster.api("api1").unwrap().client().unwrap();
    let mut watchers = Vec::new();
    for _ in 0..3 {
        let id = create(&mut c, "manual", false).await;
        let mut w = Watcher::open(&mut c, &id).await;
        w.until(1, PROMPT).await;
        subscribed(&cluster, &id).await;
        watchers.push(w);
    }
    // A WatchTasks stream subscribes the replica to `tasks`, where bursts land.
    let mut all = c
        .watch_tasks(v1::WatchTasksRequest {
            filter: r#"kind = "manual""#.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let drain = tokio::spawn(async move { while let Some(Ok(_)) = all.next().await {} });
    eventually("a replica subscribes to tasks", || async {
        subscribers(&cluster, "tasks").await >= 1
    })
    .await;

    for _ in 0..4 {
        redis
            .command(&["CLIENT", "KILL", "TYPE", "pubsub"])
            .await
            .unwrap();
        for w in &mut watchers {
            let version = step(&mut c, &w.id).await;
            w.until(version, PROMPT).await;
        }
    }

    redis
        .command(&[
            "CONFIG",
            "SET",
            "client-output-buffer-limit",
            "pubsub 1kb 0 0",
        ])
        .await
        .unwrap();
    let burst = "x".repeat(8 << 20);
    for round in 1..=3 {
        eventually("the replica subscribes to tasks again", || async {
            subscribers(&cluster, "tasks").await >= 1
        })
        .await;
        redis.command(&["PUBLISH", "tasks", &burst]).await.unwrap();
        eventually("Redis cut the subscriber off", || async {
            buffer_disconnections(redis) >= round
        })
        .await;
        for w in &mut watchers {
            let version = step(&mut c, &w.id).await;
            w.until(version, PROMPT).await;
        }
    }
    drain.abort();
}

/// Subscribers Redis disconnected for overrunning their output buffer limit so far
/// (Redis 7.0 counts them nowhere but its log).
fn buffer_disconnections(redis: &taskpod_e2e::cluster::RedisServer) -> usize {
    std::fs::read_to_string(redis.log_path())
        .unwrap_or_default()
        .matches("closed ASAP for overcoming of output buffer limits")
        .count()
}
