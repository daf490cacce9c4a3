//! The cluster harness itself (`taskpod_e2e::cluster`, `taskpod_e2e::proxy`): every
//! fault handle does what it says, the cluster recovers from each, nothing outlives it,
//! and a proxy's ambiguous commits never make a request id create two tasks.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use taskpod_e2e::chaos::check::oracle::Snapshot;
use taskpod_e2e::chaos::check::{self, Budget, Input};
use taskpod_e2e::chaos::history::{Call, History, Outcome};
use taskpod_e2e::cluster::{Cluster, ClusterSpec};
use taskpod_e2e::os;
use taskpod_e2e::proxy::Delivery;
use taskpod_proto::v1::{self, task_service_client::TaskServiceClient};
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(60);

async fn create(
    c: &mut TaskServiceClient<Channel>,
    request_id: &str,
) -> Result<String, tonic::Status> {
    let metadata = serde_json::json!({ "chaos_request_id": request_id });
    let metadata = match taskpod_proto::convert::json_to_value(&metadata).kind {
        Some(prost_types::value::Kind::StructValue(s)) => Some(s),
        _ => None,
    };
    let mut req = tonic::Request::new(v1::CreateTaskRequest {
        task: Some(v1::TaskSpec {
            title: format!("harness {request_id}"),
            kind: "sleep".into(),
            metadata,
            auto_start: true,
            ..Default::default()
        }),
        meta: Some(v1::RequestMeta {
            actor_id: "harness".into(),
            request_id: request_id.into(),
            ..Default::default()
        }),
    });
    req.set_timeout(Duration::from_secs(5));
    c.create_task(req).await.map(|r| r.into_inner().task_id)
}

/// Retries until the create is answered (the cluster may be recovering).
async fn create_eventually(c: &mut TaskServiceClient<Channel>, request_id: &str) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match create(c, request_id).await {
            Ok(id) => return id,
            Err(status) if tokio::time::Instant::now() < deadline => {
                eprintln!("create {request_id}: {status}; retrying");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(status) => panic!("create {request_id} never succeeded: {status}"),
        }
    }
}

