//! Finding a worker's dedicated lock session among Postgres's backends, so a test can
//! `pg_terminate_backend` it (what a failover, an admin or `idle_session_timeout` does
//! to a node's locks).
//!
//! Two ways, tried in order:
//! 1. **By the node's liveness lock.** A worker registers a `nodes` row (`name` is its
//!    `TASKPOD_NAME`, one row per incarnation) and holds the advisory lock
//!    `(NODE_NAMESPACE, nodes.lock_key)` on its lock session for as long as it lives.
//!    `pg_locks` shows a two-int advisory key as `classid` = first key, `objid` = second
//!    key, `objsubid` = 2; the `pid` holding it granted is the session. The newest
//!    incarnation wins, since a self-fenced worker registers a new one without a
//!    restart.
//! 2. **By application name and the worker's own sockets**, for a worker that holds no
//!    node key (an older or rebuilt worker): the sessions named `taskpod-worker-locks`
//!    whose client port is a TCP socket of the worker's OS process (its fds, read from
//!    `/proc/<pid>/fd`, matched to `/proc/<pid>/net/tcp`). This cannot see through a
//!    proxy (the client port is then the proxy's).
//!
//! Reading `pg_locks` copies the lock manager, so this is for tests only, never a loop.

use std::collections::HashSet;

use sqlx::PgPool;

/// The worker's namespace for node liveness keys ("tp" + 2), as in
/// `crates/worker/src/lock.rs`.
pub const NODE_NAMESPACE: i64 = 0x7470_0002;
/// The lock session's `application_name`, as the worker sets it.
pub const LOCK_APPLICATION_NAME: &str = "taskpod-worker-locks";

/// The backend pid of `worker_name`'s lock session, if it has one now.
///
/// # Errors
/// When Postgres cannot be queried.
pub async fn find(
    pool: &PgPool,
    worker_name: &str,
    worker_pid: Option<u32>,
) -> anyhow::Result<Option<i32>> {
    if let Some(pid) = by_node_lock(pool, worker_name).await? {
        return Ok(Some(pid));
    }
    match worker_pid {
        Some(os_pid) => by_sockets(pool, os_pid).await,
        None => Ok(None),
    }
}

async fn by_node_lock(pool: &PgPool, worker_name: &str) -> anyhow::Result<Option<i32>> {
    let pid: Option<i32> = sqlx::query_scalar(
        "SELECT l.pid FROM nodes n \
         JOIN pg_locks l ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
              AND l.classid::bigint = $2 AND l.objid::bigint = n.lock_key::bigint \
         WHERE n.name = $1 \
         ORDER BY n.started_at DESC LIMIT 1",
    )
    .bind(worker_name)
    .bind(NODE_NAMESPACE)
    .fetch_optional(pool)
    .await?;
    Ok(pid)
}

async fn by_sockets(pool: &PgPool, os_pid: u32) -> anyhow::Result<Option<i32>> {
    let ports: Vec<i32> = local_tcp_ports(os_pid).into_iter().map(i32::from).collect();
    if ports.is_empty() {
        return Ok(None);
    }
    let pid: Option<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND client_port = ANY($2) \
         ORDER BY backend_start DESC LIMIT 1",
    )
    .bind(LOCK_APPLICATION_NAME)
    .bind(&ports)
    .fetch_optional(pool)
    .await?;
    Ok(pid)
}

/// The local ports of the TCP sockets process `pid` has open.
fn local_tcp_ports(pid: u32) -> Vec<u16> {
    let inodes: HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.filter_map(Result::ok)
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .filter_map(|target| {
                    target
                        .to_str()?
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .parse()
                        .ok()
                })
                .collect()
        })
        .unwrap_or_default();
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).ok())
        .flat_map(|text| parse_tcp_table(&text))
        .filter(|(_, inode)| inodes.contains(inode))
        .map(|(port, _)| port)
        .collect()
}

/// `(local port, inode)` of each row of a `/proc/net/tcp` table.
fn parse_tcp_table(text: &str) -> Vec<(u16, u64)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = fields.get(1)?;
            let port = u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?;
            let inode = fields.get(9)?.parse().ok()?;
            Some((port, inode))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proc_tcp_table_gives_ports_and_inodes() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1538 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 123456 1 0000000000000000 20 4 30 10 -1\n";
        assert_eq!(parse_tcp_table(text), [(0x1538, 123_456)]);
    }

    #[test]
    fn this_process_sees_its_own_listening_port() -> anyhow::Result<()> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        assert!(local_tcp_ports(std::process::id()).contains(&port));
        Ok(())
    }
}
