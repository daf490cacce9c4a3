//! One server binary of this workspace (`taskpod-worker`, `taskpod-api`) run as a child
//! that faults act on: signalled (KILL, STOP, CONT, TERM) and restarted under the same
//! name with the same settings. Its stderr (and anything after its ready line on
//! stdout) goes to one log file that every incarnation appends to, so a failing run
//! can be read back in order.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, Command};

use crate::os::{self, Signal};

/// How long a server may take to print its ready line.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a killed process may take to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);
/// Start attempts: a restart on a fixed port can lose a race for it.
const START_ATTEMPTS: u32 = 5;

/// A server process and how to start it again.
#[derive(Debug)]
pub struct ServerProcess {
    name: String,
    /// A command the binary runs under (`ip netns exec <ns>`, which execs it in place,
    /// so the pid and every signal are the server's own); empty: none.
    launcher: Vec<String>,
    binary: PathBuf,
    env: Vec<(String, String)>,
    log: PathBuf,
    /// The ready line starts with this; the rest is kept in `announced`.
    prefix: &'static str,
    child: Option<Child>,
    announced: String,
    starts: u32,
    paused: bool,
}

impl ServerProcess {
    /// Starts `binary` (a path) with exactly `env` on top of this process's environment
    /// minus every `TASKPOD_*` variable (the servers read those as settings), and waits
    /// for its ready line.
    ///
    /// # Errors
    /// When it does not start or says something else first.
    pub async fn start(
        name: &str,
        binary: PathBuf,
        env: Vec<(String, String)>,
        log: PathBuf,
        prefix: &'static str,
    ) -> anyhow::Result<Self> {
        Self::start_under(name, Vec::new(), binary, env, log, prefix).await
    }

    /// [`ServerProcess::start`] under `launcher`, a command that ends by exec'ing the
    /// binary in place (`ip netns exec <ns>`): every start runs under it.
    ///
    /// # Errors
    /// When it does not start or says something else first.
    pub async fn start_under(
        name: &str,
        launcher: Vec<String>,
        binary: PathBuf,
        env: Vec<(String, String)>,
        log: PathBuf,
        prefix: &'static str,
    ) -> anyhow::Result<Self> {
        let mut process = Self {
            name: name.to_owned(),
            launcher,
            binary,
            env,
            log,
            prefix,
            child: None,
            announced: String::new(),
            starts: 0,
            paused: false,
        };
        process.spawn().await?;
        Ok(process)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the ready line said after the prefix (addresses, the node id).
    pub fn announced(&self) -> &str {
        &self.announced
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// How many times it was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// The OS pid while a child runs (or is stopped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Whether the child has not exited (a stopped one counts as running).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The exit status of a child that exited without being killed or drained
    /// through this handle (a crash of the server itself), once; `None` while it runs
    /// or after a deliberate stop.
    pub fn exited_on_its_own(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        self.paused = false;
        Some(status)
    }

    /// Sends `signal`.
    ///
    /// # Errors
    /// When no child runs or the signal cannot be sent.
    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = self
            .pid()
            .with_context(|| format!("{} is not running", self.name))?;
        os::signal(pid, signal)
    }

    /// SIGSTOP: frozen with every socket open, as a hung process or a long GC pause.
    ///
    /// # Errors
    /// When no child runs.
    pub fn pause(&mut self) -> anyhow::Result<()> {
        self.signal(Signal::STOP)?;
        self.paused = true;
        Ok(())
    }

    /// SIGCONT after [`ServerProcess::pause`].
    ///
    /// # Errors
    /// When no child runs.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        self.signal(Signal::CONT)?;
        self.paused = false;
        Ok(())
    }

    /// SIGKILL, and waits until the child is reaped.
    ///
    /// # Errors
    /// When it is not reaped in time.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.paused = false;
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let _ = child.start_kill();
        tokio::time::timeout(REAP_TIMEOUT, child.wait())
            .await
            .with_context(|| format!("{} did not die after SIGKILL", self.name))??;
        Ok(())
    }

    /// SIGTERM (a graceful drain), waiting at most `grace` before SIGKILL. Returns the
    /// exit status when it exited by itself.
    ///
    /// # Errors
    /// When no child runs.
    pub async fn terminate(&mut self, grace: Duration) -> anyhow::Result<Option<ExitStatus>> {
        if self.paused {
            self.resume()?;
        }
        self.signal(Signal::TERM)?;
        let child = self.child.as_mut().context("no child")?;
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(status) => {
                self.child = None;
                Ok(Some(status?))
            }
            Err(_) => {
                self.kill().await?;
                Ok(None)
            }
        }
    }

    /// Kills the child if it runs, then starts it again with the same settings.
    ///
    /// # Errors
    /// When the new one does not start.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await?;
        self.spawn().await
    }

    /// Resumes a paused child and starts a dead one: what healing means for a process.
    ///
    /// # Errors
    /// When it cannot be started.
    pub async fn ensure_running(&mut self) -> anyhow::Result<()> {
        if self.paused {
            self.resume()?;
        }
        if !self.is_running() {
            self.child = None;
            self.spawn().await?;
        }
        Ok(())
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let mut last_error = None;
        for attempt in 0..START_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(300 * u64::from(attempt))).await;
            }
            match self.spawn_once().await {
                Ok(()) => return Ok(()),
                Err(err) => last_error = Some(err),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("{} never started", self.name)))
    }

    async fn spawn_once(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("open {}", self.log.display()))?;
        writeln!(log, "===== {} start #{} =====", self.name, self.starts)?;
        let mut cmd = match self.launcher.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(&self.binary);
                cmd
            }
            None => Command::new(&self.binary),
        };
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TASKPOD_") {
                cmd.env_remove(key);
            }
        }
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
        cmd.env("RUST_LOG", rust_log)
            // Plain logs: they are read as files.
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log.try_clone()?))
            .kill_on_drop(true);
        os::die_with_parent(&mut cmd, Signal::KILL);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", self.binary.display()))?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(START_TIMEOUT, lines.next_line()).await;
        // Anything more on stdout goes to the log, so the server never meets a closed
        // pipe.
        let mut rest = tokio::fs::File::from_std(log);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = rest.write_all(format!("{line}\n").as_bytes()).await;
            }
        });
        let line = match first {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None) | Err(_)) | Err(_) => {
                let _ = child.start_kill();
                let status = tokio::time::timeout(REAP_TIMEOUT, child.wait()).await;
                bail!(
                    "{} exited or hung before its ready line ({status:?}); the end of {}:\n{}",
                    self.name,
                    self.log.display(),
                    os::log_tail(&self.log, 15)
                );
            }
        };
        let Some(rest) = line.strip_prefix(self.prefix) else {
            let _ = child.start_kill();
            bail!(
                "{} said {line:?} instead of {:?}...",
                self.name,
                self.prefix
            );
        };
        self.announced = rest.trim().to_owned();
        self.child = Some(child);
        self.paused = false;
        Ok(())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        // SIGKILL works on a stopped process too. Reap it here, synchronously, so no
        // zombie or straggler outlives the cluster.
        let _ = child.start_kill();
        for _ in 0..500 {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
