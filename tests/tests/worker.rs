//! Workers and pods end to end: real worker processes (killed with real signals), a real
//! API process and Postgres. State is read back from the store's own tables and event
//! streams, never from the workers' logs.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::Duration;
use taskpod_e2e::eventually;

use taskpod_e2e::api::{ApiProcess, TestDb};
use taskpod_e2e::worker::WorkerProcess;
use taskpod_proto::v1::{self, task_service_client::TaskServiceClient};
use tonic::transport::Channel;

type Client = TaskServiceClient<Channel>;

async fn pool(db: &TestDb) -> sqlx::PgPool {
    sqlx::PgPool::connect(&db.url).await.unwrap()
}

async fn ownership(pool: &sqlx::PgPool) -> HashMap<String, i64> {
    let rows: Vec<(Option<uuid::Uuid>, i64)> =
        sqlx::query_as("SELECT owner_node, count(*) FROM partitions GROUP BY 1")
            .fetch_all(pool)
            .await
            .unwrap();
    rows.into_iter()
        .map(|(o, n)| (o.map(|o| o.to_string()).unwrap_or_default(), n))
        .collect()
}

async fn crashes(pool: &sqlx::PgPool, kind: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pod_crashes WHERE kind = $1")
        .bind(kind)
        .fetch_one(pool)
        .await
        .unwrap()
}

fn meta() -> Option<v1::RequestMeta> {
    Some(v1::RequestMeta {
        actor_id: "tester".into(),
        ..Default::default()
    })
}

async fn create(
    c: &mut Client,
    kind: &str,
    payload: serde_json::Value,
    auto_start: bool,
) -> String {
    c.create_task(v1::CreateTaskRequest {
        task: Some(v1::TaskSpec {
            title: format!("{kind} task"),
            kind: kind.into(),
            payload: Some(taskpod_proto::convert::json_to_value(&payload)),
            auto_start,
            ..Default::default()
        }),
        meta: meta(),
    })
    .await
    .unwrap()
    .into_inner()
    .task_id
}

async fn task(c: &mut Client, id: &str) -> v1::Task {
    c.get_task(v1::GetTaskRequest { task_id: id.into() })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap()
}

async fn events(c: &mut Client, id: &str) -> Vec<v1::Event> {
    taskpod_e2e::api::task_events(c, id).await.unwrap()
}

fn even(owners: &HashMap<String, i64>, workers: &[&WorkerProcess]) -> bool {
    let share = 256_u64.div_ceil(workers.len() as u64) as i64;
    workers.iter().all(|w| {
        owners
            .get(&w.node_id)
            .is_some_and(|n| (share - 2..=share).contains(n))
    }) && owners.get("").is_none()
}

#[tokio::test]
async fn tasks_run_once_and_partitions_spread_as_workers_join_and_leave() {
    let db = TestDb::create().await.unwrap();
    let api = ApiProcess::spawn(&db, &[]).await.unwrap();
    let mut c = api.client().await.unwrap();
    let pool = pool(&db).await;
    let w1 = WorkerProcess::spawn(&db, "w1", &[]).await.unwrap();
    let w2 = WorkerProcess::spawn(&db, "w2", &[]).await.unwrap();
    let w3 = WorkerProcess::spawn(&db, "w3", &[]).await.unwrap();
    eventually("three workers share the partitions", || async {
        even(&ownership(&pool).await, &[&w1, &w2, &w3])
    })
    .await;

    let id = create(&mut c, "sleep", serde_json::Value::Null, true).await;
    eventually("the sleep task completes", || {
        let mut c = c.clone();
        let id = id.clone();
        async move { task(&mut c, &id).await.status == v1::TaskStatus::Completed as i32 }
    })
    .await;
    let evs = events(&mut c, &id).await;
    let starts: Vec<_> = evs.iter().filter(|e| e.r#type == "pod_started").collect();
    assert_eq!(starts.len(), 1, "exactly one pod ran the task");
    let node = starts[0].data.as_ref().unwrap().fields["node"].clone();
    let node = taskpod_proto::convert::value_to_json(&node);
    assert!(
        [&w1, &w2, &w3]
            .iter()
            .any(|w| serde_json::json!(w.node_id) == node),
        "{node}"
    );
    let kinds: Vec<_> = evs.iter().map(|e| e.r#type.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "task_created",
            "pod_requested",
            "pod_started",
            "phase_changed",
            "phase_changed",
            "phase_changed",
            "task_completed",
            "pod_stopped"
        ]
    );

    let mut w4 = WorkerProcess::spawn(&db, "w4", &[]).await.unwrap();
    eventually("four workers share the partitions", || async {
        even(&ownership(&pool).await, &[&w1, &w2, &w3, &w4])
    })
    .await;
    w4.signal("TERM").await.unwrap();
    assert!(w4.wait(Duration::from_secs(30)).await.unwrap().success());
    eventually("three workers share again", || async {
        even(&ownership(&pool).await, &[&w1, &w2, &w3])
    })
    .await;
    assert_eq!(
        crashes(&pool, "handler").await + crashes(&pool, "node_lost").await,
        0,
        "no crash recorded"
    );
}

