//! The per-run guard of `exec`: `taskpod-worker exec-guard`, a small synchronous process
//! between the worker and each program run, whose only job is to make the run die with
//! the worker's claim.
//!
//! Killing a process group on stop is not enough: a SIGKILLed or SIGSTOPed worker kills
//! nothing, `PR_SET_PDEATHSIG` reaches only the direct child and is not inherited, and a
//! grandchild may leave the group (`setsid`). So the worker starts this guard instead of
//! the program. The guard makes itself a child subreaper (every orphan of the run is
//! reparented to it, wherever it moved), starts the program in a process group of its
//! own, and watches a feed socket on which the worker writes a byte every feed interval
//! while its lock session is alive. It kills the whole tree (the program's group, then
//! every remaining descendant, found through `/proc/*/stat`) and reaps it when
//!
//! - the feed reaches end of file: the worker died (SIGKILL), or it is stopping the run
//!   (stop request, phase timeout, lost liveness) and closed its end;
//! - no byte came within the guard timeout: the worker is paused (SIGSTOP), hung, or
//!   stopped feeding because its lock session is no longer confirmed;
//! - the program exited by itself: nothing of a finished run may linger.
//!
//! Then it exits as the program did (the same code, or killed by the same signal), so
//! the worker maps the run's end as if it had started the program itself.
//!
//! The guard has no PDEATHSIG of its own: a SIGKILL on the worker's death would kill it
//! before it could kill the tree. The feed's end of file is its death signal, and it
//! cannot be missed: the worker's end is close-on-exec, so only the worker holds it.
//!
//! Protocol on the feed (a Unix stream socket pair): the guard's end is inherited as
//! `--feed-fd`; the program's argv comes as a JSON array in [`ARGV_ENV`] (not on the
//! command line, so `ps` and `pgrep -f` show the program's own processes only); the
//! guard answers one line, `started <pid>` or `error <reason>`; then the worker only
//! writes.

use std::ffi::OsString;
use std::io::{self, Read as _, Write as _};
use std::os::fd::{FromRawFd as _, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::{Pid, Signal, WaitOptions, WaitStatus};

/// The hidden subcommand of `taskpod-worker` that runs a guard.
pub const SUBCOMMAND: &str = "exec-guard";
/// Where the guard finds the program's argv (a JSON array of strings).
pub const ARGV_ENV: &str = "TASKPOD_EXEC_GUARD_ARGV";
/// How long the guard waits for the processes it killed to be reaped. A process with a
/// pending SIGKILL runs no more code, but one in uninterruptible sleep (a hung NFS
/// mount) may take any time to go: the guard leaves it to init rather than linger.
const REAP_TIMEOUT: Duration = Duration::from_millis(1_000);
/// Without a pidfd (Linux before 5.3) the guard notices the program's exit this late.
const EXIT_POLL: Duration = Duration::from_millis(20);

/// Why a guard could not run its program.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("usage: taskpod-worker {SUBCOMMAND} --feed-fd FD --timeout-ms MS (argv in {ARGV_ENV})")]
    Usage,
    #[error("{ARGV_ENV} is not a non-empty JSON array of strings: {0}")]
    Argv(String),
    #[error("fd {0} is not an open feed socket: {1}")]
    Feed(i32, io::Error),
    #[error("cannot become a child subreaper: {0}")]
    Subreaper(io::Error),
    #[error("cannot start {program}: {source}")]
    Spawn { program: String, source: io::Error },
}

/// Why the worker's side could not get a run going.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The program could not be started (missing, not executable): the guard's reason.
    #[error("{0}")]
    Program(String),
    /// The guard itself failed or did not answer: an environmental failure, worth a retry.
    #[error("the exec guard did not start: {0}")]
    Guard(String),
}

/// `taskpod-worker exec-guard ...`: runs one guarded program and exits as it did.
pub fn main(args: impl Iterator<Item = OsString>) -> ExitCode {
    match run(args) {
        Ok(status) => exit_as(status),
        Err(e) => {
            let _ = writeln!(io::stderr(), "taskpod-worker {SUBCOMMAND}: {e}");
            // 127, as a shell that cannot run a command; the worker reads the reason
            // from the feed.
            ExitCode::from(127)
        }
    }
}

struct Options {
    feed_fd: i32,
    timeout: Duration,
}

fn parse(mut args: impl Iterator<Item = OsString>) -> Result<Options, GuardError> {
    let (mut feed_fd, mut timeout) = (None, None);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .and_then(|v| v.into_string().ok())
            .ok_or(GuardError::Usage)?;
        match flag.to_str() {
            Some("--feed-fd") => feed_fd = Some(value.parse().map_err(|_| GuardError::Usage)?),
            Some("--timeout-ms") => {
                timeout = Some(Duration::from_millis(
                    value.parse().map_err(|_| GuardError::Usage)?,
                ));
            }
            _ => return Err(GuardError::Usage),
        }
    }
    match (feed_fd, timeout) {
        (Some(feed_fd), Some(timeout)) if timeout > Duration::ZERO => {
            Ok(Options { feed_fd, timeout })
        }
        _ => Err(GuardError::Usage),
    }
}

