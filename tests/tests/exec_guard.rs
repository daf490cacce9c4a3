//! `exec` runs die with their worker's claim, grandchildren included (issue 12, defect 3;
//! issue 19): real workers, SIGKILLed, SIGSTOPed or cut off from their lock session,
//! running a program whose descendants log `<epoch> <unix-millis> <who>` every 100 ms.
//! What is asserted is read from that log: no line of the old epoch later than the
//! bound after the signal, and none after the new epoch's first line.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use taskpod_e2e::eventually;

use taskpod_e2e::api::{ApiProcess, TestDb};
use taskpod_e2e::worker::WorkerProcess;
use taskpod_proto::v1::{self, task_service_client::TaskServiceClient};
use tonic::transport::Channel;

/// The guard timeout the workers of these tests run with: the default of
/// `handlers.exec.guard_timeout_ms`.
const GUARD_TIMEOUT_MS: u64 = 1_000;
/// The lock session's ping settings (the defaults).
const PING_INTERVAL_MS: u64 = 300;
const PING_TIMEOUT_MS: u64 = 1_000;
/// What a loaded two-core machine may add to any bound: scheduling of the guard and of
/// the logging loops, not a property of the product.
const SLACK_MS: u64 = 1_000;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn owners(pool: &sqlx::PgPool) -> HashMap<String, i64> {
    let rows: Vec<(Option<uuid::Uuid>, i64)> =
        sqlx::query_as("SELECT owner_node, count(*) FROM partitions GROUP BY 1")
            .fetch_all(pool)
            .await
            .unwrap();
    rows.into_iter()
        .map(|(o, n)| (o.map(|o| o.to_string()).unwrap_or_default(), n))
        .collect()
}

async fn owns_everything(pool: &sqlx::PgPool, worker: &WorkerProcess) -> bool {
    let owners = owners(pool).await;
    owners.len() == 1 && owners.contains_key(&worker.node_id)
}

/// The programs of one test, in a folder of their own; every process they start has the
/// folder in its command line.
struct Programs {
    dir: PathBuf,
    log: PathBuf,
}

impl Programs {
    fn new() -> Self {
        let dir =
            std::env::temp_dir().join(format!("taskpod-guard-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("ticks.log");
        let programs = Self { dir, log };
        let (d, log) = (programs.dir.display(), programs.log.display());
        programs.write(
            "tick.sh",
            &format!(
                "while :; do echo \"$TASKPOD_EPOCH $(date +%s%3N) $1\" >> {log}; sleep 0.1; done"
            ),
        );
        // The program's `sh` grandchild logs; the program itself only waits.
        programs.write("tree.sh", &format!("sh {d}/tick.sh child &\nwait"));
        // And a great-grandchild that left the group and the session (`setsid`) and whose
        // parent exited: a process group kill misses it, and it is nobody's child.
        programs.write(
            "deep.sh",
            &format!("sh {d}/tick.sh child &\nsh -c \"setsid sh {d}/tick.sh setsid &\"\nwait"),
        );
        programs
    }

    fn write(&self, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt as _;
        let path = self.dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn env(&self) -> Vec<(String, String)> {
        // The guard runs with its defaults (`handlers.exec`), left unset so that the
        // same test runs against a worker from before the guard.
        let mut env = vec![
            (
                "TASKPOD_LOCK__PING_INTERVAL_MS".to_owned(),
                PING_INTERVAL_MS.to_string(),
            ),
            (
                "TASKPOD_LOCK__PING_TIMEOUT_MS".to_owned(),
                PING_TIMEOUT_MS.to_string(),
            ),
            // A frozen worker's lock session ends within seconds.
            (
                "TASKPOD_LOCK__IDLE_SESSION_TIMEOUT_MS".to_owned(),
                "3000".to_owned(),
            ),
        ];
        for name in ["tree", "deep"] {
            env.push((
                format!("TASKPOD_HANDLERS__PROGRAMS__{name}__PATH"),
                self.dir.join(format!("{name}.sh")).display().to_string(),
            ));
        }
        env
    }

    /// `(epoch, unix millis, who)` of every line logged so far.
    fn ticks(&self) -> Vec<(i64, u64, String)> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                Some((
                    words.next()?.parse().ok()?,
                    words.next()?.parse().ok()?,
                    words.next()?.to_owned(),
                ))
            })
            .collect()
    }

