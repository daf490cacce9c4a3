//! A private PostgreSQL server run from the system's binaries, for `taskpod dev` and
//! `taskpod bench --dev`.
//!
//! Everything lives under `<data-dir>/pg`: the cluster in `data/`, the server log in
//! `postgres.log` and the unix socket beside them. The socket sits there rather than in
//! `<data-dir>` itself because, when we run as root, the server runs as the `postgres`
//! system user and may write only the folder we hand over to it.
//!
//! Crates that download Postgres at run time cannot work offline or in sandboxes, so we
//! drive the installed `initdb` and `pg_ctl` instead.

use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};

/// The folder under the data dir that belongs to the server (and, as root, to the
/// `postgres` user).
pub const PG_DIR: &str = "pg";
const CLUSTER_DIR: &str = "data";
const LOG_FILE: &str = "postgres.log";
/// The Debian package, and the system user it creates.
const PACKAGE: &str = "postgresql";
const SYSTEM_USER: &str = "postgres";
/// The superuser initdb creates; trusted on loopback and the socket only.
pub const SUPERUSER: &str = "postgres";
/// How long pg_ctl waits for the server to start or stop.
const PG_CTL_TIMEOUT_SECS: &str = "60";
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    #[error(
        "no PostgreSQL server binaries found (looked for initdb via {searched}); \
         install the Debian package `{PACKAGE}` (`apt-get install -y {PACKAGE}`, or run \
         scripts/dev.sh), or pass --pg-bindir"
    )]
    NotInstalled { searched: String },
    #[error("{0} has no initdb and pg_ctl: not a PostgreSQL bindir")]
    NotABindir(PathBuf),
    #[error(
        "running as root, but initdb and postgres refuse to run as root and there is no \
         `{SYSTEM_USER}` user to run them as; install the `{PACKAGE}` package or run \
         taskpod dev as a normal user"
    )]
    NoSystemUser,
    #[error(
        "the `{SYSTEM_USER}` user cannot write {0}: every folder above it must be \
         searchable by other users (chmod o+x), or choose a --data-dir under /tmp"
    )]
    Unreachable(PathBuf),
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not run {program}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} failed ({status}):\n{output}")]
    Failed {
        what: &'static str,
        status: ExitStatus,
        output: String,
    },
    #[error("postgres did not start ({status}); the end of {log}:\n{tail}")]
    StartFailed {
        status: ExitStatus,
        log: PathBuf,
        tail: String,
    },
    #[error("{0} is not valid UTF-8, which pg_ctl's option string needs")]
    NonUtf8Path(PathBuf),
    #[error(
        "the socket path {path} is {len} bytes, more than the {MAX_SOCKET_PATH} unix \
         sockets allow; choose a shorter --data-dir"
    )]
    SocketPathTooLong { path: PathBuf, len: usize },
    #[error("no free loopback port")]
    NoFreePort(#[source] io::Error),
}

/// Finds the server binaries: the explicit folder, else `pg_config --bindir` (when it
/// has a server: pg_config may come from a client-only package of another version), else
/// the newest `/usr/lib/postgresql/<major>/bin` (Debian installs every major there and
/// puts none of them on `PATH`), else `initdb` on `PATH` (other distributions).
///
/// # Errors
/// [`PostgresError::NotInstalled`] naming where it looked, or
/// [`PostgresError::NotABindir`] for an explicit folder without the server.
pub fn find_bindir(explicit: Option<&Path>) -> Result<PathBuf, PostgresError> {
    if let Some(dir) = explicit {
        return if is_bindir(dir) {
            Ok(dir.to_path_buf())
        } else {
            Err(PostgresError::NotABindir(dir.to_path_buf()))
        };
    }
    let from_pg_config = std::process::Command::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|dir| PathBuf::from(dir.trim()));
    if let Some(dir) = from_pg_config.filter(|dir| is_bindir(dir)) {
        return Ok(dir);
    }
    if let Some(dir) = newest_debian_bindir(Path::new("/usr/lib/postgresql")) {
        return Ok(dir);
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|dir| is_bindir(dir));
    on_path.ok_or_else(|| PostgresError::NotInstalled {
        searched: "pg_config --bindir, /usr/lib/postgresql/*/bin and PATH".into(),
    })
}

fn is_bindir(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|bin| dir.join(bin).is_file())
}

/// Compares majors as numbers, so that 9.6 < 10 < 15.
fn newest_debian_bindir(root: &Path) -> Option<PathBuf> {
    let entries = fs::read_dir(root).ok()?;
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version: Vec<u32> = name
                .split('.')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            let bindir = entry.path().join("bin");
            is_bindir(&bindir).then_some((version, bindir))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bindir)| bindir)
}

