//! A private PostgreSQL server for one cluster, from the system's binaries
//! (`/usr/lib/postgresql/<major>/bin`), that a test can crash and start again.
//!
//! `postgres` runs as a direct child of the test (as the `postgres` user when the test
//! runs as root, since initdb and postgres refuse root), not daemonised by `pg_ctl
//! start`: that way it gets a parent-death signal (SIGQUIT, the immediate shutdown) and
//! a test killed without unwinding leaves no server behind. Crashes still go through
//! `pg_ctl stop -m immediate`, exactly what an operator's emergency stop does: every
//! backend is killed at once and the next start runs crash recovery.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use sqlx::Connection as _;
use tokio::process::{Child, Command};

use super::scratch::Scratch;
use crate::os::{self, Signal};

/// How long a start (with crash recovery) may take.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The database the cluster's processes use.
pub const DATABASE: &str = "taskpod";

/// Server settings. `fsync` is off: the machine does not crash in these tests, only
/// the server, and a commit written to the kernel survives a killed server. But
/// `synchronous_commit` stays on: off, a commit is acknowledged before its WAL leaves
/// the server's memory, so an immediate stop loses acknowledged transactions (a first
/// run of the crash storm "lost" an acknowledged create exactly that way).
const SETTINGS: &[(&str, &str)] = &[
    ("fsync", "off"),
    ("full_page_writes", "off"),
    ("max_connections", "300"),
    ("shared_buffers", "64MB"),
    ("log_min_messages", "warning"),
];

#[derive(Debug)]
pub struct PgServer {
    bindir: PathBuf,
    /// Owned by the server's user: the cluster, the socket and the log.
    pg_dir: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    /// `(uid, gid)` of `postgres` when we are root.
    run_as: Option<(u32, u32)>,
    extra: Vec<(String, String)>,
    /// Where it listens besides 127.0.0.1: the host ends of members' network
    /// namespaces, each with its subnet, trusted in `pg_hba.conf`.
    also_listen: Vec<(Ipv4Addr, String)>,
    child: Option<Child>,
}

impl PgServer {
    /// initdb into `<root>/pg/data`, then starts the server on a free port and creates
    /// [`DATABASE`]. `extra` adds `-c name=value` settings; `also_listen` adds
    /// addresses to listen on (with 127.0.0.1), each with the subnet its clients come
    /// from, which `pg_hba.conf` trusts.
    ///
    /// # Errors
    /// When the binaries are missing, initdb fails or the server does not come up.
    pub async fn start(
        root: &Path,
        extra: &[(String, String)],
        also_listen: &[(Ipv4Addr, String)],
    ) -> anyhow::Result<Self> {
        let bindir = find_bindir()?;
        let pg_dir = Scratch::mkdir(&root.join("pg"))?;
        let run_as = if os::is_root() {
            let ids = os::user_ids("postgres")?;
            os::chown(&pg_dir, ids)?;
            Some(ids)
        } else {
            None
        };
        let mut server = Self {
            data: pg_dir.join("data"),
            log: pg_dir.join("postgres.log"),
            bindir,
            pg_dir,
            port: os::free_port()?,
            run_as,
            extra: extra.to_vec(),
            also_listen: also_listen.to_vec(),
            child: None,
        };
        server.initdb().await?;
        server.trust_subnets()?;
        server.launch().await?;
        let mut admin = sqlx::PgConnection::connect(&server.url("postgres")).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {DATABASE}")))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        Ok(server)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:<port>/<db>`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The same through another address it listens on (a namespace's host end).
    pub fn url_at(&self, addr: Ipv4Addr, db: &str) -> String {
        format!("postgres://postgres@{addr}:{}/{db}", self.port)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The postmaster's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// `pg_ctl stop -m immediate`: every session ends at once, nothing is checkpointed.
    ///
    /// # Errors
    /// When pg_ctl fails or the postmaster does not exit.
    pub async fn crash(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "-t", "60", "stop"])
            .output()
            .await
            .context("run pg_ctl stop")?;
        if !out.status.success() {
            // Put it back so that drop still stops it.
            self.child = Some(child);
            bail!(
                "pg_ctl stop -m immediate failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tokio::time::timeout(READY_TIMEOUT, child.wait())
            .await
            .context("the postmaster did not exit after an immediate stop")??;
        Ok(())
    }

    /// Starts the server again on the same port and data directory (running crash
    /// recovery after [`PgServer::crash`]).
    ///
    /// # Errors
    /// When it does not come up.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            return Ok(());
        }
        self.child = None;
        self.launch().await
    }

    async fn initdb(&self) -> anyhow::Result<()> {
        let out = self
            .command("initdb")
            .arg("-D")
            .arg(&self.data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ])
            .output()
            .await
            .context("run initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Appends a `host ... trust` line per subnet of `also_listen` to `pg_hba.conf`.
    fn trust_subnets(&self) -> anyhow::Result<()> {
        use std::io::Write as _;
        if self.also_listen.is_empty() {
            return Ok(());
        }
        let path = self.data.join("pg_hba.conf");
        let mut hba = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        for (_, subnet) in &self.also_listen {
            writeln!(hba, "host all all {subnet} trust")?;
        }
        Ok(())
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("open {}", self.log.display()))?;
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(&self.data)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(&self.pg_dir);
        let listen: Vec<String> = std::iter::once("127.0.0.1".to_owned())
            .chain(self.also_listen.iter().map(|(addr, _)| addr.to_string()))
            .collect();
        cmd.arg("-c")
            .arg(format!("listen_addresses={}", listen.join(",")));
        for (name, value) in SETTINGS
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .chain(self.extra.iter().cloned())
        {
            cmd.arg("-c").arg(format!("{name}={value}"));
        }
        cmd.stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        // SIGQUIT is the postmaster's immediate shutdown: it takes its backends along.
        os::die_with_parent(&mut cmd, Signal::QUIT);
        let child = cmd.spawn().context("spawn postgres")?;
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let url = self.url("postgres");
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(mut conn) = sqlx::PgConnection::connect(&url).await
                && sqlx::query("SELECT 1").execute(&mut conn).await.is_ok()
            {
                let _ = conn.close().await;
                return Ok(());
            }
            if !self.is_running() {
                bail!(
                    "postgres exited while starting; the end of {}:\n{}",
                    self.log.display(),
                    os::log_tail(&self.log, 20)
                );
            }
            if tokio::time::Instant::now() > deadline {
                bail!("postgres did not accept connections within {READY_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join(program));
        cmd.current_dir(&self.pg_dir).stdin(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        // The immediate shutdown: the postmaster kills its backends and exits; waiting
        // for it here means none of them outlives the test.
        if let Some(pid) = child.id() {
            let _ = os::signal(pid, Signal::QUIT);
        }
        for _ in 0..1000 {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.start_kill();
    }
}

/// The newest `/usr/lib/postgresql/<major>/bin` with a server, else `pg_config --bindir`.
fn find_bindir() -> anyhow::Result<PathBuf> {
    let is_bindir = |dir: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|b| dir.join(b).is_file())
    };
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let major = e.file_name().to_str()?.parse::<u32>().ok()?;
                    let bin = e.path().join("bin");
                    is_bindir(&bin).then_some((major, bin))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    if let Some((_, bin)) = found.pop() {
        return Ok(bin);
    }
    let out = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        .context(
            "no /usr/lib/postgresql/<major>/bin and no pg_config: apt-get install postgresql",
        )?;
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    anyhow::ensure!(is_bindir(&dir), "{} has no server binaries", dir.display());
    Ok(dir)
}
