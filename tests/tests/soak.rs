//! The soak: a cluster under a fixed rate of `exec` tasks, 5% of them failing, while
//! the memory of every taskpod process and the connections to Postgres and Redis are
//! sampled. Everything pushed is executed and ends as its program says, no two epochs
//! of a task run at once, and memory and connections stay flat. Counts and sizes,
//! never times. All along, a transaction stays open in another database of the same
//! server, and a WatchTasks stream on the other replica must still show every task at
//! its final version: another application's long transaction never holds the feed.
//!
//! - CI mode: 20 s at 20 tasks a second (a burst the cluster drains afterwards).
//! - Long mode: `scripts/build-binaries.sh --release`, then `TASKPOD_SOAK_SECS=600
//!   TASKPOD_SOAK_RATE=12 cargo nextest run --release -p taskpod-e2e --test soak`. The
//!   rate must stay below what the machine sustains, or the backlog (and memory with
//!   it) grows and "flat" means nothing: on two cores, measured with this test, about
//!   16 of these `exec` tasks a second in release (11,845 of 12,000 had ended two
//!   minutes after 10 minutes at 20/s) and about 10 in debug (7,185 of 12,000).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use taskpod_proto::v1::watch_tasks_response::Kind;

use taskpod_e2e::chaos::overlap;
use taskpod_e2e::chaos::programs::{EXEC_LOG, Program};
use taskpod_e2e::cluster::{Cluster, ClusterSpec, DATABASE};
use taskpod_e2e::os;
use taskpod_proto::v1;

const SECS_ENV: &str = "TASKPOD_SOAK_SECS";
const RATE_ENV: &str = "TASKPOD_SOAK_RATE";
/// One task in this many runs the failing program.
const FAIL_EVERY: usize = 20;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name} must be a number"))
        })
        .unwrap_or(default)
}

/// One look at the cluster's resources.
#[derive(Clone, Debug)]
struct Sample {
    /// KiB resident, by process name.
    rss: BTreeMap<String, u64>,
    postgres: usize,
    redis: usize,
}

async fn sample(cluster: &Cluster, redis_port: u16) -> Sample {
    let rss = cluster
        .workers()
        .iter()
        .chain(cluster.apis())
        .filter_map(|m| Some((m.name().to_owned(), os::rss_kib(m.pid()?)?)))
        .collect();
    // Every session on taskpod's database but this test's own pool.
    let postgres: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid() \
         AND application_name <> ''",
    )
    .bind(DATABASE)
    .fetch_one(cluster.pool())
    .await
    .unwrap();
    Sample {
        rss,
        postgres: usize::try_from(postgres).unwrap_or(0),
        redis: os::connections_to(redis_port),
    }
}

/// What a watcher has shown: the newest version of each task, and how its stream
/// ended, if it did.
#[derive(Debug, Default)]
struct Watched {
    versions: BTreeMap<String, i64>,
    ended: Option<String>,
}

/// Follows every task on a WatchTasks stream until the returned handle is aborted.
async fn watch_all(
    mut client: taskpod_proto::v1::task_service_client::TaskServiceClient<
        tonic::transport::Channel,
    >,
) -> (Arc<Mutex<Watched>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Watched::default()));
    let mut stream = client
        .watch_tasks(v1::WatchTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    let out = Arc::clone(&seen);
    let task = tokio::spawn(async move {
        let ended = loop {
            match stream.next().await {
                Some(Ok(m)) => {
                    if let Some(Kind::Task(t)) = m.kind {
                        out.lock().unwrap().versions.insert(t.task_id, t.version);
                    }
                }
                Some(Err(e)) => break e.to_string(),
                None => break "the stream ended".to_owned(),
            }
        };
        out.lock().unwrap().ended = Some(ended);
    });
    (seen, task)
}