/// Who runs the server binaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunAs {
    CurrentUser,
    /// We are root, which initdb, pg_ctl and postgres refuse: they run as the
    /// `postgres` system user, which owns the `pg` folder.
    SystemUser {
        uid: u32,
        gid: u32,
    },
}

impl RunAs {
    fn detect() -> Result<Self, PostgresError> {
        if effective_uid()? != 0 {
            return Ok(RunAs::CurrentUser);
        }
        let uid = id_of(&["-u", SYSTEM_USER]).ok_or(PostgresError::NoSystemUser)?;
        let gid = id_of(&["-g", SYSTEM_USER]).ok_or(PostgresError::NoSystemUser)?;
        Ok(RunAs::SystemUser { uid, gid })
    }

    fn command(self, program: &Path) -> std::process::Command {
        let mut cmd = match self {
            RunAs::CurrentUser => std::process::Command::new(program),
            RunAs::SystemUser { .. } => {
                let mut cmd = std::process::Command::new("runuser");
                cmd.args(["-u", SYSTEM_USER, "--"]).arg(program);
                cmd
            }
        };
        // The server detaches with its output in the log; nothing should wait on a
        // terminal or inherit our input.
        cmd.stdin(Stdio::null());
        cmd
    }
}

/// The effective uid, read from `/proc` so that no libc binding is needed; `id -u` where
/// there is no `/proc`.
fn effective_uid() -> Result<u32, PostgresError> {
    let from_proc = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1))
                .and_then(|euid| euid.parse().ok())
        });
    match from_proc.or_else(|| id_of(&["-u"])) {
        Some(uid) => Ok(uid),
        None => Err(PostgresError::Spawn {
            program: "id -u".into(),
            source: io::Error::other("could not tell which user we run as"),
        }),
    }
}

fn id_of(args: &[&str]) -> Option<u32> {
    let out = std::process::Command::new("id")
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

/// How [`LocalPostgres::start`] got its server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A new cluster: initdb ran, then the server started.
    Initialised,
    /// An existing cluster, started by us.
    Restarted,
    /// A server an earlier run left running (it was killed before it could stop it).
    /// We adopt it: this run stops it, so leftovers do not pile up.
    Adopted,
}

/// A running private server. [`LocalPostgres::stop`] stops it; dropping it without
/// stopping stops it too (blocking), so that a panic or an early return does not leave
/// a server behind.
#[derive(Debug)]
pub struct LocalPostgres {
    bindir: PathBuf,
    /// `<data-dir>/pg`: the log and the socket.
    pg_dir: PathBuf,
    /// `<data-dir>/pg/data`: the cluster.
    cluster: PathBuf,
    port: u16,
    version: String,
    origin: Origin,
    run_as: RunAs,
    /// Set by a successful [`LocalPostgres::stop`], so that drop does nothing.
    stopped: bool,
}

impl LocalPostgres {
    /// Starts (or adopts) the server of `data_dir`, initialising the cluster on first
    /// use. `port` is used only when the server is not already running; a free loopback
    /// port is picked when it is `None`.
    ///
    /// # Errors
    /// When the folders cannot be prepared, initdb fails, or the server does not start
    /// (the error carries the end of its log). A server that started half-way is
    /// stopped before the error is returned.
    pub async fn start(
        bindir: &Path,
        data_dir: &Path,
        port: Option<u16>,
    ) -> Result<Self, PostgresError> {
        let run_as = RunAs::detect()?;
        let data_dir = create_dir(data_dir)?;
        let pg_dir = create_dir(&data_dir.join(PG_DIR))?;
        hand_over(&pg_dir, run_as).await?;
        let cluster = pg_dir.join(CLUSTER_DIR);
        let mut pg = LocalPostgres {
            bindir: bindir.to_path_buf(),
            pg_dir,
            cluster,
            port: 0,
            version: server_version(bindir).await?,
            origin: Origin::Restarted,
            run_as,
            // Nothing to stop until a server runs.
            stopped: true,
        };

        if !pg.cluster.join("PG_VERSION").is_file() {
            pg.initdb().await?;
            pg.origin = Origin::Initialised;
        } else if let Some(running_port) = pg.running_port().await? {
            pg.port = running_port;
            pg.origin = Origin::Adopted;
            pg.stopped = false;
            return Ok(pg);
        }

        pg.port = match port {
            Some(port) => port,
            None => free_port()?,
        };
        pg.check_socket_path()?;
        pg.stopped = false;
        if let Err(err) = pg.pg_ctl_start().await {
            // pg_ctl gives up waiting without stopping what it launched.
            if pg.running_port().await.ok().flatten().is_some() {
                let _ = pg.stop_with("immediate").await;
            }
            pg.stopped = true;
            return Err(err);
        }
        Ok(pg)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// `postgres --version`, for the start-up line.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    pub fn cluster_dir(&self) -> &Path {
        &self.cluster
    }

