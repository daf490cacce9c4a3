//! The worker under faults, one regression test per defect of issue 12 that real
//! processes show: real workers (SIGKILL, SIGSTOP, SIGTERM), a real API and Postgres.
//! Every assertion reads the store: counts and orders of rows and events, never
//! timings.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;
use taskpod_e2e::{WAIT, eventually};

use taskpod_e2e::api::{ApiProcess, TestDb};
use taskpod_e2e::worker::WorkerProcess;
use taskpod_proto::v1::{self, task_service_client::TaskServiceClient};
use tonic::transport::Channel;

type Client = TaskServiceClient<Channel>;

async fn pool(db: &TestDb) -> sqlx::PgPool {
    sqlx::PgPool::connect(&db.url).await.unwrap()
}

async fn scalar(pool: &sqlx::PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

async fn owned_by(pool: &sqlx::PgPool, node: &str) -> i64 {
    taskpod_e2e::worker::partitions_owned(pool, node)
        .await
        .unwrap()
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

async fn create(c: &mut Client, kind: &str, payload: serde_json::Value) -> String {
    c.create_task(v1::CreateTaskRequest {
        task: Some(v1::TaskSpec {
            title: format!("{kind} task"),
            kind: kind.into(),
            payload: Some(taskpod_proto::convert::json_to_value(&payload)),
            auto_start: true,
            ..Default::default()
        }),
        meta: Some(v1::RequestMeta {
            actor_id: "tester".into(),
            ..Default::default()
        }),
    })
    .await
    .unwrap()
    .into_inner()
    .task_id
}

/// Events a pod or worker wrote under an epoch after that epoch's end was recorded
/// (`pod_crashed`, which `node_lost` and interruptions are too): what a retired epoch
/// must never write.
async fn writes_after_recorded_loss(pool: &sqlx::PgPool) -> Vec<(uuid::Uuid, i64, String)> {
    sqlx::query_as(
        "SELECT e.stream_id, e.version, e.type FROM events e \
         JOIN events c ON c.stream_id = e.stream_id AND c.type = 'pod_crashed' \
          AND (c.data->>'epoch')::bigint = (e.metadata->>'epoch')::bigint \
         WHERE e.version > c.version AND e.metadata ? 'epoch' \
         ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Defect 2: a paused owner that resumed advanced tasks after its pods' loss was
/// recorded (19 phase changes under crashed epochs in the measurement). The adopter
/// runs one pod at a time, so most lost pods wait, recorded but not restarted, while
/// the paused owner's phase timers fire on resume.
#[tokio::test]
async fn regression_a_resumed_owner_writes_nothing_under_a_recorded_loss() {
    let db = TestDb::create().await.unwrap();
    let api = ApiProcess::spawn(&db, &[]).await.unwrap();
    let mut c = api.client().await.unwrap();
    let pool = pool(&db).await;
    let slow = [
        ("TASKPOD_LOCK__IDLE_SESSION_TIMEOUT_MS", "2000"),
        ("TASKPOD_HANDLERS__SLEEP_PHASE_MS", "1500"),
    ];
    let paused = WorkerProcess::spawn(&db, "paused", &slow).await.unwrap();
    eventually("the first worker owns every partition", || async {
        owned_by(&pool, &paused.node_id).await == 256
    })
    .await;
    for _ in 0..30 {
        create(&mut c, "sleep", serde_json::Value::Null).await;
    }
    eventually("its pods run", || async {
        running_on(&pool, &paused.node_id).await == 30
    })
    .await;
    let adopter = WorkerProcess::spawn(
        &db,
        "adopter",
        &[slow[0], slow[1], ("TASKPOD_CAPACITY", "1")],
    )
    .await
    .unwrap();
    paused.signal("STOP").await.unwrap();
    eventually("the adopter recorded the lost pods", || async {
        scalar(
            &pool,
            "SELECT count(*) FROM pod_crashes WHERE kind = 'node_lost'",
        )
        .await
            >= 20
    })
    .await;
    paused.signal("CONT").await.unwrap();
    // The resumed worker's phase timers have all fired; give its pods time to try.
    eventually("the resumed worker fenced itself", || async {
        running_on(&pool, &paused.node_id).await == 0 && owned_by(&pool, &paused.node_id).await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let bad = writes_after_recorded_loss(&pool).await;
    assert!(bad.is_empty(), "written under a retired epoch: {bad:?}");
    drop(adopter);
}

/// Defect 4: the lock session's ping ran inline in the control loop, and a loop busy
/// recording crashes with Redis black-holed (each announcement waits out its timeout)
/// let the session idle past `idle_session_timeout`: Postgres ended a healthy worker's
/// session. The keeper pings on its own now: the node keeps its first incarnation.
#[tokio::test]
async fn regression_a_busy_loop_with_redis_black_holed_keeps_its_lock_session() {
    let db = TestDb::create().await.unwrap();
    let api = ApiProcess::spawn(&db, &[]).await.unwrap();
    let mut c = api.client().await.unwrap();
    let pool = pool(&db).await;
    // Accepts connections and never answers: every publish waits its timeout.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bus = format!("redis://{}", hole.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = hole.accept().await {
            open.push(socket);
        }
    });
    let dir = tempdir();
    let program = dir.join("crash.sh");
    std::fs::write(&program, "#!/bin/sh\nexit 1\n").unwrap();
    make_executable(&program);
    let program = program.to_string_lossy().into_owned();
    let worker = WorkerProcess::spawn(
        &db,
        "busy",
        &[
            ("TASKPOD_BUS__URL", bus.as_str()),
            ("TASKPOD_BUS__TIMEOUT_MS", "1000"),
            ("TASKPOD_LOCK__IDLE_SESSION_TIMEOUT_MS", "1000"),
            ("TASKPOD_LOCK__PING_INTERVAL_MS", "200"),
            ("TASKPOD_LOCK__PING_TIMEOUT_MS", "500"),
            ("TASKPOD_HANDLERS__PROGRAMS__crash__PATH", program.as_str()),
            ("TASKPOD_RESTART__MAX_RESTART_ATTEMPTS", "1000"),
            ("TASKPOD_RESTART__BACKOFF_BASE_MS", "1"),
            ("TASKPOD_RESTART__BACKOFF_MAX_MS", "1"),
        ],
    )
    .await
    .unwrap();
    eventually("the worker owns every partition", || async {
        owned_by(&pool, &worker.node_id).await == 256
    })
    .await;
    for _ in 0..40 {
        create(&mut c, "exec", serde_json::json!({"program": "crash"})).await;
    }
    eventually("hundreds of crashes were recorded", || async {
        scalar(
            &pool,
            "SELECT count(*) FROM pod_crashes WHERE kind = 'handler'",
        )
        .await
            >= 300
    })
    .await;
    assert_eq!(
        owned_by(&pool, &worker.node_id).await,
        256,
        "the first incarnation still owns every partition"
    );
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM pod_crashes WHERE kind = 'interrupted'"
        )
        .await,
        0,
        "no fence interrupted a pod"
    );
    held.abort();
}

/// Defect 5: a node that lacks an `exec` program another node offers claimed
/// partitions, and failed such tasks for good ("program not configured").
#[tokio::test]
async fn regression_a_node_lacking_a_program_owns_no_partition() {
    let db = TestDb::create().await.unwrap();
    let api = ApiProcess::spawn(&db, &[]).await.unwrap();
    let mut c = api.client().await.unwrap();
    let pool = pool(&db).await;
    let dir = tempdir();
    let program = dir.join("ok.sh");
    std::fs::write(&program, "#!/bin/sh\nexit 0\n").unwrap();
    make_executable(&program);
    let program = program.to_string_lossy().into_owned();
    let full = WorkerProcess::spawn(
        &db,
        "full",
        &[("TASKPOD_HANDLERS__PROGRAMS__build__PATH", program.as_str())],
    )
    .await
    .unwrap();
    let lacking = WorkerProcess::spawn(&db, "lacking", &[]).await.unwrap();
    eventually("the complete node owns everything", || async {
        owned_by(&pool, &full.node_id).await == 256
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(create(&mut c, "exec", serde_json::json!({"program": "build"})).await);
    }
    eventually("every build completes", || async {
        scalar(
            &pool,
            "SELECT count(*) FROM tasks WHERE status = 'completed'",
        )
        .await
            == 20
    })
    .await;
    assert_eq!(owned_by(&pool, &lacking.node_id).await, 0);
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM tasks WHERE status = 'failed'").await,
        0
    );
}

/// Defect 8: balancing stopped busy pods as soon as their partition was chosen for a
/// hand-back (23-255 running pods per e2e run were stopped and restarted elsewhere).
/// Idle partitions move now; busy ones wait for their pods or the deadline.
#[tokio::test]
async fn regression_a_joining_node_takes_idle_partitions_without_stopping_a_pod() {
    let db = TestDb::create().await.unwrap();
    let api = ApiProcess::spawn(&db, &[]).await.unwrap();
    let mut c = api.client().await.unwrap();
    let pool = pool(&db).await;
    let first = WorkerProcess::spawn(&db, "first", &[]).await.unwrap();
    eventually("the first worker owns every partition", || async {
        owned_by(&pool, &first.node_id).await == 256
    })
    .await;
    // Enough pods that fewer than half the partitions are idle: balancing must hand
    // back busy ones too.
    for _ in 0..400 {
        create(&mut c, "manual", serde_json::Value::Null).await;
    }
    eventually("its pods run", || async {
        running_on(&pool, &first.node_id).await == 400
    })
    .await;
    let idle = 256
        - scalar(
            &pool,
            "SELECT count(DISTINCT t.partition) FROM tasks t JOIN task_heads h USING (task_id) \
             WHERE h.pod_state = 'running'",
        )
        .await;
    assert!(idle < 128, "{idle} idle partitions");
    let second = WorkerProcess::spawn(&db, "second", &[]).await.unwrap();
    eventually("the second worker took the idle partitions", || async {
        owned_by(&pool, &second.node_id).await >= idle
    })
    .await;
    // Past several settling delays and claim rounds: the busy ones stay until their
    // pods end (these never do) or the hand-back deadline (a minute) passes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(running_on(&pool, &first.node_id).await, 400);
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM events WHERE type = 'pod_stopped'"
        )
        .await,
        0,
        "no running pod was stopped to balance"
    );
    assert_eq!(owned_by(&pool, &second.node_id).await, idle);
}

