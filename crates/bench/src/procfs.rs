//! What the bench reads about local processes from Linux's `/proc`: resident memory
//! (`VmRSS` of `/proc/<pid>/status`) and CPU time (`utime` + `stime` of
//! `/proc/<pid>/stat`). The parsers are pure, so they are tested on sample text.

use std::io;
use std::time::Duration;

/// `/proc/<pid>/stat` counts CPU time in clock ticks of `USER_HZ`, which the kernel
/// fixes at 100 for userspace on every architecture Linux supports today.
const USER_HZ: u64 = 100;

/// The resident set size in bytes, from the text of `/proc/<pid>/status`.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    let factor = match parts.next().unwrap_or("kB") {
        "B" => 1,
        "kB" => 1024,
        "mB" | "MB" => 1024 * 1024,
        _ => return None,
    };
    value.checked_mul(factor)
}

/// The fields of `/proc/<pid>/stat` after the command name, which is in parentheses
/// and may itself contain spaces and parentheses (hence the last `)`).
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let close = stat.rfind(')')?;
    Some(stat[close + 1..].split_whitespace().collect())
}

/// Parent pid and CPU time (user + system) from the text of `/proc/<pid>/stat`.
pub fn parse_stat(stat: &str) -> Option<(u32, Duration)> {
    // After the name: state(3) ppid(4) ... utime(14) stime(15), 1-based as in proc(5).
    let fields = stat_fields(stat)?;
    let ppid: u32 = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = utime.checked_add(stime)?;
    Some((ppid, Duration::from_millis(ticks * 1000 / USER_HZ)))
}

/// The resident memory of a running process, in bytes.
///
/// # Errors
/// When the process is gone or `/proc` cannot be read.
pub fn rss_bytes(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_vm_rss(&status).ok_or_else(|| io::Error::other(format!("no VmRSS in /proc/{pid}/status")))
}

/// The CPU time a process has used so far (its own, not its children's).
///
/// # Errors
/// When the process is gone or `/proc` cannot be read.
pub fn cpu_time(pid: u32) -> io::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&stat)
        .map(|(_, cpu)| cpu)
        .ok_or_else(|| io::Error::other(format!("/proc/{pid}/stat does not parse")))
}

/// The CPU time of a process and its direct children together: Postgres's postmaster
/// and its backends. Children that exit in between are simply not counted.
///
/// # Errors
/// When `/proc` cannot be listed or the process itself is gone.
pub fn cpu_time_with_children(pid: u32) -> io::Result<Duration> {
    let mut total = cpu_time(pid)?;
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        if let Some((ppid, cpu)) = parse_stat(&stat)
            && ppid == pid
        {
            total += cpu;
        }
    }
    Ok(total)
}

/// CPU used over a wall-clock stretch, as percent of one core.
pub fn core_percent(cpu: Duration, wall: Duration) -> f64 {
    if wall.is_zero() {
        0.0
    } else {
        cpu.as_secs_f64() / wall.as_secs_f64() * 100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\ttaskpod-worker\nUmask:\t0022\nState:\tS (sleeping)\n\
        VmPeak:\t  812344 kB\nVmRSS:\t   23456 kB\nRssAnon:\t   10000 kB\n";

    #[test]
    fn vm_rss_is_read_in_bytes() {
        assert_eq!(parse_vm_rss(STATUS), Some(23456 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\tlots kB\n"), None);
    }

    #[test]
    fn stat_is_read_past_a_name_with_spaces_and_parentheses() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt
        // cmajflt utime stime ...
        let stat = "4242 (taskpod (x) y) S 17 4242 4242 0 -1 4194560 1234 0 0 0 250 50 0 0 20 0 9";
        let (ppid, cpu) = parse_stat(stat).unwrap();
        assert_eq!(ppid, 17);
        assert_eq!(cpu, Duration::from_secs(3));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S"), None);
    }

    #[test]
    fn this_process_can_be_read() {
        let me = std::process::id();
        assert!(rss_bytes(me).unwrap() > 0);
        cpu_time(me).unwrap();
        cpu_time_with_children(me).unwrap();
    }

    #[test]
    fn core_percent_is_cpu_over_wall() {
        assert_eq!(
            core_percent(Duration::from_millis(50), Duration::from_secs(10)),
            0.5
        );
        assert_eq!(core_percent(Duration::from_secs(1), Duration::ZERO), 0.0);
    }
}
