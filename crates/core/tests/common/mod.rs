//! Shared by the store tests: each test gets a fresh, migrated database from
//! `#[sqlx::test]` and builds its own pool on it, large enough for the concurrency tests.
#![allow(dead_code)]

use sqlx::Connection as _;
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

/// A node as a worker registers it: its row, and its key held on a connection of its
/// own for as long as this value lives (the fenced worker writes check it). Dropping it
/// is a lost lock session.
#[derive(Debug)]
pub struct LiveNode {
    pub id: NodeId,
    lock: Option<sqlx::PgConnection>,
}

impl LiveNode {
    /// Ends the node's lock session, as a crash or a partition would, and waits until
    /// the server has let go of its locks (a backend exits after the connection closes).
    pub async fn lose_lock(&mut self, store: &Store) {
        if let Some(conn) = self.lock.take() {
            conn.close().await.expect("close the lock session");
        }
        for _ in 0..500 {
            if !store.node_alive(self.id).await.expect("probe") {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the lock session of {} did not end", self.id);
    }
}

pub async fn live_node(store: &Store) -> LiveNode {
    let id = NodeId::new();
    let key = store.reserve_lock_key().await.expect("lock key");
    let mut lock = store
        .pool()
        .acquire()
        .await
        .expect("a lock connection")
        .detach();
    let (ns, k) = taskpod_core::store::keys::node_key(key);
    sqlx::query("SELECT pg_advisory_lock($1, $2)")
        .bind(ns)
        .bind(k)
        .execute(&mut lock)
        .await
        .expect("take the node key");
    store
        .register_node(id, key, "test", 10, &["sleep".into()], &[])
        .await
        .expect("register");
    LiveNode {
        id,
        lock: Some(lock),
    }
}

/// A task of `kind` that is active with a running pod, as a worker would leave it:
/// partition claimed, epoch minted, `pod_started` appended. Returns the epoch, and the
/// node (whose lock session lives as long as the value).
pub async fn running_pod(store: &Store, kind: &str) -> (TaskId, i64, LiveNode) {
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
    let live = live_node(store).await;
    let node = live.id;
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
    (task, epoch, live)
}

/// `n` running pods of `kind`, each on a node of its own.
pub async fn running_pods(store: &Store, kind: &str, n: usize) -> Vec<(TaskId, i64, LiveNode)> {
    let mut pods = Vec::with_capacity(n);
    for _ in 0..n {
        pods.push(running_pod(store, kind).await);
    }
    pods
}