async fn wait_completed(cluster: &Cluster, task: &str) {
    let id = uuid::Uuid::parse_str(task).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM task_heads WHERE task_id = $1")
                .bind(id)
                .fetch_optional(cluster.pool())
                .await
                .ok()
                .flatten();
        if status.as_deref() == Some("completed") {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "task {task} not completed: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_handle_works_and_nothing_outlives_the_cluster() {
    let spec = ClusterSpec::new(2, 1)
        .worker_env("TASKPOD_HANDLERS__SLEEP_PHASE_MS", 20)
        .worker_env("TASKPOD_LOCK__IDLE_SESSION_TIMEOUT_MS", 3000);
    let mut cluster = Cluster::start(spec).await.unwrap();
    let mut c = cluster.api("api1").unwrap().client().unwrap();
    let t = create_eventually(&mut c, "r-start").await;
    wait_completed(&cluster, &t).await;

    // The lock session: found by the node's advisory key, terminated, replaced.
    let before = cluster.lock_session_of("w1").await.unwrap().unwrap();
    assert_eq!(
        cluster.terminate_lock_session("w1").await.unwrap(),
        Some(before)
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = cluster.lock_session_of("w1").await.unwrap();
        if now.is_some_and(|pid| pid != before) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "w1 never reconnected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A worker: killed and restarted under the same name; paused and resumed.
    let old_pid = cluster.worker("w2").unwrap().pid().unwrap();
    cluster.worker_mut("w2").unwrap().kill().await.unwrap();
    assert!(!os::alive(old_pid));
    cluster.worker_mut("w2").unwrap().restart().await.unwrap();
    assert_ne!(cluster.worker("w2").unwrap().pid(), Some(old_pid));
    assert_eq!(cluster.worker("w2").unwrap().process().starts(), 2);
    cluster.worker_mut("w2").unwrap().pause().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.worker_mut("w2").unwrap().resume().unwrap();

    // Postgres: an immediate stop, then the same port and data.
    cluster.crash_postgres().await.unwrap();
    assert!(
        sqlx::query("SELECT 1")
            .execute(cluster.pool())
            .await
            .is_err()
    );
    cluster.restart_postgres().await.unwrap();
    let t = create_eventually(&mut c, "r-after-postgres").await;
    wait_completed(&cluster, &t).await;

    // Redis and the API replica: killed, restarted on the same port.
    cluster.kill_redis().await.unwrap();
    cluster.restart_redis().await.unwrap();
    cluster.api_mut("api1").unwrap().kill().await.unwrap();
    assert!(create(&mut c, "r-while-down").await.is_err());
    cluster.api_mut("api1").unwrap().restart().await.unwrap();
    let t = create_eventually(&mut c, "r-after-api").await;
    wait_completed(&cluster, &t).await;

    // A drain exits cleanly.
    let status = cluster.worker_mut("w1").unwrap().terminate().await.unwrap();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    cluster.heal().await.unwrap();
    cluster
        .wait_partitions_owned(Duration::from_secs(30))
        .await
        .unwrap();

    let pids = cluster.process_ids().await;
    assert!(pids.len() >= 5, "{pids:?}");
    let dir = cluster.dir().to_path_buf();
    drop(cluster);
    let alive: Vec<u32> = pids.into_iter().filter(|p| os::alive(*p)).collect();
    assert!(
        alive.is_empty(),
        "processes outlived the cluster: {alive:?}"
    );
    assert!(!dir.exists(), "{} was not removed", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_commits_never_make_a_request_id_create_twice() {
    let spec = ClusterSpec::new(1, 1)
        .api_via_proxy(0)
        .worker_env("TASKPOD_HANDLERS__SLEEP_PHASE_MS", 20);
    let cluster = Cluster::start(spec).await.unwrap();
    let api = cluster.api("api1").unwrap();
    let proxy = api.proxy().unwrap();
    let c = api.client().unwrap();
    let history = History::new();
    let attempt = |rid: String, c: TaskServiceClient<Channel>| {
        let history = &history;
        async move {
            let mut c = c;
            let id = history.invoke(
                0,
                "api1",
                Call::Create {
                    request_id: rid.clone(),
                    what: "sleep".into(),
                },
            );
            let outcome = match create(&mut c, &rid).await {
                Ok(task_id) => Outcome::Ok {
                    task_id,
                    status: None,
                },
                Err(status) => Outcome::from_status(&status),
            };
            history.complete(id, outcome.clone());
            outcome
        }
    };

    // Every COMMIT reaches Postgres and commits, but its answer is lost: the replica
    // asks Postgres how its transaction ended and answers as created, or says the
    // outcome is unknown; never an error that claims nothing happened.
    proxy.reset_on(b"COMMIT", Delivery::Deliver);
    for i in 0..5 {
        let outcome = attempt(format!("amb-{i}"), c.clone()).await;
        assert!(
            !matches!(outcome, Outcome::Fail { .. }),
            "a committed create answered as failed: {outcome:?}"
        );
    }
    // And these are lost on the way: nothing commits.
    proxy.reset_on(b"COMMIT", Delivery::Drop);
    for i in 5..8 {
        attempt(format!("amb-{i}"), c.clone()).await;
    }
    assert!(proxy.resets() >= 8, "resets: {}", proxy.resets());
    proxy.heal();
    // Retries with the same ids get an answer, and one task each.
    for i in 0..8 {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !attempt(format!("amb-{i}"), c.clone()).await.is_ok() {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    let snapshot = Snapshot::load(cluster.pool()).await.unwrap();
    let intents = history.intents();
    let report = check::check(&Input {
        snapshot: &snapshot,
        intents: &intents,
        exec_lines: &[],
        budget: &Budget {
            max_restart_attempts: 3,
            restart_window: Duration::from_secs(60),
            max_node_losses: 5,
        },
        settle_timeout: Duration::ZERO,
        store_outages: &[],
        exec_overlap_bound: taskpod_e2e::chaos::overlap::EXEC_OVERLAP_BOUND,
    });
    let client_side: Vec<_> = report
        .violations
        .iter()
        .filter(|v| {
            matches!(
                v.invariant,
                "acked-create-exists" | "acks-agree" | "one-task-per-request"
            )
        })
        .collect();
    assert!(client_side.is_empty(), "{}", report.render(10));
    let ambiguous: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasks WHERE metadata->>'chaos_request_id' LIKE 'amb-%'",
    )
    .fetch_one(cluster.pool())
    .await
    .unwrap();
    assert_eq!(ambiguous, 8, "one task per request id");
}
