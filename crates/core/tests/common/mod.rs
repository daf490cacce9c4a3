//! Shared by the store tests: each test gets a fresh, migrated database from
//! `#[sqlx::test]` and builds its own pool on it, large enough for the concurrency tests.
#![allow(dead_code)]

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use taskpod_core::domain::{Event, EventMetadata, NewTask, NodeId, RequestContext, TaskId};
use taskpod_core::store::{AppendFence, Store};

pub async fn store(opts: PgConnectOptions) -> Store {
    let pool = PgPoolOptions::new()
        .max_connections(24)
        .connect_with(opts)
        .await
        .expect("connect to the test database");
    Store::from_pool(pool)
        .await
        .expect("store on a migrated database")
}

pub fn ctx(actor: &str) -> RequestContext {
    RequestContext::new(actor).with_correlation_id("corr-test")
}

pub async fn create(store: &Store, kind: &str) -> TaskId {
    store
        .create_task(&NewTask::new("a task", kind), &ctx("alice"))
        .await
        .expect("create")
        .task_id()
        .expect("one id")
}

pub fn pod_meta() -> EventMetadata {
    EventMetadata {
        actor_id: "pod".into(),
        correlation_id: "corr-pod".into(),
        ..EventMetadata::default()
    }
}

/// A task of `kind` that is active with a running pod, as a worker would leave it:
/// partition claimed, epoch minted, `pod_started` appended. Returns the epoch.
pub async fn running_pod(store: &Store, kind: &str) -> (TaskId, i64, NodeId) {
    let task = store
        .create_task(
            &NewTask {
                auto_start: true,
                ..NewTask::new("running", kind)
            },
            &ctx("alice"),
        )
        .await
        .expect("create")
        .task_id()
        .expect("one id");
    let node = NodeId::new();
    let partition = store.get_task(task).await.expect("get").partition;
    let generation = store.claim_partition(partition, node).await.expect("claim");
    let epoch = store
        .mint_pod(task, 0, node, generation)
        .await
        .expect("mint");
    let state = store.state(task).await.expect("state");
    store
        .append(
            task,
            state.version,
            AppendFence::Pod { epoch },
            &[Event::PodStarted {
                epoch,
                node,
                started_at: chrono::Utc::now(),
            }],
            &pod_meta(),
        )
        .await
        .expect("pod_started");
    (task, epoch, node)
}

/// `n` running pods of `kind`, each on a node of its own.
pub async fn running_pods(store: &Store, kind: &str, n: usize) -> Vec<(TaskId, i64, NodeId)> {
    let mut pods = Vec::with_capacity(n);
    for _ in 0..n {
        pods.push(running_pod(store, kind).await);
    }
    pods
}
