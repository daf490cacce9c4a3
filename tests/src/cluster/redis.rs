//! A private Redis for one cluster, from the system's `redis-server`, that a test can
//! SIGKILL and start again on the same port (the bus carries hints, not data, so it
//! runs without persistence: a restart starts empty, as it would in production), pause
//! (SIGSTOP: a black hole that still accepts connections into its backlog) and resume,
//! and send commands to (`CLIENT KILL`, `CONFIG SET`, `PUBSUB`).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

use crate::os::{self, Signal};

const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`RedisServer::command`] waits for an answer.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct RedisServer {
    dir: PathBuf,
    port: u16,
    /// Addresses it binds besides 127.0.0.1 (host ends of members' namespaces).
    also_bind: Vec<Ipv4Addr>,
    child: Option<Child>,
    /// SIGSTOPped and not resumed since.
    paused: bool,
}

impl RedisServer {
    /// Starts `redis-server` on a free loopback port with its log in `dir`, also bound
    /// to `also_bind`.
    ///
    /// # Errors
    /// When the binary is missing or the server does not accept connections.
    pub async fn start(dir: &Path, also_bind: &[Ipv4Addr]) -> anyhow::Result<Self> {
        let mut server = Self {
            dir: dir.to_path_buf(),
            port: os::free_port()?,
            also_bind: also_bind.to_vec(),
            child: None,
            paused: false,
        };
        server.launch().await?;
        Ok(server)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The same through another address it is bound to (a namespace's host end).
    pub fn url_at(&self, addr: Ipv4Addr) -> String {
        format!("redis://{addr}:{}", self.port)
    }

    /// Its log, where it tells which clients it disconnected and why.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// SIGSTOP: connections stay open and new ones are accepted by the kernel, but
    /// nothing is ever answered until [`RedisServer::resume`].
    ///
    /// # Errors
    /// When it is not running.
    pub fn pause(&mut self) -> anyhow::Result<()> {
        let pid = self.pid().context("redis-server is not running")?;
        os::signal(pid, Signal::STOP)?;
        self.paused = true;
        Ok(())
    }

    /// SIGCONT.
    ///
    /// # Errors
    /// When it is not running.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        let pid = self.pid().context("redis-server is not running")?;
        os::signal(pid, Signal::CONT)?;
        self.paused = false;
        Ok(())
    }

    /// Runs one command (`["CLIENT", "KILL", "TYPE", "pubsub"]`) on a connection of its
    /// own and returns the reply.
    ///
    /// # Errors
    /// When Redis does not answer within a few seconds, or refuses the command.
    pub async fn command(&self, args: &[&str]) -> anyhow::Result<redis::Value> {
        let (name, rest) = args.split_first().context("an empty command")?;
        let client = redis::Client::open(self.url())?;
        let call = async {
            let mut conn = client.get_multiplexed_async_connection().await?;
            redis::cmd(name)
                .arg(rest)
                .query_async::<redis::Value>(&mut conn)
                .await
        };
        tokio::time::timeout(COMMAND_TIMEOUT, call)
            .await
            .with_context(|| format!("redis {args:?} did not answer in {COMMAND_TIMEOUT:?}"))?
            .with_context(|| format!("redis {args:?}"))
    }

    /// SIGKILL: every subscription and every message in flight is gone at once.
    ///
    /// # Errors
    /// When it is not reaped in time.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.paused = false;
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .context("redis-server did not die after SIGKILL")??;
        }
        Ok(())
    }

    /// Starts it again on the same port (resumes it if paused).
    ///
    /// # Errors
    /// When it does not come up.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            if self.paused {
                self.resume()?;
            }
            return Ok(());
        }
        self.paused = false;
        self.child = None;
        self.launch().await
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let log = self.log_path();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string()])
            .arg("--bind")
            .arg("127.0.0.1")
            .args(self.also_bind.iter().map(ToString::to_string))
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            // Protected mode refuses every client but loopback without a password; the
            // extra addresses are reachable only from the harness's namespaces.
            .args([
                "--protected-mode",
                if self.also_bind.is_empty() {
                    "yes"
                } else {
                    "no"
                },
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        os::die_with_parent(&mut cmd, Signal::KILL);
        let child = cmd
            .spawn()
            .context("spawn redis-server (apt-get install redis-server)")?;
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if !self.is_running() {
                bail!(
                    "redis-server exited while starting; the end of {}:\n{}",
                    log.display(),
                    os::log_tail(&log, 10)
                );
            }
            if tokio::time::Instant::now() > deadline {
                bail!("redis-server did not accept connections within {READY_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
            for _ in 0..300 {
                if !matches!(child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