fn run(args: impl Iterator<Item = OsString>) -> Result<Option<WaitStatus>, GuardError> {
    let options = parse(args)?;
    let argv: Vec<String> = std::env::var(ARGV_ENV)
        .map_err(|e| GuardError::Argv(e.to_string()))
        .and_then(|v| serde_json::from_str(&v).map_err(|e| GuardError::Argv(e.to_string())))?;
    let Some((program, args)) = argv.split_first() else {
        return Err(GuardError::Argv("empty".into()));
    };
    let feed = adopt_feed(options.feed_fd)?;
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
        .map_err(|e| GuardError::Subreaper(e.into()))?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(args).env_remove(ARGV_ENV).process_group(0);
    die_with_guard(&mut cmd);
    let child = match cmd.spawn() {
        Ok(child) => child,
        Err(source) => {
            let e = GuardError::Spawn {
                program: program.clone(),
                source,
            };
            let _ = (&feed).write_all(format!("error {e}\n").as_bytes());
            return Err(e);
        }
    };
    // Waited for through waitpid(-1) with every orphan, never through `child`.
    let pid = Pid::from_child(&child);
    drop(child);
    // A worker that is gone cannot read this; the watch below finds out at once.
    let _ = (&feed).write_all(format!("started {}\n", pid.as_raw_nonzero()).as_bytes());

    let mut status = None;
    watch(&feed, pid, options.timeout, &mut status);
    kill_tree(pid, &mut status);
    Ok(status)
}

/// Takes ownership of the inherited feed socket and keeps it from the program.
#[allow(unsafe_code)]
fn adopt_feed(fd: i32) -> Result<UnixStream, GuardError> {
    if fd <= 2 {
        return Err(GuardError::Usage);
    }
    let fail = |e: rustix::io::Errno| GuardError::Feed(fd, e.into());
    // SAFETY: the worker passes this descriptor to this process for the guard alone
    // (its number is the `--feed-fd` it set up in `inherit_feed`); nothing else in this
    // process opened, owns or closes it, and fcntl(2) checks that it is open before it
    // is owned.
    let owned = unsafe {
        rustix::io::fcntl_getfd(std::os::fd::BorrowedFd::borrow_raw(fd)).map_err(fail)?;
        OwnedFd::from_raw_fd(fd)
    };
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC).map_err(fail)?;
    Ok(UnixStream::from(owned))
}

/// Waits until the program exits, the feed closes, or the feed stays silent past
/// `timeout`; reaps orphans meanwhile.
fn watch(feed: &UnixStream, program: Pid, timeout: Duration, status: &mut Option<WaitStatus>) {
    let pidfd = rustix::process::pidfd_open(program, rustix::process::PidfdFlags::empty()).ok();
    let mut deadline = Instant::now() + timeout;
    let mut buf = [0u8; 256];
    loop {
        if reap(program, status) {
            return;
        }
        let now = Instant::now();
        let Some(mut wait) = deadline
            .checked_duration_since(now)
            .filter(|d| !d.is_zero())
        else {
            return;
        };
        if pidfd.is_none() {
            wait = wait.min(EXIT_POLL);
        }
        let timespec = Timespec::try_from(wait).unwrap_or(Timespec {
            tv_sec: 1,
            tv_nsec: 0,
        });
        let mut fds = vec![PollFd::new(feed, PollFlags::IN)];
        if let Some(pidfd) = &pidfd {
            fds.push(PollFd::new(pidfd, PollFlags::IN));
        }
        match rustix::event::poll(&mut fds, Some(&timespec)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            // Nothing to wait on: treat it as the worker gone rather than spin.
            Err(_) => return,
        }
        if fds[0].revents().is_empty() {
            continue;
        }
        match (&*feed).read(&mut buf) {
            // End of file (or reset: the worker closed with our answer unread).
            Ok(0) => return,
            Ok(_) => deadline = Instant::now() + timeout,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) => {}
            Err(_) => return,
        }
    }
}

/// Reaps every exited child without blocking, noting the program's status. Returns
/// whether the program has exited.
fn reap(program: Pid, status: &mut Option<WaitStatus>) -> bool {
    loop {
        match rustix::process::wait(WaitOptions::NOHANG) {
            Ok(Some((pid, st))) => {
                if pid == program {
                    *status = Some(st);
                }
            }
            Ok(None) | Err(_) => return status.is_some(),
        }
    }
}

