//! Postgres's side of a conformance run: the same operations through
//! `taskpod_core::store::Store`, with a dedicated connection per node slot holding its
//! session advisory locks under the worker's key scheme, and sessions ended by
//! `pg_terminate_backend` as a server would end them.

use sqlx::ConnectOptions as _;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use taskpod_core::domain::{Event, EventMetadata, NodeId, RequestContext, TaskState};
use taskpod_core::store::crash_batch::CrashItem;
use taskpod_core::store::crashes::{CrashOutcome, CrashReport};
use taskpod_core::store::keys::{NODE_NAMESPACE, PARTITION_NAMESPACE};
use taskpod_core::store::{AppendFence, MintRequest, Store};

use super::model_side::Cluster;
use super::step::{Answer, Step, Value};

/// A node slot's lock session.
#[derive(Debug)]
struct LockConn {
    conn: PgConnection,
    pid: i32,
}

/// The store, its pool, and each slot's lock session.
#[derive(Debug)]
pub struct RealSide {
    pub store: Store,
    pool: PgPool,
    opts: PgConnectOptions,
    sessions: Vec<Option<LockConn>>,
}

fn refused(e: impl std::fmt::Display) -> Answer {
    Answer::Refused(e.to_string())
}

fn metadata() -> EventMetadata {
    EventMetadata {
        actor_id: "conformance".into(),
        correlation_id: "conformance".into(),
        ..EventMetadata::default()
    }
}

