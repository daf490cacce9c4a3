//! Real `taskpod-worker` processes, killed (SIGKILL) when dropped unless stopped.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::api::TestDb;

const START_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct WorkerProcess {
    pub node_id: String,
    child: Child,
}

impl WorkerProcess {
    /// Starts a worker with fast ticks (so tests run quickly) and the given overrides.
    ///
    /// # Errors
    /// When the binary is missing or the worker does not register in time.
    pub async fn spawn(db: &TestDb, name: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut cmd = Command::new(crate::binary("taskpod-worker")?);
        cmd.env("TASKPOD_NAME", name)
            .env("TASKPOD_STORE__URL", &db.url)
            .env("TASKPOD_HEALTH_LISTEN", "127.0.0.1:0")
            .env("TASKPOD_TICK_MS", "100")
            .env("TASKPOD_CLAIM_INTERVAL_MS", "200")
            .env("TASKPOD_SETTLE_MS", "500")
            .env("TASKPOD_HANDLERS__SLEEP_PHASE_MS", "20")
            .env(
                "RUST_LOG",
                if crate::test_log_enabled() {
                    "info,taskpod_worker=debug"
                } else {
                    "warn"
                },
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(if crate::test_log_enabled() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().context("spawn taskpod-worker")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(START_TIMEOUT, lines.next_line())
            .await
            .context("taskpod-worker did not start in time")??;
        let Some(rest) = line
            .as_deref()
            .and_then(|l| l.strip_prefix("taskpod-worker "))
        else {
            let status = child.wait().await?;
            bail!("taskpod-worker exited ({status}) before registering; first line {line:?}");
        };
        let node_id = rest
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        Ok(Self { node_id, child })
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