/// SIGKILLs the program's group and every descendant of the guard, until none is left
/// (or [`REAP_TIMEOUT`] passed), and reaps them.
///
/// The group kill is atomic against forks; the descendants found through `/proc` are
/// the ones that left the group (`setsid`, `setpgid`). A process forked between a scan
/// and its parent's death is reparented to the guard and found by the next scan. Since
/// the guard is a subreaper, "no child left" means "no descendant left".
fn kill_tree(program: Pid, status: &mut Option<WaitStatus>) {
    let _ = rustix::process::kill_process_group(program, Signal::KILL);
    let me = rustix::process::getpid();
    let deadline = Instant::now() + REAP_TIMEOUT;
    loop {
        loop {
            match rustix::process::wait(WaitOptions::NOHANG) {
                Ok(Some((pid, st))) => {
                    if pid == program {
                        *status = Some(st);
                    }
                }
                Ok(None) => break,
                // ECHILD: nothing of the run is left.
                Err(_) => return,
            }
        }
        if Instant::now() >= deadline {
            return;
        }
        for pid in descendants(me) {
            let _ = rustix::process::kill_process(pid, Signal::KILL);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Every process whose chain of parents leads to `root`, from one scan of `/proc`.
pub fn descendants(root: Pid) -> Vec<Pid> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut parents: Vec<(i32, i32)> = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(entry.path().join("stat"))
            && let Some(ppid) = parent_in_stat(&stat)
        {
            parents.push((pid, ppid));
        }
    }
    let mut found = vec![root.as_raw_nonzero().get()];
    let mut next = 0;
    while next < found.len() {
        let parent = found[next];
        found.extend(
            parents
                .iter()
                .filter(|&&(_, ppid)| ppid == parent)
                .map(|&(pid, _)| pid),
        );
        next += 1;
    }
    found
        .into_iter()
        .skip(1)
        .filter_map(Pid::from_raw)
        .collect()
}

/// The parent pid in a `/proc/<pid>/stat` line: `pid (comm) state ppid ...`, where comm
/// may hold spaces and parentheses, so fields are counted from the last `)`.
fn parent_in_stat(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Ends the guard as the program ended: its exit code, or its terminating signal raised
/// on the guard alone (never the group), without a core dump.
fn exit_as(status: Option<WaitStatus>) -> ExitCode {
    if let Some(code) = status.and_then(WaitStatus::exit_status) {
        return ExitCode::from(code as u8);
    }
    let signal = status
        .and_then(WaitStatus::terminating_signal)
        .and_then(Signal::from_named_raw)
        .unwrap_or(Signal::KILL);
    let none = rustix::process::Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    let _ = rustix::process::setrlimit(rustix::process::Resource::Core, none);
    let me = rustix::process::getpid();
    let _ = rustix::process::kill_process(me, signal);
    // Ignored where the guard was started (SIGPIPE, a nohup'd SIGHUP): still a signal.
    let _ = rustix::process::kill_process(me, Signal::KILL);
    ExitCode::from(128 + signal.as_raw() as u8)
}

/// Makes the program receive SIGKILL when the guard dies (say, SIGKILLed by the worker's
/// backup kill): the program at least goes with it.
#[allow(unsafe_code)]
fn die_with_guard(cmd: &mut std::process::Command) {
    let guard = rustix::process::getpid();
    // SAFETY: the closure runs in the forked child before exec and only makes the
    // prctl(2) and getppid(2) system calls and builds an io::Error from an errno: it
    // allocates nothing and takes no lock, as async-signal-safety requires. The guard is
    // single-threaded, so the forking thread lives as long as the guard.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
            if rustix::process::getppid() != Some(guard) {
                return Err(rustix::io::Errno::SRCH.into());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parent_is_read_past_a_command_name_with_spaces_and_parentheses() {
        assert_eq!(parent_in_stat("42 (sh) S 7 42 42 0 -1"), Some(7));
        assert_eq!(parent_in_stat("42 (a (b) c) R 9 1 1 0"), Some(9));
        assert_eq!(parent_in_stat("garbage"), None);
    }

    #[test]
    fn arguments_are_both_required() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>().into_iter();
        assert!(parse(args(&["--feed-fd", "3", "--timeout-ms", "1000"])).is_ok());
        assert!(parse(args(&["--feed-fd", "3"])).is_err());
        assert!(parse(args(&["--feed-fd", "3", "--timeout-ms", "0"])).is_err());
        assert!(parse(args(&["--feed-fd", "x", "--timeout-ms", "5"])).is_err());
    }

    #[test]
    fn descendants_are_found_below_a_process() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30 & wait"])
            .spawn()
            .unwrap();
        let sh = Pid::from_child(&child);
        let deadline = Instant::now() + Duration::from_secs(10);
        let found = loop {
            let found = descendants(sh);
            if found.len() >= 2 || Instant::now() > deadline {
                break found;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        for pid in found.iter().chain([&sh]) {
            let _ = rustix::process::kill_process(*pid, Signal::KILL);
        }
        let _ = child.wait();
        assert_eq!(found.len(), 2, "its two sleeps: {found:?}");
    }
}