    fn logging(&self, epoch: i64, who: &str) -> bool {
        self.ticks().iter().any(|(e, _, w)| *e == epoch && w == who)
    }

    /// Pids of processes still running one of these programs.
    fn leftovers(&self) -> Vec<String> {
        let out = std::process::Command::new("pgrep")
            .arg("-f")
            .arg(self.dir.to_str().unwrap())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Asserts that the old epoch's processes stopped logging within `bound_ms` of
    /// `signalled_at`, and before the new epoch's first line.
    fn assert_no_overlap(&self, signalled_at: u64, bound_ms: u64) {
        let ticks = self.ticks();
        let after = |epoch: i64| {
            let at: Vec<u64> = ticks.iter().filter(|t| t.0 == epoch).map(|t| t.1).collect();
            let span = (at.iter().min().copied(), at.iter().max().copied());
            let rel = |t: Option<u64>| t.map(|t| t as i64 - signalled_at as i64);
            (rel(span.0), rel(span.1))
        };
        // The measurement, for `--no-capture`: lines come every 100 ms.
        eprintln!(
            "ms after the signal: epoch 1 logged last at {:?}, epoch 2 first at {:?}",
            after(1).1,
            after(2).0
        );
        let cutoff = signalled_at + bound_ms;
        let late: Vec<_> = ticks
            .iter()
            .filter(|(e, t, _)| *e == 1 && *t > cutoff)
            .collect();
        assert!(
            late.is_empty(),
            "{} lines of epoch 1 more than {bound_ms} ms after the signal (at {signalled_at}), \
             up to {:?}",
            late.len(),
            late.last()
        );
        let first_new = ticks
            .iter()
            .filter(|(e, _, _)| *e == 2)
            .map(|(_, t, _)| *t)
            .min()
            .unwrap();
        let old_last = ticks
            .iter()
            .filter(|(e, _, _)| *e == 1)
            .map(|(_, t, _)| *t)
            .max()
            .unwrap();
        assert!(
            old_last < first_new,
            "epoch 1 logged at {old_last}, after epoch 2 started logging at {first_new}"
        );
    }
}

impl Drop for Programs {
    /// Whatever survived a failed assertion is killed by pid, so it does not log on.
    fn drop(&mut self) {
        for pid in self.leftovers() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Cluster {
    db: TestDb,
    _api: ApiProcess,
    client: TaskServiceClient<Channel>,
    pool: sqlx::PgPool,
    env: Vec<(String, String)>,
}

impl Cluster {
    async fn start(programs: &Programs) -> Self {
        let db = TestDb::create().await.unwrap();
        let api = ApiProcess::spawn(&db, &[]).await.unwrap();
        let client = api.client().await.unwrap();
        let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
        Self {
            db,
            _api: api,
            client,
            pool,
            env: programs.env(),
        }
    }

    async fn worker(&self, name: &str) -> WorkerProcess {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        WorkerProcess::spawn(&self.db, name, &env).await.unwrap()
    }

    async fn run(&mut self, program: &str) -> String {
        self.client
            .create_task(v1::CreateTaskRequest {
                task: Some(v1::TaskSpec {
                    title: program.into(),
                    kind: "exec".into(),
                    payload: Some(taskpod_proto::convert::json_to_value(
                        &serde_json::json!({"program": program}),
                    )),
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

    async fn cancel(&mut self, id: String) {
        self.client
            .cancel_task(v1::CancelTaskRequest {
                task_id: id,
                reason: "done".into(),
                meta: meta(),
            })
            .await
            .unwrap();
    }
}

fn meta() -> Option<v1::RequestMeta> {
    Some(v1::RequestMeta {
        actor_id: "tester".into(),
        ..Default::default()
    })
}

#[tokio::test]
async fn regression_exec_grandchild_dies_with_a_sigkilled_worker() {
    let programs = Programs::new();
    let mut cluster = Cluster::start(&programs).await;
    let mut first = cluster.worker("first").await;
    eventually("the first worker owns every partition", || {
        owns_everything(&cluster.pool, &first)
    })
    .await;
    let id = cluster.run("deep").await;
    eventually(
        "epoch 1's grandchild and setsid great-grandchild log",
        || async { programs.logging(1, "child") && programs.logging(1, "setsid") },
    )
    .await;

    let signalled_at = now_ms();
    first.signal("KILL").await.unwrap();
    first.wait(Duration::from_secs(10)).await.unwrap();
    let second = cluster.worker("second").await;
    eventually("epoch 2 runs on the second worker", || async {
        programs.logging(2, "child") && programs.logging(2, "setsid")
    })
    .await;
    // Time for a survivor to show itself.
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    // The guard reads end of file the moment its worker dies: the bound is its
    // reaction, well within one guard timeout.
    programs.assert_no_overlap(signalled_at, GUARD_TIMEOUT_MS);
    cluster.cancel(id).await;
    eventually("no program is left running", || async {
        programs.leftovers().is_empty()
    })
    .await;
    drop(second);
}

#[tokio::test]
async fn regression_exec_tree_of_a_sigstopped_worker_is_killed() {
    let programs = Programs::new();
    let mut cluster = Cluster::start(&programs).await;
    let first = cluster.worker("first").await;
    eventually("the first worker owns every partition", || {
        owns_everything(&cluster.pool, &first)
    })
    .await;
    let id = cluster.run("tree").await;
    eventually("epoch 1's grandchild logs", || async {
        programs.logging(1, "child")
    })
    .await;

    let signalled_at = now_ms();
    first.signal("STOP").await.unwrap();
    // Postgres ends the frozen worker's idle lock session; the second takes over.
    let second = cluster.worker("second").await;
    eventually("epoch 2 runs on the second worker", || async {
        programs.logging(2, "child")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let stopped_for = now_ms() - signalled_at;

    // The last byte reached the guard before the stop; it heard nothing for its timeout.
    programs.assert_no_overlap(signalled_at, GUARD_TIMEOUT_MS + SLACK_MS);
    assert!(stopped_for > GUARD_TIMEOUT_MS + SLACK_MS + 1_000);
    first.signal("CONT").await.unwrap();
    cluster.cancel(id).await;
    eventually("no program is left running", || async {
        programs.leftovers().is_empty()
    })
    .await;
    drop((first, second));
}

#[tokio::test]
async fn regression_exec_tree_of_a_worker_that_lost_its_lock_session_is_killed() {
    let programs = Programs::new();
    let mut cluster = Cluster::start(&programs).await;
    let worker = cluster.worker("only").await;
    eventually("the worker owns every partition", || {
        owns_everything(&cluster.pool, &worker)
    })
    .await;
    let id = cluster.run("deep").await;
    eventually(
        "epoch 1's grandchild and setsid great-grandchild log",
        || async { programs.logging(1, "child") && programs.logging(1, "setsid") },
    )
    .await;

    let db_name = cluster.db.url.rsplit('/').next().unwrap().to_owned();
    let signalled_at = now_ms();
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'taskpod-worker-locks' AND datname = $1) t",
    )
    .bind(&db_name)
    .fetch_one(&cluster.pool)
    .await
    .unwrap();
    assert_eq!(killed, 1);
    // The worker fences itself, comes back as a new incarnation and adopts its own task.
    eventually("epoch 2 runs", || async {
        programs.logging(2, "child") && programs.logging(2, "setsid")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    // Its liveness lapses within a detection bound of the loss (at once here: the ping
    // fails), and the run is cut then, setsid escapee included.
    programs.assert_no_overlap(signalled_at, PING_INTERVAL_MS + PING_TIMEOUT_MS + SLACK_MS);
    cluster.cancel(id).await;
    eventually("no program is left running", || async {
        programs.leftovers().is_empty()
    })
    .await;
}
