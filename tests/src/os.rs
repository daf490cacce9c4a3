//! The few operating-system facts and calls the cluster harness needs: signals, "dies
//! with the test" for every child it starts, the `postgres` system user, free ports,
//! and finding processes by command line. Kept in one place so the one `unsafe` block
//! (a `pre_exec` hook) is easy to audit.

use std::net::TcpListener;
use std::path::Path;

use anyhow::Context as _;
pub use rustix::process::Signal;
use rustix::process::{Pid, kill_process};

/// A process's resident memory in KiB, from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Established TCP connections (IPv4) whose remote end is `port`: the clients a
/// loopback server on that port has, seen from their side.
pub fn connections_to(port: u16) -> usize {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return 0;
    };
    let port = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.get(2).is_some_and(|remote| remote.ends_with(&port)) && cols.get(3) == Some(&"01")
        })
        .count()
}

/// Sends `signal` to `pid`.
///
/// # Errors
/// When the pid does not fit, or the process is gone (ESRCH) or not ours.
pub fn signal(pid: u32, signal: Signal) -> anyhow::Result<()> {
    let raw = i32::try_from(pid).context("pid out of range")?;
    let pid = Pid::from_raw(raw).context("pid 0 is not a process")?;
    kill_process(pid, signal).with_context(|| format!("kill({raw}, {signal:?})"))?;
    Ok(())
}

/// Whether a process with this pid exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Pids of the processes whose command line contains `needle` (from `/proc`), except
/// this process.
pub fn pids_with_cmdline(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|raw| {
                let text: String = String::from_utf8_lossy(&raw).replace('\0', " ");
                text.contains(needle)
            })
        })
        .collect()
}

/// SIGKILLs every process whose command line contains `needle`, a few rounds (a
/// dying shell loop may fork once more), and returns how many were found.
pub fn kill_matching(needle: &str) -> usize {
    let mut killed = 0;
    for _ in 0..5 {
        let pids = pids_with_cmdline(needle);
        if pids.is_empty() {
            break;
        }
        for pid in &pids {
            if signal(*pid, Signal::KILL).is_ok() {
                killed += 1;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    killed
}

/// A loopback TCP port nothing listens on right now. Another process may take it
/// before it is used; the callers retry a start that fails to bind.
///
/// # Errors
/// When no socket can be bound at all.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).context("bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Whether we run as root, in which case Postgres must run as another user.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The uid and gid of `user`, from `/etc/passwd`.
///
/// # Errors
/// When the user does not exist.
pub fn user_ids(user: &str) -> anyhow::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("read /etc/passwd")?;
    passwd
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let _password = fields.next()?;
            let uid = fields.next()?.parse().ok()?;
            let gid = fields.next()?.parse().ok()?;
            (name == user).then_some((uid, gid))
        })
        .next()
        .with_context(|| format!("no {user:?} user in /etc/passwd (apt-get install postgresql)"))
}

/// Gives `path` to `uid:gid`.
///
/// # Errors
/// When chown fails.
pub fn chown(path: &Path, (uid, gid): (u32, u32)) -> anyhow::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", path.display()))
}

/// Makes the child receive `signal` when the thread that spawns it exits, so that a
/// test process that dies without unwinding (SIGKILL, a nextest timeout, `abort`)
/// leaves no server behind. Every child of the harness is spawned from a runtime
/// thread that lives as long as the test's runtime, never from a short-lived
/// blocking-pool thread. The hook runs after `uid()`/`gid()` are applied, which matters:
/// a credential change clears the parent-death signal.
#[allow(unsafe_code)]
pub fn die_with_parent(cmd: &mut tokio::process::Command, signal: Signal) {
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe work is allowed: it makes two system calls (prctl, getppid) and
    // builds an io::Error from an errno, which neither allocates nor takes a lock.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(signal))?;
            // The parent may have died between fork and prctl: then nothing would
            // signal us later, so do not start at all.
            if rustix::process::getppid() != Some(parent) {
                return Err(rustix::io::Errno::SRCH.into());
            }
            Ok(())
        });
    }
}

/// The last `lines` lines of a log file, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(err) => format!("(could not read {}: {err})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_made_up_one_is_not() {
        assert!(alive(std::process::id()));
        assert!(!alive(u32::MAX - 1));
    }

    #[test]
    fn root_exists_in_passwd() -> anyhow::Result<()> {
        assert_eq!(user_ids("root")?, (0, 0));
        assert!(user_ids("no-such-user-here").is_err());
        Ok(())
    }
}
