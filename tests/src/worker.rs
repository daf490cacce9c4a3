//! Real `taskpod-worker` processes, killed (SIGKILL) when dropped unless stopped.

use std::time::Duration;

use anyhow::Context as _;
use tokio::process::{Child, Command};

use crate::api::TestDb;

#[derive(Debug)]
pub struct WorkerProcess {
    pub node_id: String,
    /// Where gRPC health is served (`health_listen`).
    pub health_addr: String,
    /// Where `GET /metrics` is served.
    pub metrics_addr: String,
    child: Child,
}

impl WorkerProcess {
    /// Starts a worker with fast ticks (so tests run quickly) and the given overrides.
    ///
    /// # Errors
    /// When the binary is missing or the worker does not register in time.
    pub async fn spawn(db: &TestDb, name: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut all = vec![
            ("TASKPOD_NAME", name),
            ("TASKPOD_STORE__URL", db.url.as_str()),
            ("TASKPOD_HEALTH_LISTEN", "127.0.0.1:0"),
            ("TASKPOD_TICK_MS", "100"),
            ("TASKPOD_CLAIM_INTERVAL_MS", "200"),
            ("TASKPOD_SETTLE_MS", "500"),
            ("TASKPOD_HANDLERS__SLEEP_PHASE_MS", "20"),
        ];
        all.extend_from_slice(env);
        let (child, rest) = crate::spawn_server("taskpod-worker", &all, "taskpod-worker ").await?;
        // `<node> health on <addr> metrics on <addr>`
        let words: Vec<&str> = rest.split_whitespace().collect();
        let [
            node_id,
            "health",
            "on",
            health_addr,
            "metrics",
            "on",
            metrics_addr,
        ] = words[..]
        else {
            anyhow::bail!("unexpected start line: taskpod-worker {rest}");
        };
        Ok(Self {
            node_id: node_id.to_owned(),
            health_addr: health_addr.to_owned(),
            metrics_addr: metrics_addr.to_owned(),
            child,
        })
    }

    /// The OpenMetrics text the worker serves.
    ///
    /// # Errors
    /// When the endpoint does not answer.
    pub async fn scrape(&self) -> anyhow::Result<String> {
        crate::scrape_metrics(&self.metrics_addr).await
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends a signal by name (`TERM`, `KILL`, `STOP`, `CONT`).
    ///
    /// # Errors
    /// When the process is gone.
    pub async fn signal(&self, name: &str) -> anyhow::Result<()> {
        let pid = self.child.id().context("already exited")?;
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .await?;
        anyhow::ensure!(status.success(), "kill -{name} {pid} failed");
        Ok(())
    }

    /// # Errors
    /// When the process does not exit within `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        Ok(tokio::time::timeout(timeout, self.child.wait()).await??)
    }
}

/// How many partitions the node `node_id` (as a worker printed it) owns.
///
/// # Errors
/// When the id is not a UUID or the store fails.
pub async fn partitions_owned(pool: &sqlx::PgPool, node_id: &str) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM partitions WHERE owner_node = $1")
            .bind(uuid::Uuid::parse_str(node_id)?)
            .fetch_one(pool)
            .await?,
    )
}