#[tokio::test]
async fn a_sigkilled_workers_pods_are_adopted_and_node_lost_recorded_once() {
    let db = TestDb::create().await.unwrap();
    let api = ApiProcess::spawn(&db, &[]).await.unwrap();
    let mut c = api.client().await.unwrap();
    let pool = pool(&db).await;
    let mut victim = WorkerProcess::spawn(&db, "victim", &[]).await.unwrap();
    let survivor = WorkerProcess::spawn(&db, "survivor", &[]).await.unwrap();
    eventually("two workers share the partitions", || async {
        even(&ownership(&pool).await, &[&victim, &survivor])
    })
    .await;

    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(create(&mut c, "manual", serde_json::Value::Null, true).await);
    }
    let running = |pool: sqlx::PgPool| async move {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM task_heads WHERE pod_state = 'running'")
                .fetch_one(&pool)
                .await
                .unwrap();
        n
    };
    eventually("every pod runs", || running(pool.clone()).then_eq(40)).await;
    let on_victim: HashSet<uuid::Uuid> =
        sqlx::query_scalar("SELECT task_id FROM task_heads WHERE owner_node = $1")
            .bind(uuid::Uuid::parse_str(&victim.node_id).unwrap())
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert!(!on_victim.is_empty(), "the victim ran some pods");

    victim.signal("KILL").await.unwrap();
    victim.wait(Duration::from_secs(10)).await.unwrap();
    eventually("the survivor owns every partition", || async {
        even(&ownership(&pool).await, &[&survivor])
    })
    .await;
    eventually("every pod runs again on the survivor", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM task_heads WHERE pod_state = 'running' AND owner_node = $1",
        )
        .bind(uuid::Uuid::parse_str(&survivor.node_id).unwrap())
        .fetch_one(&pool)
        .await
        .unwrap();
        n == 40
    })
    .await;
    let lost: Vec<(uuid::Uuid, i64)> = sqlx::query_as(
        "SELECT task_id, count(*) FROM pod_crashes WHERE kind = 'node_lost' GROUP BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        lost.len(),
        on_victim.len(),
        "node_lost once per adopted task"
    );
    assert!(lost.iter().all(|(t, n)| *n == 1 && on_victim.contains(t)));
    // The survivor counted each adoption: a node_lost crash, a restart, a failover time.
    let adopted = on_victim.len() as f64;
    let text = survivor.scrape().await.unwrap();
    assert_eq!(
        gauge(
            &text,
            r#"taskpod_pod_crashes_total{node="survivor",cause="node_lost"}"#
        ),
        Some(adopted),
        "{text}"
    );
    assert_eq!(
        gauge(&text, r#"taskpod_pod_restarts_total{node="survivor"}"#),
        Some(adopted)
    );
    assert_eq!(
        gauge(
            &text,
            r#"taskpod_failover_adoption_seconds_count{node="survivor"}"#
        ),
        Some(adopted)
    );
    // No event lost or written twice: versions are gapless and epochs strictly increase.
    for id in &ids {
        let evs = events(&mut c, id).await;
        let versions: Vec<_> = evs.iter().map(|e| e.version).collect();
        assert_eq!(versions, (1..=evs.len() as i64).collect::<Vec<_>>());
        let epochs: Vec<_> = evs
            .iter()
            .filter(|e| e.r#type == "pod_started")
            .map(|e| e.epoch)
            .collect();
        assert!(epochs.windows(2).all(|w| w[0] < w[1]), "{epochs:?}");
    }
}

trait ThenEq {
    fn then_eq(self, n: i64) -> impl Future<Output = bool>;
}

impl<F: Future<Output = i64>> ThenEq for F {
    async fn then_eq(self, n: i64) -> bool {
        self.await == n
    }
}

#[tokio::test]
async fn lifecycle_calls_return_when_the_pod_runs_or_has_stopped() {
    let db = TestDb::create().await.unwrap();
    let api = ApiProcess::spawn(&db, &[]).await.unwrap();
    let mut c = api.client().await.unwrap();
    let _w = WorkerProcess::spawn(&db, "w", &[]).await.unwrap();
    let id = create(&mut c, "manual", serde_json::Value::Null, false).await;

    let started = c
        .start_pod(v1::StartPodRequest {
            task_id: id.clone(),
            meta: meta(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(
        started.pod_status,
        v1::PodStatus::Running as i32,
        "StartPod returns once the pod runs"
    );
    assert_eq!(started.pod_epoch, 1);
    assert!(!started.pod_node.is_empty() && started.pod_started_at.is_some());
    let pods = c
        .list_active_pods(v1::ListActivePodsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert_eq!((pods.len(), pods[0].pod_epoch), (1, 1));

    let restarted = c
        .restart_pod(v1::RestartPodRequest {
            task_id: id.clone(),
            meta: meta(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(
        (restarted.pod_status, restarted.pod_epoch),
        (v1::PodStatus::Running as i32, 2),
        "a new pod, a new epoch"
    );

    let stopped = c
        .stop_pod(v1::StopPodRequest {
            task_id: id.clone(),
            reason: "done".into(),
            meta: meta(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(
        (stopped.status, stopped.pod_state),
        (v1::TaskStatus::Inactive as i32, v1::PodState::None as i32),
        "StopPod returns once pod_stopped is written"
    );
    let kinds: Vec<_> = events(&mut c, &id)
        .await
        .into_iter()
        .map(|e| e.r#type)
        .collect();
    assert_eq!(
        kinds,
        [
            "task_created",
            "pod_requested",
            "pod_started",
            "pod_restart_requested",
            "pod_stopped",
            "pod_started",
            "pod_stop_requested",
            "pod_stopped"
        ]
    );
}

struct Programs {
    dir: std::path::PathBuf,
}

impl Programs {
    fn new() -> Self {
        let dir =
            std::env::temp_dir().join(format!("taskpod-exec-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, body: &str| {
            use std::os::unix::fs::PermissionsExt;
            let path = dir.join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        write(
            "ok.sh",
            "read input; echo \"phase=$TASKPOD_PHASE epoch=$TASKPOD_EPOCH input=$input\"; exit 0",
        );
        write("fail.sh", "echo giving up >&2; exit 3");
        write("retry.sh", "exit 1");
        write("hang.sh", "while :; do sleep 1; done");
        // A leader and a background child in its process group, both findable by the
        // folder in their command lines: stopping the pod must kill both.
        write(
            "slow.sh",
            &format!(
                "sh -c 'while :; do sleep 1; done # {}' &\nwhile :; do sleep 1; done",
                dir.display()
            ),
        );
        Self { dir }
    }

    fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "TASKPOD_RESTART__BACKOFF_BASE_MS".to_owned(),
                "20".to_owned(),
            ),
            (
                "TASKPOD_RESTART__BACKOFF_MAX_MS".to_owned(),
                "100".to_owned(),
            ),
            (
                "TASKPOD_RESTART__MAX_RESTART_ATTEMPTS".to_owned(),
                "3".to_owned(),
            ),
        ];
        for name in ["ok", "fail", "retry", "slow", "hang"] {
            env.push((
                format!("TASKPOD_HANDLERS__PROGRAMS__{name}__PATH"),
                self.dir.join(format!("{name}.sh")).display().to_string(),
            ));
        }
        env.push((
            "TASKPOD_HANDLERS__PROGRAMS__slow__PHASE_TIMEOUT_MS".to_owned(),
            "60000".to_owned(),
        ));
        env.push((
            "TASKPOD_HANDLERS__PROGRAMS__hang__PHASE_TIMEOUT_MS".to_owned(),
            "300".to_owned(),
        ));
        env
    }

    /// Processes still running one of this test's programs.
    fn leftovers(&self) -> usize {
        let out = std::process::Command::new("pgrep")
            .arg("-f")
            .arg(self.dir.to_str().unwrap())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    }
}

impl Drop for Programs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn exec_runs_configured_programs_and_maps_their_exits() {
    let programs = Programs::new();
    let db = TestDb::create().await.unwrap();
    let api = ApiProcess::spawn(&db, &[]).await.unwrap();
    let mut c = api.client().await.unwrap();
    let pool = pool(&db).await;
    let env = programs.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let _w = WorkerProcess::spawn(&db, "w", &env).await.unwrap();

    // A program no worker is configured to run is refused at creation.
    let err = c
        .create_task(v1::CreateTaskRequest {
            task: Some(v1::TaskSpec {
                title: "t".into(),
                kind: "exec".into(),
                payload: Some(taskpod_proto::convert::json_to_value(
                    &serde_json::json!({"program": "/bin/rm"}),
                )),
                ..Default::default()
            }),
            meta: meta(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    let ok = create(&mut c, "exec", serde_json::json!({"program": "ok"}), true).await;
    let fail = create(&mut c, "exec", serde_json::json!({"program": "fail"}), true).await;
    let retry = create(
        &mut c,
        "exec",
        serde_json::json!({"program": "retry"}),
        true,
    )
    .await;
    for (id, status) in [
        (&ok, v1::TaskStatus::Completed),
        (&fail, v1::TaskStatus::Failed),
        (&retry, v1::TaskStatus::Failed),
    ] {
        eventually("the exec task ends", || {
            let mut c = c.clone();
            let id = id.clone();
            async move { task(&mut c, &id).await.status == status as i32 }
        })
        .await;
    }
    let output: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT data FROM task_output WHERE task_id = $1 ORDER BY seq")
            .bind(uuid::Uuid::parse_str(&ok).unwrap())
            .fetch_all(&pool)
            .await
            .unwrap();
    let text = String::from_utf8(output.concat()).unwrap();
    assert!(
        text.contains("phase=spec_clarification epoch=1 input={\"program\":\"ok\"}"),
        "{text}"
    );
    assert!(text.contains("phase=review"), "one run per phase: {text}");

    let failed = task(&mut c, &fail).await;
    assert!(
        failed.last_error.contains("exited with 3"),
        "{}",
        failed.last_error
    );
    let crash_count = |id: &str| {
        let pool = pool.clone();
        let id = uuid::Uuid::parse_str(id).unwrap();
        async move {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pod_crashes WHERE task_id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
            n
        }
    };
    assert_eq!(crash_count(&fail).await, 0, "Fail is not a crash");
    assert_eq!(
        crash_count(&retry).await,
        4,
        "exactly max_restart_attempts restarts, then failed"
    );
    let epochs: Vec<_> = events(&mut c, &retry)
        .await
        .into_iter()
        .filter(|e| e.r#type == "pod_started")
        .map(|e| e.epoch)
        .collect();
    assert_eq!(epochs, [1, 2, 3, 4]);
    assert!(
        task(&mut c, &retry)
            .await
            .last_error
            .contains("restart budget spent")
    );

    // Stopped mid-run: the program's process group is killed.
    let slow = create(
        &mut c,
        "exec",
        serde_json::json!({"program": "slow"}),
        false,
    )
    .await;
    c.start_pod(v1::StartPodRequest {
        task_id: slow.clone(),
        meta: meta(),
    })
    .await
    .unwrap();
    eventually("the program and its child run", || async {
        programs.leftovers() >= 2
    })
    .await;
    c.stop_pod(v1::StopPodRequest {
        task_id: slow.clone(),
        reason: "enough".into(),
        meta: meta(),
    })
    .await
    .unwrap();
    eventually("no program is left running", || async {
        programs.leftovers() == 0
    })
    .await;
    assert_eq!(
        task(&mut c, &slow).await.pod_state,
        v1::PodState::None as i32
    );
}

/// Every event a pod or worker wrote carries its epoch; across a stream those epochs never
/// go back: no pod wrote after a newer epoch was minted.
async fn assert_epochs_never_go_back(pool: &sqlx::PgPool) {
    let rows: Vec<(uuid::Uuid, Vec<i64>)> = sqlx::query_as(
        "SELECT stream_id, array_agg((metadata->>'epoch')::bigint ORDER BY version) FROM events \
         WHERE metadata ? 'epoch' GROUP BY stream_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(!rows.is_empty());
    for (task, epochs) in rows {
        assert!(
            epochs.windows(2).all(|w| w[0] <= w[1]),
            "task {task}: epochs went back: {epochs:?}"
        );
    }
}

async fn running_on(pool: &sqlx::PgPool, node: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM task_heads WHERE pod_state = 'running' AND owner_node = $1",
    )
    .bind(uuid::Uuid::parse_str(node).unwrap())
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_drained_workers_pods_move_without_a_crash() {
    let db = TestDb::create().await.unwrap();
    let api = ApiProcess::spawn(&db, &[]).await.unwrap();
    let mut c = api.client().await.unwrap();
    let pool = pool(&db).await;
    let mut leaving = WorkerProcess::spawn(&db, "leaving", &[]).await.unwrap();
    let staying = WorkerProcess::spawn(&db, "staying", &[]).await.unwrap();
    eventually("two workers share the partitions", || async {
        even(&ownership(&pool).await, &[&leaving, &staying])
    })
    .await;
    for _ in 0..40 {
        create(&mut c, "manual", serde_json::Value::Null, true).await;
    }
    eventually("every pod runs", || async {
        running_on(&pool, &leaving.node_id).await + running_on(&pool, &staying.node_id).await == 40
    })
    .await;
    assert!(running_on(&pool, &leaving.node_id).await > 0);

    leaving.signal("TERM").await.unwrap();
    assert!(
        leaving
            .wait(Duration::from_secs(30))
            .await
            .unwrap()
            .success(),
        "a clean exit"
    );
    eventually("every pod runs on the staying worker", || async {
        running_on(&pool, &staying.node_id).await == 40
    })
    .await;
    assert_eq!(
        crashes(&pool, "handler").await + crashes(&pool, "node_lost").await,
        0,
        "a drain records no crash"
    );
    assert_epochs_never_go_back(&pool).await;
}

/// Settings that make a silent worker lose its lock session within a few seconds.
const FAST_FENCE: [(&str, &str); 2] = [
    ("TASKPOD_LOCK__IDLE_SESSION_TIMEOUT_MS", "3000"),
    ("TASKPOD_HANDLERS__SLEEP_PHASE_MS", "400"),
];

#[tokio::test]
async fn a_zombie_owner_writes_nothing_after_the_takeover() {
    let db = TestDb::create().await.unwrap();
    let api = ApiProcess::spawn(&db, &[]).await.unwrap();
    let mut c = api.client().await.unwrap();
    let pool = pool(&db).await;
    let zombie = WorkerProcess::spawn(&db, "zombie", &FAST_FENCE)
        .await
        .unwrap();
    let other = WorkerProcess::spawn(&db, "other", &FAST_FENCE)
        .await
        .unwrap();
    eventually("two workers share the partitions", || async {
        even(&ownership(&pool).await, &[&zombie, &other])
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(create(&mut c, "sleep", serde_json::Value::Null, true).await);
    }
    eventually("the zombie runs pods", || async {
        running_on(&pool, &zombie.node_id).await > 0
    })
    .await;

    // Frozen: its socket stays open, but it stops pinging; Postgres ends the idle
    // session and the other worker takes over while the zombie's pods sleep mid-phase.
    zombie.signal("STOP").await.unwrap();
    eventually("the other worker owns every partition", || async {
        even(&ownership(&pool).await, &[&other])
    })
    .await;
    zombie.signal("CONT").await.unwrap();
    for id in &ids {
        eventually("every task completes", || {
            let mut c = c.clone();
            let id = id.clone();
            async move { task(&mut c, &id).await.status == v1::TaskStatus::Completed as i32 }
        })
        .await;
    }
    assert!(
        crashes(&pool, "node_lost").await > 0,
        "the takeover recorded the lost pods"
    );
    assert_epochs_never_go_back(&pool).await;
}

#[tokio::test]
async fn a_terminated_lock_session_fences_its_worker() {
    let db = TestDb::create().await.unwrap();
    let api = ApiProcess::spawn(&db, &[]).await.unwrap();
    let mut c = api.client().await.unwrap();
    let pool = pool(&db).await;
    let a = WorkerProcess::spawn(&db, "a", &FAST_FENCE).await.unwrap();
    let b = WorkerProcess::spawn(&db, "b", &FAST_FENCE).await.unwrap();
    eventually("two workers share the partitions", || async {
        even(&ownership(&pool).await, &[&a, &b])
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(create(&mut c, "sleep", serde_json::Value::Null, true).await);
    }
    let db_name = db.url.rsplit('/').next().unwrap().to_owned();
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'taskpod-worker-locks' AND datname = $1 LIMIT 1) t",
    )
    .bind(&db_name)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(killed, 1);
    for id in &ids {
        eventually("every task completes", || {
            let mut c = c.clone();
            let id = id.clone();
            async move { task(&mut c, &id).await.status == v1::TaskStatus::Completed as i32 }
        })
        .await;
    }
    // Both workers are still serving: the fenced one came back as a new incarnation.
    let nodes: i64 = sqlx::query_scalar("SELECT count(*) FROM nodes")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(nodes, 2);
    assert_epochs_never_go_back(&pool).await;
}

#[tokio::test]
async fn a_thousand_tasks_on_three_workers_start_once_per_epoch_without_overlap() {
    let db = TestDb::create().await.unwrap();
    let api = ApiProcess::spawn(&db, &[]).await.unwrap();
    let mut c = api.client().await.unwrap();
    let pool = pool(&db).await;
    let fast = [("TASKPOD_HANDLERS__SLEEP_PHASE_MS", "0")];
    let mut w = Vec::new();
    for name in ["w0", "w1", "w2"] {
        w.push(WorkerProcess::spawn(&db, name, &fast).await.unwrap());
    }
    eventually("three workers share the partitions", || async {
        even(&ownership(&pool).await, &[&w[0], &w[1], &w[2]])
    })
    .await;
    let tasks: Vec<_> = (0..1000)
        .map(|i| v1::TaskSpec {
            title: format!("t{i}"),
            kind: "sleep".into(),
            auto_start: true,
            ..Default::default()
        })
        .collect();
    c.create_tasks(v1::CreateTasksRequest {
        tasks,
        meta: meta(),
    })
    .await
    .unwrap();
    eventually("all 1,000 complete and their pods stopped", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM task_heads WHERE status = 'completed' AND pod_state = 'none'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        n == 1000
    })
    .await;

    let streams: Vec<(uuid::Uuid, Vec<String>, Vec<Option<i64>>)> = sqlx::query_as(
        "SELECT stream_id, array_agg(type ORDER BY version), array_agg((metadata->>'epoch')::bigint ORDER BY version) \
         FROM events GROUP BY stream_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(streams.len(), 1000);
    let mut per_node: HashMap<String, usize> = HashMap::new();
    for (task, types, epochs) in &streams {
        // Each epoch starts once, and ends before the next one starts.
        let mut open: Option<i64> = None;
        let mut started = HashSet::new();
        for (ty, epoch) in types.iter().zip(epochs) {
            match (ty.as_str(), epoch) {
                ("pod_started", Some(e)) => {
                    assert!(
                        open.is_none(),
                        "task {task}: epoch {e} started while {open:?} ran"
                    );
                    assert!(started.insert(*e), "task {task}: epoch {e} started twice");
                    open = Some(*e);
                }
                ("pod_stopped" | "pod_crashed", Some(e)) => {
                    assert_eq!(
                        open,
                        Some(*e),
                        "task {task}: {ty} for an epoch that was not running"
                    );
                    open = None;
                }
                _ => {}
            }
        }
        assert!(open.is_none(), "task {task} ended with a pod still open");
        assert_eq!(
            started.len(),
            1,
            "task {task}: no crash, so one epoch: {types:?} {epochs:?}"
        );
    }
    let nodes: Vec<(uuid::Uuid,)> =
        sqlx::query_as("SELECT (data->>'node')::uuid FROM events WHERE type = 'pod_started'")
            .fetch_all(&pool)
            .await
            .unwrap();
    for (n,) in nodes {
        *per_node.entry(n.to_string()).or_default() += 1;
    }
    assert_eq!(per_node.len(), 3, "every worker ran pods: {per_node:?}");
}

#[tokio::test]
async fn an_exec_child_dies_with_its_worker_before_its_successor_starts() {
    let programs = Programs::new();
    let log = programs.dir.join("runs.log");
    {
        use std::os::unix::fs::PermissionsExt;
        let path = programs.dir.join("long.sh");
        std::fs::write(
            &path,
            format!("#!/bin/sh\necho \"start $TASKPOD_EPOCH $(date +%s%N)\" >> {}\nwhile :; do sleep 1; done\n", log.display()),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let db = TestDb::create().await.unwrap();
    let api = ApiProcess::spawn(&db, &[]).await.unwrap();
    let mut c = api.client().await.unwrap();
    let pool = pool(&db).await;
    let long = programs.dir.join("long.sh").display().to_string();
    let env = [("TASKPOD_HANDLERS__PROGRAMS__long__PATH", long.as_str())];
    let mut first = WorkerProcess::spawn(&db, "first", &env).await.unwrap();
    eventually("the first worker owns every partition", || async {
        even(&ownership(&pool).await, &[&first])
    })
    .await;
    let id = create(&mut c, "exec", serde_json::json!({"program": "long"}), true).await;
    eventually("the program runs", || async { programs.leftovers() >= 1 }).await;

    let second = WorkerProcess::spawn(&db, "second", &env).await.unwrap();
    first.signal("KILL").await.unwrap();
    first.wait(Duration::from_secs(10)).await.unwrap();
    // PR_SET_PDEATHSIG: the child dies with its worker, before any successor starts.
    eventually("the orphan is gone", || async { programs.leftovers() == 0 }).await;
    eventually("the task runs again on the second worker", || async {
        running_on(&pool, &second.node_id).await == 1
    })
    .await;
    eventually("the program runs again", || async {
        programs.leftovers() >= 1
    })
    .await;
    assert_eq!(programs.leftovers(), 1, "old and new runs never overlap");
    let runs = std::fs::read_to_string(&log).unwrap();
    let epochs: Vec<&str> = runs
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(epochs, ["1", "2"], "{runs}");
    let lost: i64 = crashes(&pool, "node_lost").await;
    assert_eq!(lost, 1);
    c.cancel_task(v1::CancelTaskRequest {
        task_id: id,
        reason: "done".into(),
        meta: meta(),
    })
    .await
    .unwrap();
    eventually("no program is left running", || async {
        programs.leftovers() == 0
    })
    .await;
}

#[tokio::test]
async fn losing_the_store_everywhere_at_once_charges_no_task() {
    let db = TestDb::create().await.unwrap();
    let api = ApiProcess::spawn(&db, &[]).await.unwrap();
    let mut c = api.client().await.unwrap();
    let pool = pool(&db).await;
    let a = WorkerProcess::spawn(&db, "a", &[]).await.unwrap();
    let b = WorkerProcess::spawn(&db, "b", &[]).await.unwrap();
    eventually("two workers share the partitions", || async {
        even(&ownership(&pool).await, &[&a, &b])
    })
    .await;
    for _ in 0..20 {
        create(&mut c, "manual", serde_json::Value::Null, true).await;
    }
    let running = |pool: sqlx::PgPool| async move {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM task_heads WHERE pod_state = 'running'")
                .fetch_one(&pool)
                .await
                .unwrap();
        n
    };
    eventually("every pod runs", || running(pool.clone()).then_eq(20)).await;

    // What a Postgres restart does to this database: every session ends at once, and
    // for a while nobody can connect (so pods cannot even record that they stopped).
    let db_name = db.url.rsplit('/').next().unwrap().to_owned();
    let admin = sqlx::PgPool::connect(&std::env::var("DATABASE_URL").unwrap())
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {db_name} ALLOW_CONNECTIONS false"
    )))
    .execute(&admin)
    .await
    .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
        .bind(&db_name)
        .execute(&admin)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {db_name} ALLOW_CONNECTIONS true"
    )))
    .execute(&admin)
    .await
    .unwrap();
    let pool = self::pool(&db).await;
    // Both workers fence themselves and come back as new incarnations.
    let old: Vec<uuid::Uuid> = [&a, &b]
        .iter()
        .map(|w| uuid::Uuid::parse_str(&w.node_id).unwrap())
        .collect();
    eventually("every pod runs again under new incarnations", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM task_heads WHERE pod_state = 'running' AND NOT owner_node = ANY($1)")
            .bind(&old)
            .fetch_one(&pool)
            .await
            .unwrap();
        n == 20
    })
    .await;
    let charged: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pod_crashes WHERE kind IN ('handler', 'node_lost')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(charged, 0, "no task was charged for the outage");
    let interrupted: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pod_crashes WHERE kind = 'interrupted'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(
        interrupted > 0,
        "the pods cut off by the outage were recorded as interrupted"
    );
    let active: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE status = 'active'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(active, 20);
    assert_epochs_never_go_back(&pool).await;
}

/// The Redis that scripts/test.sh starts.
fn redis_url() -> String {
    std::env::var("TASKPOD_TEST_REDIS_URL").expect("scripts/test.sh sets TASKPOD_TEST_REDIS_URL")
}

#[tokio::test]
async fn bus_wake_ups_start_and_stop_pods_between_ticks() {
    let db = TestDb::create().await.unwrap();
    let redis = redis_url();
    let bus = [("TASKPOD_BUS__URL", redis.as_str())];
    let api = ApiProcess::spawn(&db, &bus).await.unwrap();
    let mut c = api.client().await.unwrap();
    // The periodic check runs once a minute: within this test only bus wake-ups can
    // make the worker act.
    let worker_env = [
        ("TASKPOD_BUS__URL", redis.as_str()),
        ("TASKPOD_TICK_MS", "60000"),
        ("TASKPOD_CLAIM_INTERVAL_MS", "10"),
    ];
    let w = WorkerProcess::spawn(&db, "w", &worker_env).await.unwrap();
    let pool = pool(&db).await;
    eventually("the worker owns every partition", || async {
        even(&ownership(&pool).await, &[&w])
    })
    .await;
    // Let the first tick's subscription settle.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let id = create(&mut c, "manual", serde_json::Value::Null, false).await;
    let started = c
        .start_pod(v1::StartPodRequest {
            task_id: id.clone(),
            meta: meta(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(
        started.pod_status,
        v1::PodStatus::Running as i32,
        "woken by the bus, the worker started the pod"
    );
    let stopped = c
        .stop_pod(v1::StopPodRequest {
            task_id: id.clone(),
            reason: String::new(),
            meta: meta(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(
        stopped.pod_state,
        v1::PodState::None as i32,
        "and stopped it"
    );
}

#[tokio::test]
async fn an_exec_phase_past_its_timeout_is_a_crash_and_the_task_can_cap_its_restarts() {
    let programs = Programs::new();
    let db = TestDb::create().await.unwrap();
    let api = ApiProcess::spawn(&db, &[]).await.unwrap();
    let mut c = api.client().await.unwrap();
    let env = programs.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let w = WorkerProcess::spawn(&db, "w", &env).await.unwrap();
    let id = c
        .create_task(v1::CreateTaskRequest {
            task: Some(v1::TaskSpec {
                title: "hangs".into(),
                kind: "exec".into(),
                payload: Some(taskpod_proto::convert::json_to_value(
                    &serde_json::json!({"program": "hang"}),
                )),
                // This task allows no restart, whatever the worker's budget.
                metadata: taskpod_proto::convert::json_to_struct(
                    &serde_json::json!({"restart": {"max_restart_attempts": 0}}),
                ),
                auto_start: true,
                ..Default::default()
            }),
            meta: meta(),
        })
        .await
        .unwrap()
        .into_inner()
        .task_id;
    eventually("the task fails", || {
        let mut c = c.clone();
        let id = id.clone();
        async move { task(&mut c, &id).await.status == v1::TaskStatus::Failed as i32 }
    })
    .await;
    let t = task(&mut c, &id).await;
    assert!(
        t.last_error.contains("timed out in spec_clarification"),
        "{}",
        t.last_error
    );
    let starts = events(&mut c, &id)
        .await
        .into_iter()
        .filter(|e| e.r#type == "pod_started")
        .count();
    assert_eq!(starts, 1, "no restart");
    let text = w.scrape().await.unwrap();
    assert_eq!(
        gauge(
            &text,
            r#"taskpod_pod_crashes_total{node="w",cause="handler"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        gauge(
            &text,
            r#"taskpod_tasks_finished_total{status="failed",kind="exec"}"#
        ),
        Some(1.0)
    );
    // Served at 0 from the start (dashboards read 0, not "No data"): still 0.
    assert_eq!(
        gauge(&text, r#"taskpod_pod_restarts_total{node="w"}"#),
        Some(0.0)
    );
    eventually("the hung program was killed", || async {
        programs.leftovers() == 0
    })
    .await;
}

fn gauge(text: &str, metric: &str) -> Option<f64> {
    taskpod_e2e::metric_value(text, metric)
}

#[tokio::test]
async fn a_gauge_reports_tasks_waiting_for_a_pod() {
    let db = TestDb::create().await.unwrap();
    let api = ApiProcess::spawn(&db, &[]).await.unwrap();
    let mut c = api.client().await.unwrap();
    // Room for one pod: the other two tasks wait.
    let w = WorkerProcess::spawn(&db, "small", &[("TASKPOD_CAPACITY", "1")])
        .await
        .unwrap();
    for _ in 0..3 {
        create(&mut c, "manual", serde_json::Value::Null, true).await;
    }
    eventually(
        "the gauges show one pod running and two waiting",
        || async {
            let text = w.scrape().await.unwrap_or_default();
            gauge(&text, "taskpod_pods_running{node=\"small\"}") == Some(1.0)
                && gauge(&text, "taskpod_pods_pending") == Some(2.0)
                && gauge(&text, "taskpod_pods_pending_oldest_seconds").is_some_and(|s| s > 0.0)
                && gauge(&text, "taskpod_partitions_owned{node=\"small\"}") == Some(256.0)
        },
    )
    .await;
}

#[tokio::test]
async fn a_retried_start_pod_resumes_waiting_for_the_same_pod() {
    let db = TestDb::create().await.unwrap();
    db.offer_kinds(&["manual"], &[]).await.unwrap();
    let api = ApiProcess::spawn(&db, &[]).await.unwrap();
    let mut c = api.client().await.unwrap();
    let id = create(&mut c, "manual", serde_json::Value::Null, false).await;
    let start = || {
        let mut req = tonic::Request::new(v1::StartPodRequest {
            task_id: id.clone(),
            meta: Some(v1::RequestMeta {
                actor_id: "tester".into(),
                request_id: "start-1".into(),
                ..Default::default()
            }),
        });
        req.set_timeout(Duration::from_millis(500));
        req
    };
    // No worker yet: the call's deadline passes before any pod runs.
    match c.start_pod(start()).await {
        Ok(r) => assert_ne!(
            r.into_inner().task.unwrap().pod_status,
            v1::PodStatus::Running as i32
        ),
        // The client's timer, or tonic's server-side one (which answers CANCELLED),
        // whichever fires first.
        Err(s) => assert!(
            matches!(
                s.code(),
                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ),
            "{s:?}"
        ),
    }
    let _w = WorkerProcess::spawn(&db, "late", &[]).await.unwrap();
    // The retry gets the first answer and waits for that pod, without a second request.
    let mut retry = start();
    retry.set_timeout(Duration::from_secs(30));
    let task = c.start_pod(retry).await.unwrap().into_inner().task.unwrap();
    assert_eq!(task.pod_status, v1::PodStatus::Running as i32);
    let kinds: Vec<_> = events(&mut c, &id)
        .await
        .into_iter()
        .map(|e| e.r#type)
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| *k == "pod_requested").count(),
        1,
        "{kinds:?}"
    );
}

/// "Every event kept": a `sleep` task's trail is the same whether its phases take time
/// or none (a zero delay walks them in one write, as the e2e benchmark runs it): the
/// same eight events in order, versions 1..=8, each phase change from the phase the
/// one before reached, every event with its actor and correlation id.
#[tokio::test]
async fn a_sleep_task_keeps_every_event_with_or_without_a_delay() {
    let db = TestDb::create().await.unwrap();
    let api = ApiProcess::spawn(&db, &[]).await.unwrap();
    let mut c = api.client().await.unwrap();
    let pool = pool(&db).await;
    for delay in ["0", "20"] {
        let mut w = WorkerProcess::spawn(&db, "w", &[("TASKPOD_HANDLERS__SLEEP_PHASE_MS", delay)])
            .await
            .unwrap();
        let mut ids = Vec::new();
        for _ in 0..10 {
            ids.push(create(&mut c, "sleep", serde_json::Value::Null, true).await);
        }
        eventually("the sleep tasks complete and their pods stop", || async {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM task_heads \
                  WHERE task_id = ANY($1::uuid[]) AND status = 'completed' AND pod_state = 'none'",
            )
            .bind(&ids)
            .fetch_one(&pool)
            .await
            .unwrap();
            n == 10
        })
        .await;
        for id in &ids {
            let evs = events(&mut c, id).await;
            let trail: Vec<(i64, &str, Option<String>, Option<String>)> = evs
                .iter()
                .map(|e| {
                    let data = e
                        .data
                        .as_ref()
                        .map(taskpod_proto::convert::struct_to_json)
                        .unwrap_or_default();
                    let field = |k: &str| data.get(k).and_then(|v| v.as_str()).map(String::from);
                    let from = field("from").or_else(|| field("from_phase"));
                    (e.version, e.r#type.as_str(), from, field("to"))
                })
                .collect();
            let some = |s: &str| Some(s.to_owned());
            assert_eq!(
                trail,
                [
                    (1, "task_created", None, None),
                    (2, "pod_requested", None, None),
                    (3, "pod_started", None, None),
                    (
                        4,
                        "phase_changed",
                        some("spec_clarification"),
                        some("planning")
                    ),
                    (5, "phase_changed", some("planning"), some("development")),
                    (6, "phase_changed", some("development"), some("review")),
                    (7, "task_completed", some("review"), None),
                    (8, "pod_stopped", None, None),
                ],
                "delay {delay} ms, task {id}"
            );
            for e in &evs {
                assert!(
                    !e.actor_id.is_empty() && !e.correlation_id.is_empty(),
                    "delay {delay} ms, task {id}: {} without its actor or correlation id",
                    e.r#type
                );
            }
        }
        w.signal("TERM").await.unwrap();
        assert!(w.wait(Duration::from_secs(30)).await.unwrap().success());
    }
}
