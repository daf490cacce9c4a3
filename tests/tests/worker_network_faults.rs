//! The worker under faults only a network can cause: a reply lost after Postgres acted
//! on it (an ambiguous commit), a request lost on the wire, and a pool that goes silent
//! while the lock session stays up. Each test runs a whole cluster (its own Postgres)
//! with one worker's pool behind a fault proxy; assertions read the store.
#![allow(clippy::unwrap_used)]

use taskpod_e2e::{WAIT, eventually};

use taskpod_e2e::cluster::{Cluster, ClusterSpec};
use taskpod_e2e::proxy::Delivery;
use taskpod_proto::v1;

/// Partitions owned by any incarnation of the worker named `name`.
async fn owned_by(cluster: &Cluster, name: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM partitions p JOIN nodes n ON n.node_id = p.owner_node \
         WHERE n.name = $1",
    )
    .bind(name)
    .fetch_one(cluster.pool())
    .await
    .unwrap()
}

async fn scalar(cluster: &Cluster, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(cluster.pool())
        .await
        .unwrap()
}

async fn create_manual(cluster: &Cluster) -> String {
    let mut client = cluster.api("api1").unwrap().client().unwrap();
    client
        .create_task(v1::CreateTaskRequest {
            task: Some(v1::TaskSpec {
                title: "manual".into(),
                kind: "manual".into(),
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

/// w1's pool goes through a proxy; w2 alone offers an extra program, so while w2 is
/// alive w1 owns nothing (it cannot run everything the cluster offers).
async fn w1_owns_everything_then_w2_returns(delivery: Delivery) {
    let spec = ClusterSpec::new(2, 1)
        .worker_pool_via_proxy(0)
        .one_worker_env(1, "TASKPOD_HANDLERS__PROGRAMS__extra__PATH", "/bin/true");
    let mut cluster = Cluster::start(spec).await.unwrap();
    eventually("w2 owns every partition", || async {
        owned_by(&cluster, "w2").await == 256
    })
    .await;
    cluster.worker_mut("w2").unwrap().kill().await.unwrap();
    // A fresh w1 has prepared no release yet: its first one carries the statement's
    // text, which the proxy matches.
    cluster.worker_mut("w1").unwrap().restart().await.unwrap();
    eventually("w1 claims every partition", || async {
        owned_by(&cluster, "w1").await == 256
    })
    .await;
    let proxy = cluster.worker("w1").unwrap().proxy().unwrap();
    proxy.reset_once_on(b"SET owner_node = NULL", delivery);
    cluster.worker_mut("w2").unwrap().restart().await.unwrap();
    // w1 hands everything back; the first release is cut off on the wire.
    eventually("w2 owns every partition again", || async {
        owned_by(&cluster, "w2").await == 256
    })
    .await;
    assert_eq!(
        cluster.worker("w1").unwrap().proxy().unwrap().resets(),
        1,
        "the fault hit one release"
    );
}

/// Defect 1: a hand-back forgot the partition before its release UPDATE; when the
/// UPDATE failed, the lock stayed held by a node that no longer served it, and every
/// task of that partition waited until the worker restarted.
#[tokio::test]
async fn regression_a_release_lost_on_the_wire_is_retried_not_orphaned() {
    w1_owns_everything_then_w2_returns(Delivery::Drop).await;
}

/// Defect 1, ambiguous: the release committed but its answer was lost.
#[tokio::test]
async fn regression_a_release_whose_answer_was_lost_is_finished_not_orphaned() {
    w1_owns_everything_then_w2_returns(Delivery::DeliverNext).await;
}

/// Defect 1, the claim: a claim that committed but whose answer was lost left its
/// partition locked and recorded as the node's, yet never served.
#[tokio::test]
async fn regression_a_claim_whose_answer_was_lost_is_claimed_again_and_served() {
    let spec = ClusterSpec::new(1, 1).worker_pool_via_proxy(0);
    let mut cluster = Cluster::start(spec).await.unwrap();
    cluster.wait_partitions_owned(WAIT).await.unwrap();
    cluster.worker_mut("w1").unwrap().kill().await.unwrap();
    let proxy = cluster.worker("w1").unwrap().proxy().unwrap();
    // The first claim of the restarted worker (every partition, partition 0 among
    // them, in one statement) commits; its answer is lost.
    proxy.reset_once_on(b"SET generation = p.generation + 1", Delivery::DeliverNext);
    cluster.worker_mut("w1").unwrap().restart().await.unwrap();
    eventually("the claim was cut off", || async {
        cluster.worker("w1").unwrap().proxy().unwrap().resets() == 1
    })
    .await;
    // A task of partition 0 runs.
    let mut found = None;
    for _ in 0..3_000 {
        let id = create_manual(&cluster).await;
        let partition: i32 = sqlx::query_scalar("SELECT partition FROM tasks WHERE task_id = $1")
            .bind(uuid::Uuid::parse_str(&id).unwrap())
            .fetch_one(cluster.pool())
            .await
            .unwrap();
        if partition == 0 {
            found = Some(id);
            break;
        }
    }
    let id = uuid::Uuid::parse_str(&found.expect("a task of partition 0")).unwrap();
    eventually("the task of partition 0 runs", || async {
        let state: String =
            sqlx::query_scalar("SELECT pod_state FROM task_heads WHERE task_id = $1")
                .bind(id)
                .fetch_one(cluster.pool())
                .await
                .unwrap();
        state == "running"
    })
    .await;
}

/// Defect 10: a mint that committed but whose answer was lost was charged as a node
/// loss of the minting node itself.
#[tokio::test]
async fn regression_a_mint_whose_answer_was_lost_is_an_interruption() {
    let spec = ClusterSpec::new(1, 1).worker_pool_via_proxy(0);
    let cluster = Cluster::start(spec).await.unwrap();
    cluster.wait_partitions_owned(WAIT).await.unwrap();
    let proxy = cluster.worker("w1").unwrap().proxy().unwrap();
    proxy.reset_once_on(b"SET pod_epoch = h.pod_epoch + 1", Delivery::DeliverNext);
    let id = uuid::Uuid::parse_str(&create_manual(&cluster).await).unwrap();
    eventually("the task's pod runs", || async {
        let state: String =
            sqlx::query_scalar("SELECT pod_state FROM task_heads WHERE task_id = $1")
                .bind(id)
                .fetch_one(cluster.pool())
                .await
                .unwrap();
        state == "running"
    })
    .await;
    assert_eq!(cluster.worker("w1").unwrap().proxy().unwrap().resets(), 1);
    assert_eq!(
        scalar(
            &cluster,
            "SELECT count(*) FROM pod_crashes WHERE kind = 'node_lost'"
        )
        .await,
        0
    );
    assert_eq!(
        scalar(
            &cluster,
            "SELECT count(*) FROM pod_crashes WHERE kind = 'interrupted'"
        )
        .await,
        1
    );
}

/// Defect 7: a dead pool beside a live lock session (a pooler or sidecar on
/// `store.url` died: every call fails at once) kept the node's partitions forever with
/// nothing running. The node lets go, a peer runs its tasks, and it rejoins once its
/// pool answers again.
#[tokio::test]
async fn regression_a_node_whose_pool_is_dead_lets_go_of_its_partitions() {
    let spec = ClusterSpec::new(2, 1)
        .worker_pool_via_proxy(0)
        .one_worker_env(0, "TASKPOD_MAINTENANCE__STORE_FENCE_AFTER_MS", 2_000)
        .one_worker_env(0, "TASKPOD_MAINTENANCE__STORE_PROBE_MS", 250);
    let cluster = Cluster::start(spec).await.unwrap();
    eventually("both own partitions", || async {
        owned_by(&cluster, "w1").await > 0 && owned_by(&cluster, "w2").await > 0
    })
    .await;
    for _ in 0..40 {
        create_manual(&cluster).await;
    }
    eventually("every pod runs", || async {
        scalar(
            &cluster,
            "SELECT count(*) FROM task_heads WHERE pod_state = 'running'",
        )
        .await
            == 40
    })
    .await;
    let proxy = cluster.worker("w1").unwrap().proxy().unwrap();
    proxy.refuse();
    eventually("w2 owns every partition and runs every pod", || async {
        let on_w2: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM task_heads h JOIN nodes n ON n.node_id = h.owner_node \
             WHERE h.pod_state = 'running' AND n.name = 'w2'",
        )
        .fetch_one(cluster.pool())
        .await
        .unwrap();
        owned_by(&cluster, "w2").await == 256 && on_w2 == 40
    })
    .await;
    cluster.worker("w1").unwrap().proxy().unwrap().heal();
    eventually("w1 rejoins and takes its share back", || async {
        owned_by(&cluster, "w1").await > 0
    })
    .await;
    assert_eq!(
        scalar(
            &cluster,
            "SELECT count(*) FROM tasks WHERE status = 'failed'"
        )
        .await,
        0
    );
}