    pub fn log_file(&self) -> PathBuf {
        self.pg_dir.join(LOG_FILE)
    }

    /// Stops the server with a fast shutdown: clients are disconnected, open
    /// transactions roll back, and the cluster is left clean for the next start.
    ///
    /// # Errors
    /// When pg_ctl cannot stop a server that is still running.
    pub async fn stop(&mut self) -> Result<(), PostgresError> {
        if self.stopped {
            return Ok(());
        }
        self.stop_with("fast").await
    }

    async fn stop_with(&mut self, mode: &str) -> Result<(), PostgresError> {
        let result = run(self.stop_command(mode), "pg_ctl stop").await;
        match result {
            Ok(_) => {
                self.stopped = true;
                Ok(())
            }
            // Someone stopped it first: the outcome we wanted.
            Err(err) => match self.running_port().await {
                Ok(None) => {
                    self.stopped = true;
                    Ok(())
                }
                _ => Err(err),
            },
        }
    }

    fn stop_command(&self, mode: &str) -> std::process::Command {
        let mut cmd = self.run_as.command(&self.bindir.join("pg_ctl"));
        cmd.current_dir(&self.pg_dir)
            .arg("-D")
            .arg(&self.cluster)
            .args(["-m", mode, "-w", "-t", PG_CTL_TIMEOUT_SECS, "stop"]);
        cmd
    }

    async fn initdb(&self) -> Result<(), PostgresError> {
        let mut cmd = self.run_as.command(&self.bindir.join("initdb"));
        cmd.current_dir(&self.pg_dir)
            .arg("-D")
            .arg(&self.cluster)
            .args([
                "-U",
                SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ]);
        run(cmd, "initdb").await.map(drop)
    }

    async fn pg_ctl_start(&self) -> Result<(), PostgresError> {
        let socket_dir = self
            .pg_dir
            .to_str()
            .ok_or_else(|| PostgresError::NonUtf8Path(self.pg_dir.clone()))?;
        // pg_ctl hands this string to /bin/sh, hence the quoting.
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            self.port,
            sh_quote(socket_dir)
        );
        // The log keeps every run; a failure shows only what this start wrote.
        let log_start = fs::metadata(self.log_file()).map(|m| m.len()).unwrap_or(0);
        let mut cmd = self.run_as.command(&self.bindir.join("pg_ctl"));
        cmd.current_dir(&self.pg_dir)
            .arg("-D")
            .arg(&self.cluster)
            .arg("-l")
            .arg(self.log_file())
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "-o", &options, "start"]);
        match run(cmd, "pg_ctl start").await {
            Ok(_) => Ok(()),
            Err(PostgresError::Failed { status, .. }) => Err(PostgresError::StartFailed {
                status,
                log: self.log_file(),
                tail: log_tail(&self.log_file(), log_start, 20),
            }),
            Err(other) => Err(other),
        }
    }

    /// The port of the server running on this cluster, if one is. `pg_ctl status`
    /// decides, because a `postmaster.pid` can outlive its server after a crash.
    async fn running_port(&self) -> Result<Option<u16>, PostgresError> {
        let pid_file = self.cluster.join("postmaster.pid");
        if !pid_file.is_file() {
            return Ok(None);
        }
        let mut cmd = self.run_as.command(&self.bindir.join("pg_ctl"));
        cmd.current_dir(&self.pg_dir)
            .arg("-D")
            .arg(&self.cluster)
            .arg("status");
        let out = output(cmd, "pg_ctl status").await?;
        if !out.status.success() {
            return Ok(None);
        }
        // The fourth line of postmaster.pid is the port (see pidfile.h).
        let contents = fs::read_to_string(&pid_file).map_err(|source| PostgresError::Io {
            action: "could not read",
            path: pid_file.clone(),
            source,
        })?;
        Ok(contents
            .lines()
            .nth(3)
            .and_then(|port| port.trim().parse().ok()))
    }

    fn check_socket_path(&self) -> Result<(), PostgresError> {
        let path = self.pg_dir.join(format!(".s.PGSQL.{}", self.port));
        let len = path.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(PostgresError::SocketPathTooLong { path, len });
        }
        Ok(())
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        let stopped = self
            .stop_command("fast")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match stopped {
            Ok(status) if status.success() => {}
            Ok(status) => {
                tracing::warn!(%status, cluster = %self.cluster.display(), "could not stop postgres")
            }
            Err(error) => {
                tracing::warn!(%error, cluster = %self.cluster.display(), "could not run pg_ctl stop")
            }
        }
    }
}