/// Defect 8, the rolling deploy: two nodes with disjoint offers made every node
/// ineligible, so nothing ran until the rollout ended. Now both own partitions; a task
/// whose kind its owner lacks waits (counted as unplaceable), never fails, and runs once
/// a node that offers everything joins.
#[tokio::test]
async fn regression_nodes_with_disjoint_kinds_share_the_partitions_and_tasks_wait() {
    let db = TestDb::create().await.unwrap();
    let api = ApiProcess::spawn(&db, &[]).await.unwrap();
    let mut c = api.client().await.unwrap();
    let pool = pool(&db).await;
    let old = WorkerProcess::spawn(
        &db,
        "old",
        &[("TASKPOD_HANDLERS__KINDS", "[manual, sleep]")],
    )
    .await
    .unwrap();
    let new = WorkerProcess::spawn(&db, "new", &[("TASKPOD_HANDLERS__KINDS", "[exec, sleep]")])
        .await
        .unwrap();
    eventually("both own partitions", || async {
        owned_by(&pool, &old.node_id).await > 0 && owned_by(&pool, &new.node_id).await > 0
    })
    .await;
    for _ in 0..30 {
        create(&mut c, "manual", serde_json::Value::Null).await;
    }
    eventually(
        "the manual tasks on the old node's partitions run",
        || async { running_on(&pool, &old.node_id).await > 0 },
    )
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = new.scrape().await.unwrap();
        let counted = gauge(&text, "taskpod_pods_unplaceable{node=\"new\"}");
        if counted.is_some_and(|n| n > 0.0) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            let waiting: Vec<(Option<String>, i64)> = sqlx::query_as(
                "SELECT n.name, count(*) FROM tasks t JOIN task_heads h USING (task_id) \
                 LEFT JOIN partitions p ON p.partition = t.partition \
                 LEFT JOIN nodes n ON n.node_id = p.owner_node \
                 WHERE h.status = 'active' AND h.pod_state = 'none' GROUP BY 1",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            panic!(
                "the new node never counted the tasks it cannot run: gauge {counted:?}; \
                 owned old {} new {}; waiting tasks by owner {waiting:?}",
                owned_by(&pool, &old.node_id).await,
                owned_by(&pool, &new.node_id).await,
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(running_on(&pool, &new.node_id).await, 0);
    let complete = WorkerProcess::spawn(&db, "complete", &[]).await.unwrap();
    eventually("every manual task runs", || async {
        scalar(
            &pool,
            "SELECT count(*) FROM task_heads WHERE pod_state = 'running'",
        )
        .await
            == 30
    })
    .await;
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM tasks WHERE status = 'failed'").await,
        0
    );
    assert!(owned_by(&pool, &complete.node_id).await > 0);
}

/// Defect 9: a pod whose node died after its task ended (cancelled while the node was
/// frozen) stayed `stopping` forever: GetTask showed a pod that did not exist.
#[tokio::test]
async fn regression_a_dead_nodes_pod_of_an_ended_task_is_recorded() {
    let db = TestDb::create().await.unwrap();
    let api = ApiProcess::spawn(&db, &[]).await.unwrap();
    let mut c = api.client().await.unwrap();
    let pool = pool(&db).await;
    let mut doomed = WorkerProcess::spawn(&db, "doomed", &[]).await.unwrap();
    eventually("it owns every partition", || async {
        owned_by(&pool, &doomed.node_id).await == 256
    })
    .await;
    let id = create(&mut c, "manual", serde_json::Value::Null).await;
    eventually("its pod runs", || async {
        running_on(&pool, &doomed.node_id).await == 1
    })
    .await;
    doomed.signal("STOP").await.unwrap();
    c.cancel_task(v1::CancelTaskRequest {
        task_id: id.clone(),
        reason: "not needed".into(),
        meta: Some(v1::RequestMeta {
            actor_id: "tester".into(),
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    doomed.signal("KILL").await.unwrap();
    doomed.wait(Duration::from_secs(10)).await.unwrap();
    let _heir = WorkerProcess::spawn(&db, "heir", &[]).await.unwrap();
    let task = uuid::Uuid::parse_str(&id).unwrap();
    eventually("the pod's end is recorded", || async {
        let (state, status): (String, String) =
            sqlx::query_as("SELECT pod_state, status FROM task_heads WHERE task_id = $1")
                .bind(task)
                .fetch_one(&pool)
                .await
                .unwrap();
        state == "none" && status == "cancelled"
    })
    .await;
    let last_error: Option<String> =
        sqlx::query_scalar("SELECT last_error FROM tasks WHERE task_id = $1")
            .bind(task)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(last_error, None, "the cancel's outcome is kept");
}

/// Defect 10: pods cut off by a graceful drain were charged `node_lost` by the next
/// owner; they are the draining node's own interruptions now, recorded before its
/// partitions go. No grace, and many pods: most are cut off mid-stop.
#[tokio::test]
async fn regression_pods_cut_off_by_a_drain_are_interrupted_not_lost() {
    let db = TestDb::create().await.unwrap();
    let api = ApiProcess::spawn(&db, &[]).await.unwrap();
    let mut c = api.client().await.unwrap();
    let pool = pool(&db).await;
    let env = [("TASKPOD_DRAIN_GRACE_MS", "0")];
    let mut draining = WorkerProcess::spawn(&db, "draining", &env).await.unwrap();
    eventually("it owns every partition", || async {
        owned_by(&pool, &draining.node_id).await == 256
    })
    .await;
    for _ in 0..200 {
        create(&mut c, "manual", serde_json::Value::Null).await;
    }
    eventually("its pods run", || async {
        running_on(&pool, &draining.node_id).await == 200
    })
    .await;
    draining.signal("TERM").await.unwrap();
    assert!(draining.wait(WAIT).await.unwrap().success());
    let heir = WorkerProcess::spawn(&db, "heir", &env).await.unwrap();
    eventually("every pod runs on the heir", || async {
        running_on(&pool, &heir.node_id).await == 200
    })
    .await;
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM pod_crashes WHERE kind = 'node_lost'"
        )
        .await,
        0,
        "nothing the drain cut off was charged to its task"
    );
}

/// Issue 19 item 5 (issue 12 defect 10): a node's row was visible before its key was
/// held, and a peer probing in between deleted a live node. Several workers started at
/// once all keep their rows and share the partitions.
#[tokio::test]
async fn regression_workers_started_together_all_keep_their_rows() {
    let db = TestDb::create().await.unwrap();
    let pool = pool(&db).await;
    let names = ["w1", "w2", "w3", "w4"];
    let started = futures::future::join_all(
        names
            .iter()
            .map(|n| WorkerProcess::spawn(&db, n, &[("TASKPOD_CLAIM_INTERVAL_MS", "50")])),
    )
    .await;
    let workers: Vec<WorkerProcess> = started.into_iter().map(Result::unwrap).collect();
    eventually("every worker owns a share", || async {
        let mut all = true;
        for w in &workers {
            all &= owned_by(&pool, &w.node_id).await >= 60;
        }
        all
    })
    .await;
    let rows: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT node_id FROM nodes")
        .fetch_all(&pool)
        .await
        .unwrap();
    let ids: HashMap<uuid::Uuid, &str> = workers
        .iter()
        .map(|w| {
            (
                uuid::Uuid::parse_str(&w.node_id).unwrap(),
                w.node_id.as_str(),
            )
        })
        .collect();
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|r| ids.contains_key(r)));
}

/// An `exec` program inherited the worker's environment, the store's URL (and its
/// password) among it. It sees only what taskpod gives it.
#[tokio::test]
async fn an_exec_program_sees_none_of_the_workers_settings() {
    let db = TestDb::create().await.unwrap();
    let api = ApiProcess::spawn(&db, &[]).await.unwrap();
    let mut c = api.client().await.unwrap();
    let pool = pool(&db).await;
    let dir = tempdir();
    let seen = dir.join("env.txt");
    let program = dir.join("env.sh");
    std::fs::write(
        &program,
        format!(
            "#!/bin/sh\nenv | grep '^TASKPOD_' | sort > {}\n",
            seen.display()
        ),
    )
    .unwrap();
    make_executable(&program);
    let program = program.to_string_lossy().into_owned();
    let _worker = WorkerProcess::spawn(
        &db,
        "secretive",
        &[("TASKPOD_HANDLERS__PROGRAMS__env__PATH", program.as_str())],
    )
    .await
    .unwrap();
    create(&mut c, "exec", serde_json::json!({"program": "env"})).await;
    eventually("the program ran to the end", || async {
        scalar(
            &pool,
            "SELECT count(*) FROM tasks WHERE status = 'completed'",
        )
        .await
            == 1
    })
    .await;
    let names: Vec<String> = std::fs::read_to_string(&seen)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.to_owned()))
        .collect();
    assert_eq!(names, ["TASKPOD_EPOCH", "TASKPOD_PHASE", "TASKPOD_TASK_ID"]);
}

fn gauge(text: &str, series: &str) -> Option<f64> {
    taskpod_e2e::metric_value(text, series)
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("taskpod-faults-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn make_executable(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}