fn spec(program: Program, i: usize) -> v1::TaskSpec {
    v1::TaskSpec {
        title: format!("soak {i}"),
        kind: "exec".into(),
        payload: Some(taskpod_proto::convert::json_to_value(
            &serde_json::json!({ "program": program.name() }),
        )),
        auto_start: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_load_runs_everything_once_with_flat_memory_and_connections() {
    let secs = env_or(SECS_ENV, 20);
    let rate = env_or(RATE_ENV, 20).max(1);
    let total = usize::try_from(secs * rate).unwrap();
    let mut spec_ = ClusterSpec::new(2, 2);
    spec_.programs.push(Program::Steady.spec());
    spec_.programs.push(Program::Fatal.spec());
    let cluster = Cluster::start(spec_).await.unwrap();
    cluster
        .wait_partitions_owned(Duration::from_secs(30))
        .await
        .unwrap();
    let redis_port: u16 = cluster
        .redis_url()
        .and_then(|u| u.rsplit(':').next().and_then(|p| p.parse().ok()))
        .unwrap();
    let client = cluster.apis()[0].client().unwrap();

    // Another application's transaction, open for the whole soak (10 minutes in the
    // long mode), and a watcher on the replica that creates nothing.
    let mut other = cluster.other_database().await.unwrap();
    sqlx::query("BEGIN").execute(&mut other).await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut other)
        .await
        .unwrap();
    let (watched, watcher) = watch_all(cluster.apis()[1].client().unwrap()).await;

    let started = tokio::time::Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    let mut samples = Vec::new();
    let mut next_sample = started;
    for i in 0..total {
        let due = started + Duration::from_secs(secs).mul_f64(i as f64 / total as f64);
        if due >= next_sample {
            samples.push(sample(&cluster, redis_port).await);
            next_sample += Duration::from_secs(2);
        }
        tokio::time::sleep_until(due).await;
        let program = if i % FAIL_EVERY == FAIL_EVERY - 1 {
            Program::Fatal
        } else {
            Program::Steady
        };
        let mut c = client.clone();
        calls.spawn(async move {
            let id = c
                .create_task(v1::CreateTaskRequest {
                    task: Some(spec(program, i)),
                    meta: Some(v1::RequestMeta {
                        actor_id: "soak".into(),
                        ..Default::default()
                    }),
                })
                .await
                .unwrap_or_else(|e| panic!("create {i} refused without any fault: {e}"))
                .into_inner()
                .task_id;
            (id, program)
        });
    }
    let mut pushed: BTreeMap<String, Program> = BTreeMap::new();
    while let Some(done) = calls.join_next().await {
        let (id, program) = done.unwrap();
        pushed.insert(id, program);
    }
    assert_eq!(pushed.len(), total);

    // Everything ends, as its program says.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let ended: Vec<(uuid::Uuid, String)> = loop {
        let rows: Vec<(uuid::Uuid, String)> = sqlx::query_as(
            "SELECT task_id, status FROM tasks WHERE status IN ('completed', 'failed')",
        )
        .fetch_all(cluster.pool())
        .await
        .unwrap();
        if rows.len() == total {
            break rows;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {total} tasks ended two minutes after the load",
            rows.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    samples.push(sample(&cluster, redis_port).await);
    let finals: BTreeMap<String, i64> =
        sqlx::query_as::<_, (uuid::Uuid, i64)>("SELECT task_id, version FROM task_heads")
            .fetch_all(cluster.pool())
            .await
            .unwrap()
            .into_iter()
            .map(|(id, v)| (id.to_string(), v))
            .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (behind, ended) = {
            let w = watched.lock().unwrap();
            let behind = finals
                .iter()
                .filter(|(id, v)| w.versions.get(*id) != Some(*v))
                .count();
            (behind, w.ended.clone())
        };
        assert_eq!(ended, None, "the watch stream ended without any fault");
        if behind == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the watcher never showed {behind} of {} tasks at their final version while \
             another database held a transaction",
            finals.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    watcher.abort();
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    for (id, status) in &ended {
        let want = match pushed.get(&id.to_string()) {
            Some(Program::Fatal) => "failed",
            Some(_) => "completed",
            None => panic!("a task nobody pushed: {id}"),
        };
        assert_eq!(status, want, "task {id}");
    }

    // Executed: every pushed task's program ran, and no two epochs of one task ran at
    // once. A run is repeated under a new epoch only when its worker could not confirm
    // its lock session in time (the guard kills it first): counted, never overlapping.
    let (lines, torn) =
        overlap::parse(&std::fs::read_to_string(cluster.programs_dir().join(EXEC_LOG)).unwrap());
    assert_eq!(torn, 0, "nothing was killed mid-line");
    let mut epochs: BTreeMap<&str, BTreeSet<i64>> = BTreeMap::new();
    for line in &lines {
        epochs
            .entry(line.task.as_str())
            .or_default()
            .insert(line.epoch);
    }
    assert_eq!(epochs.len(), total, "every pushed task executed");
    let overlapping = overlap::overlaps(&lines);
    assert!(
        overlapping.is_empty(),
        "two epochs ran at once: {overlapping:?}"
    );
    let rerun = epochs.values().filter(|e| e.len() > 1).count();

    // Flat: after the first quarter (pools and buffers warm), nothing climbs.
    let warm = samples.len() / 4;
    let (first, last) = samples[warm..].split_at((samples.len() - warm) / 2);
    eprintln!(
        "soak: {total} tasks in {secs} s ({rerun} run again under a new epoch), {} samples; \
         first {:?}; last {:?}",
        samples.len(),
        first.first(),
        last.last()
    );
    for name in first[0].rss.keys() {
        let early = first.iter().filter_map(|s| s.rss.get(name)).max().unwrap();
        let late = last.iter().filter_map(|s| s.rss.get(name)).max().unwrap();
        assert!(
            *late * 10 <= *early * 12,
            "{name}: RSS climbed from {early} KiB to {late} KiB"
        );
    }
    // Connections: pools grow to what the load needs, never past their bounds (16 per
    // process and a worker's lock session), and Redis keeps one publisher and one
    // subscriber per process, however many publishes and reconnects.
    let processes = first[0].rss.len();
    let pg_bound = processes * 16 + cluster.workers().len();
    let pg: Vec<usize> = samples.iter().map(|s| s.postgres).collect();
    assert!(
        pg.iter().all(|n| *n <= pg_bound),
        "Postgres sessions past the pools' bound {pg_bound}: {pg:?}"
    );
    let redis: Vec<usize> = samples.iter().map(|s| s.redis).collect();
    assert!(
        redis.iter().all(|n| *n <= processes * 2),
        "Redis connections past two per process: {redis:?}"
    );
    assert!(
        last.iter().map(|s| s.redis).max() <= first.iter().map(|s| s.redis).max(),
        "Redis connections grew: {redis:?}"
    );
}