impl RealSide {
    /// Connects a pool to the test database.
    ///
    /// # Errors
    /// When Postgres cannot be reached or is not migrated.
    pub async fn new(opts: PgConnectOptions, nodes: usize) -> Result<Self, String> {
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(opts.clone())
            .await
            .map_err(|e| e.to_string())?;
        let store = Store::from_pool(pool.clone())
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self {
            store,
            pool,
            opts,
            sessions: (0..nodes).map(|_| None).collect(),
        })
    }

    /// A new lock session for `node`, registered as `id`, holding its node key; the
    /// key the store assigned.
    ///
    /// # Errors
    /// When the session cannot be opened or the key is taken.
    pub async fn connect(&mut self, node: usize, id: NodeId) -> Result<i32, String> {
        let mut conn = self.opts.connect().await.map_err(|e| e.to_string())?;
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        // The key first, then the row: a row is never visible before its key is held.
        let key = self
            .store
            .reserve_lock_key()
            .await
            .map_err(|e| e.to_string())?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
            .bind(NODE_NAMESPACE)
            .bind(key)
            .fetch_one(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        if !got {
            return Err(format!("node key {key} is taken"));
        }
        self.store
            .register_node(id, key, &format!("n{node}"), 1, &["sleep".to_owned()], &[])
            .await
            .map_err(|e| e.to_string())?;
        // The previous session, if any, was killed; its connection is dropped now.
        self.sessions[node] = Some(LockConn { conn, pid });
        Ok(key)
    }

    /// Ends `node`'s session from the server side and waits until its locks are gone.
    ///
    /// # Errors
    /// When the backend does not go away.
    pub async fn kill(&mut self, node: usize) -> Result<(), String> {
        let Some(pid) = self.sessions[node].as_ref().map(|s| s.pid) else {
            return Ok(());
        };
        sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .execute(&self.pool)
            .await
            .map_err(|e| e.to_string())?;
        // Termination is asynchronous: wait (boundedly) until the backend and its locks
        // are gone, so the next step sees what the model sees.
        for _ in 0..1_000 {
            let left: i64 = sqlx::query_scalar(
                "SELECT (SELECT count(*) FROM pg_stat_activity WHERE pid = $1) \
                      + (SELECT count(*) FROM pg_locks WHERE pid = $1)",
            )
            .bind(pid)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| e.to_string())?;
            if left == 0 {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        Err(format!("backend {pid} did not exit"))
    }

    /// Closes every lock session (the end of a run).
    pub async fn close(&mut self) {
        for node in 0..self.sessions.len() {
            let _ = self.kill(node).await;
            self.sessions[node] = None;
        }
    }

    async fn lock_call(&mut self, node: usize, sql: &'static str, partition: i32) -> Answer {
        let Some(s) = self.sessions[node].as_mut() else {
            return Answer::Refused("no session".into());
        };
        match sqlx::query_scalar::<_, bool>(sql)
            .bind(PARTITION_NAMESPACE)
            .bind(partition)
            .fetch_one(&mut s.conn)
            .await
        {
            Ok(got) => Answer::Accepted(Value::Locked(got)),
            Err(e) => refused(e),
        }
    }

    /// Applies `step` (not `Connect`, which [`RealSide::connect`] does).
    pub async fn apply(&mut self, step: &Step, cluster: &Cluster, event: Option<&Event>) -> Answer {
        let policy = super::runner::policy();
        match step {
            Step::Connect { .. } => Answer::Refused("connect is not applied here".into()),
            Step::KillSession { node } => match self.kill(*node).await {
                Ok(()) => Answer::Accepted(Value::Done),
                Err(e) => refused(e),
            },
            Step::TryLock { node, partition } => {
                self.lock_call(*node, "SELECT pg_try_advisory_lock($1, $2)", *partition)
                    .await
            }
            Step::Unlock { node, partition } => {
                self.lock_call(*node, "SELECT pg_advisory_unlock($1, $2)", *partition)
                    .await
            }
            Step::Claim {
                node,
                inc,
                partition,
            } => {
                let Some(i) = cluster.inc(*node, *inc) else {
                    return Answer::Refused("no incarnation".into());
                };
                match self.store.claim_partition(*partition, i.id).await {
                    Ok(g) => Answer::Accepted(Value::Generation(g)),
                    Err(e) => refused(e),
                }
            }
            Step::Release {
                node,
                inc,
                partition,
                generation,
            } => {
                let Some(i) = cluster.inc(*node, *inc) else {
                    return Answer::Refused("no incarnation".into());
                };
                match self
                    .store
                    .release_partition(*partition, i.id, *generation)
                    .await
                {
                    Ok(true) => Answer::Accepted(Value::Done),
                    Ok(false) => Answer::Refused("the claim moved on".into()),
                    Err(e) => refused(e),
                }
            }
            Step::Mint {
                node,
                inc,
                task,
                observed_epoch,
                generation,
            } => {
                let Some(i) = cluster.inc(*node, *inc) else {
                    return Answer::Refused("no incarnation".into());
                };
                let request = MintRequest {
                    task_id: cluster.tasks[*task],
                    observed_epoch: *observed_epoch,
                    generation: *generation,
                };
                match self.store.mint_pods(i.id, &[request]).await {
                    Ok(minted) => match minted.first() {
                        Some(m) => Answer::Accepted(Value::Epoch(m.epoch)),
                        None => Answer::Refused("not minted".into()),
                    },
                    Err(e) => refused(e),
                }
            }
            Step::Append {
                task,
                epoch,
                version,
                ..
            } => {
                let Some(event) = event else {
                    return Answer::Refused("no event".into());
                };
                match self
                    .store
                    .append(
                        cluster.tasks[*task],
                        *version,
                        AppendFence::Pod { epoch: *epoch },
                        std::slice::from_ref(event),
                        &metadata(),
                    )
                    .await
                {
                    Ok(a) => Answer::Accepted(Value::Version(a.state.version)),
                    Err(e) => refused(e),
                }
            }
            Step::Crash {
                node,
                inc,
                task,
                epoch,
                generation,
                kind,
                batch,
            } => {
                let Some(i) = cluster.inc(*node, *inc) else {
                    return Answer::Refused("no incarnation".into());
                };
                let report = CrashReport {
                    task_id: cluster.tasks[*task],
                    epoch: *epoch,
                    node: Some(i.id),
                    reason: format!("{} of epoch {epoch}", kind.as_str()),
                    kind: *kind,
                };
                let answer = if *batch {
                    let item = CrashItem {
                        report,
                        generation: *generation,
                        jitter: 0.5,
                        metadata: metadata(),
                    };
                    self.store
                        .record_crashes(&[item], i.id, &policy)
                        .await
                        .pop()
                        .unwrap_or_else(|| Err(taskpod_core::Error::Internal("no answer".into())))
                } else {
                    self.store
                        .record_crash(&report, i.id, *generation, &policy, 0.5, &metadata())
                        .await
                };
                match answer {
                    Ok(o) => Answer::Accepted(Value::Crash(outcome_name(&o))),
                    Err(e) => refused(e),
                }
            }
            Step::Command { task, command } => {
                let ctx = RequestContext::new("conformance").with_correlation_id("conformance");
                match self
                    .store
                    .execute(cluster.tasks[*task], command, &ctx)
                    .await
                {
                    Ok(x) => Answer::Accepted(Value::Version(x.state.version)),
                    Err(e) => refused(e),
                }
            }
        }
    }

    /// The heads of `cluster`'s tasks.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub async fn heads(&self, cluster: &Cluster) -> Result<Vec<TaskState>, String> {
        let mut out = Vec::with_capacity(cluster.tasks.len());
        for t in &cluster.tasks {
            out.push(self.store.state(*t).await.map_err(|e| e.to_string())?);
        }
        Ok(out)
    }
}

fn outcome_name(o: &CrashOutcome) -> &'static str {
    match o {
        CrashOutcome::Restart { .. } => "restart",
        CrashOutcome::Failed { .. } => "failed",
        CrashOutcome::Ended => "ended",
        CrashOutcome::AlreadyRecorded => "already recorded",
    }
}
