//! What the server side shows of a cut worker, sampled every [`INTERVAL`]: whether
//! its lock session still exists, how many of its partitions other nodes have claimed,
//! and whether a new incarnation of it registered and owns partitions. Postgres is the
//! witness here, not the worker: the worker's own view (its log) is read separately.
//!
//! One query per sample on the oracle pool; `pg_stat_activity` is cheap (unlike
//! `pg_locks`), so sampling it every 50 ms costs nothing the cluster notices.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::chaos::storm::unix_ms;

/// How often the store is sampled.
pub const INTERVAL: Duration = Duration::from_millis(50);

/// The cut worker as it stood just before the cut.
#[derive(Clone, Debug)]
pub struct Victim {
    /// `TASKPOD_NAME`.
    pub name: String,
    /// Its incarnation when cut.
    pub node: Uuid,
    /// The backend pid of its lock session.
    pub session: Option<i32>,
    /// The partitions it owned.
    pub partitions: Vec<i32>,
    /// Its live pods: task, epoch, program (`None` for a non-`exec` task).
    pub pods: Vec<(Uuid, i64, Option<String>)>,
}

impl Victim {
    /// Reads what `name`'s newest incarnation owns and runs now.
    ///
    /// # Errors
    /// When Postgres cannot be queried or `name` has no incarnation.
    pub async fn read(pool: &PgPool, name: &str, session: Option<i32>) -> anyhow::Result<Self> {
        let node: Uuid = sqlx::query_scalar(
            "SELECT node_id FROM nodes WHERE name = $1 ORDER BY started_at DESC LIMIT 1",
        )
        .bind(name)
        .fetch_one(pool)
        .await?;
        let partitions: Vec<i32> = sqlx::query_scalar(
            "SELECT partition FROM partitions WHERE owner_node = $1 ORDER BY partition",
        )
        .bind(node)
        .fetch_all(pool)
        .await?;
        let pods: Vec<(Uuid, i64, Option<String>)> = sqlx::query_as(
            "SELECT h.task_id, h.pod_epoch, t.payload->>'program' FROM task_heads h \
             JOIN tasks t ON t.task_id = h.task_id \
             WHERE h.owner_node = $1 AND h.pod_state IN ('starting', 'running')",
        )
        .bind(node)
        .fetch_all(pool)
        .await?;
        Ok(Self {
            name: name.to_owned(),
            node,
            session,
            partitions,
            pods,
        })
    }
}

/// One look at the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// When it was taken (unix ms, before the query).
    pub at_ms: i64,
    /// The victim's lock session still exists.
    pub session_alive: bool,
    /// Of the victim's partitions, how many another worker owns.
    pub reclaimed: i64,
    /// A newer incarnation of the victim: when it registered (Postgres's clock).
    pub new_started_ms: Option<i64>,
    /// Partitions owned by newer incarnations of the victim.
    pub new_owned: i64,
}

/// Samples until stopped.
#[derive(Debug)]
pub struct Monitor {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Monitor {
    pub fn start(pool: PgPool, victim: &Victim) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let task = {
            let (samples, stop, victim) = (Arc::clone(&samples), stop.clone(), victim.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let at_ms = unix_ms();
                    if let Ok(sample) = sample(&pool, &victim, at_ms).await {
                        samples
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(sample);
                    }
                }
            })
        };
        Self {
            samples,
            stop,
            task,
        }
    }

    /// The newest sample.
    pub fn latest(&self) -> Option<Sample> {
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last()
            .copied()
    }

    /// Stops and returns every sample, oldest first.
    pub async fn stop(self) -> Vec<Sample> {
        self.stop.cancel();
        let _ = self.task.await;
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples.clone()
    }
}

async fn sample(pool: &PgPool, victim: &Victim, at_ms: i64) -> anyhow::Result<Sample> {
    let (session_alive, reclaimed, new_started_ms, new_owned): (bool, i64, Option<i64>, i64) =
        sqlx::query_as(
            "SELECT \
               EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1), \
               (SELECT count(*) FROM partitions p JOIN nodes n ON n.node_id = p.owner_node \
                 WHERE p.partition = ANY($2) AND n.name <> $3), \
               (SELECT (extract(epoch FROM min(started_at)) * 1000)::bigint FROM nodes \
                 WHERE name = $3 AND node_id <> $4 AND started_at > \
                   (SELECT started_at FROM nodes WHERE node_id = $4 \
                    UNION ALL SELECT '-infinity'::timestamptz ORDER BY 1 DESC LIMIT 1)), \
               (SELECT count(*) FROM partitions p JOIN nodes n ON n.node_id = p.owner_node \
                 WHERE n.name = $3 AND n.node_id <> $4)",
        )
        .bind(victim.session.unwrap_or(-1))
        .bind(&victim.partitions)
        .bind(&victim.name)
        .bind(victim.node)
        .fetch_one(pool)
        .await?;
    Ok(Sample {
        at_ms,
        session_alive,
        reclaimed,
        new_started_ms,
        new_owned,
    })
}