/// Creates `path` (and its parents) readable and searchable by everyone, because the
/// server may run as another user that has to reach the `pg` folder, and returns it
/// absolute: the server changes into its cluster folder, so relative paths would break.
fn create_dir(path: &Path) -> Result<PathBuf, PostgresError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(|source| PostgresError::Io {
            action: "could not create",
            path: path.to_path_buf(),
            source,
        })?;
    fs::canonicalize(path).map_err(|source| PostgresError::Io {
        action: "could not resolve",
        path: path.to_path_buf(),
        source,
    })
}

/// Gives the `pg` folder to the user the server runs as and checks that it can get
/// there.
async fn hand_over(pg_dir: &Path, run_as: RunAs) -> Result<(), PostgresError> {
    let RunAs::SystemUser { uid, gid } = run_as else {
        return Ok(());
    };
    let meta = fs::metadata(pg_dir).map_err(|source| PostgresError::Io {
        action: "could not inspect",
        path: pg_dir.to_path_buf(),
        source,
    })?;
    if meta.uid() != uid {
        std::os::unix::fs::chown(pg_dir, Some(uid), Some(gid)).map_err(|source| {
            PostgresError::Io {
                action: "could not give to the postgres user",
                path: pg_dir.to_path_buf(),
                source,
            }
        })?;
    }
    let mut probe = run_as.command(Path::new("test"));
    probe.arg("-w").arg(pg_dir);
    match output(probe, "runuser").await?.status.success() {
        true => Ok(()),
        false => Err(PostgresError::Unreachable(pg_dir.to_path_buf())),
    }
}

async fn server_version(bindir: &Path) -> Result<String, PostgresError> {
    // `--version` is answered before postgres's root check, so it runs as anyone.
    let mut cmd = std::process::Command::new(bindir.join("postgres"));
    cmd.arg("--version");
    let out = run(cmd, "postgres --version").await?;
    let text = String::from_utf8_lossy(&out.stdout);
    let text = text.trim();
    // "postgres (PostgreSQL) 15.18 (Debian ...)" reads better as "PostgreSQL 15.18 (...)".
    Ok(match text.strip_prefix("postgres (PostgreSQL) ") {
        Some(version) => format!("PostgreSQL {version}"),
        None => text.to_owned(),
    })
}

fn free_port() -> Result<u16, PostgresError> {
    // The port is free now; another process could take it before the server binds it,
    // in which case the start fails with the reason in the log.
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(PostgresError::NoFreePort)
}

async fn output(cmd: std::process::Command, what: &str) -> Result<Output, PostgresError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    tokio::process::Command::from(cmd)
        .output()
        .await
        .map_err(|source| PostgresError::Spawn {
            program: format!("{program} ({what})"),
            source,
        })
}

/// Runs a command to completion and fails with its output when it fails.
async fn run(cmd: std::process::Command, what: &'static str) -> Result<Output, PostgresError> {
    let out = output(cmd, what).await?;
    if out.status.success() {
        return Ok(out);
    }
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Err(PostgresError::Failed {
        what,
        status: out.status,
        output: text.trim_end().to_owned(),
    })
}

/// The last `lines` lines written to `log` after byte `from`.
fn log_tail(log: &Path, from: u64, lines: usize) -> String {
    let text = match fs::read(log) {
        Ok(bytes) => {
            let from = usize::try_from(from).unwrap_or(0).min(bytes.len());
            String::from_utf8_lossy(&bytes[from..]).into_owned()
        }
        Err(err) => return format!("(could not read the log: {err})"),
    };
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sh_quote_survives_single_quotes() {
        assert_eq!(sh_quote("/tmp/it's here"), r"'/tmp/it'\''s here'");
    }

    #[test]
    fn newest_debian_bindir_compares_majors_as_numbers() -> Result<(), Box<dyn std::error::Error>> {
        let root = std::env::temp_dir().join(format!("taskpod-bindir-{}", std::process::id()));
        for major in ["9.6", "10", "15", "notaversion"] {
            let bin = root.join(major).join("bin");
            fs::create_dir_all(&bin)?;
            for name in ["initdb", "pg_ctl", "postgres"] {
                fs::write(bin.join(name), "")?;
            }
        }
        // A newer major without a server (client packages only) does not count.
        fs::create_dir_all(root.join("16").join("bin"))?;
        let found = newest_debian_bindir(&root);
        fs::remove_dir_all(&root)?;
        assert_eq!(found, Some(root.join("15").join("bin")));
        Ok(())
    }
}
