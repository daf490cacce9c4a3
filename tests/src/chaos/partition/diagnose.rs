//! What to print when a bounded wait of a partition run fails: the server's sessions
//! as they stand at that moment, and the members' logs. A CI failure leaves nothing
//! but the test's output behind, so a stalled change feed (a transaction holding the
//! watermark) or a worker that never registered again must be explainable from it.

use std::fmt::Write as _;
use std::path::Path;

use sqlx::PgPool;

/// Sessions of the cluster's database, oldest transaction first, with the change
/// feed's watermark holders marked (a transaction id, `xid`).
pub async fn sessions(pool: &PgPool, when: &str) -> String {
    let rows: Result<Vec<SessionRow>, sqlx::Error> = sqlx::query_as(
        "SELECT pid, COALESCE(application_name, ''), COALESCE(host(client_addr), 'local'), \
                COALESCE(state, ''), backend_xid::text, \
                (extract(epoch FROM clock_timestamp() - xact_start) * 1000)::bigint, \
                (extract(epoch FROM clock_timestamp() - state_change) * 1000)::bigint, \
                COALESCE(wait_event_type || ':' || wait_event, ''), \
                left(regexp_replace(query, '\\s+', ' ', 'g'), 120) \
           FROM pg_stat_activity \
          WHERE datname = current_database() AND pid <> pg_backend_pid() \
          ORDER BY xact_start NULLS LAST, pid",
    )
    .fetch_all(pool)
    .await;
    let mut out = format!("sessions of the cluster's database {when}:\n");
    match rows {
        Ok(rows) => {
            for r in &rows {
                let _ = writeln!(out, "  {}", line(r));
            }
        }
        Err(e) => {
            let _ = writeln!(out, "  (could not read pg_stat_activity: {e})");
        }
    }
    out
}

type SessionRow = (
    i32,
    String,
    String,
    String,
    Option<String>,
    Option<i64>,
    Option<i64>,
    String,
    Option<String>,
);

/// `pid 12 taskpod from 10.213.0.2: idle in transaction for 9 ms, transaction 41 ms,
/// holds xid 801 | INSERT INTO nodes ...`
fn line(row: &SessionRow) -> String {
    let (pid, app, addr, state, xid, xact_ms, state_ms, wait, query) = row;
    format!(
        "pid {pid} {app} from {addr}: {state} for {} ms{}{}{} | {}",
        state_ms.unwrap_or(0),
        xact_ms.map_or(String::new(), |ms| format!(", transaction {ms} ms")),
        xid.as_deref()
            .map_or(String::new(), |x| format!(", holds xid {x}")),
        if wait.is_empty() {
            String::new()
        } else {
            format!(", waits on {wait}")
        },
        query.as_deref().unwrap_or("")
    )
}

/// The last `lines` lines of `name`'s log at INFO or above (its own choice of what
/// matters, without the DEBUG flood).
pub fn log_excerpt(name: &str, path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            [" INFO ", " WARN ", " ERROR "]
                .iter()
                .any(|k| l.contains(k))
        })
        .collect();
    let mut out = format!(
        "{name}'s log, last {} of {} lines at INFO or above:\n",
        lines.min(kept.len()),
        kept.len()
    );
    for line in &kept[kept.len().saturating_sub(lines)..] {
        let short: String = line.chars().take(400).collect();
        let _ = writeln!(out, "  {short}");
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use sqlx::Connection as _;

    use super::*;

    /// The dump names a transaction that holds an id (what freezes the change feed),
    /// with its age and statement.
    #[tokio::test]
    async fn the_session_dump_names_a_transaction_holding_an_xid() {
        let url = std::env::var("DATABASE_URL").expect("DATABASE_URL must point at a test server");
        let pool = PgPool::connect(&url).await.unwrap();
        let mut holder = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
        let xid: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
            .fetch_one(&mut holder)
            .await
            .unwrap();
        let dump = sessions(&pool, "now").await;
        assert!(
            dump.starts_with("sessions of the cluster's database now:"),
            "{dump}"
        );
        let line = dump
            .lines()
            .find(|l| l.contains(&format!("holds xid {xid}")))
            .unwrap_or_else(|| panic!("no line holds xid {xid}:\n{dump}"));
        assert!(line.contains("idle in transaction"), "{line}");
        assert!(line.contains("SELECT pg_current_xact_id()"), "{line}");
        sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    }

    #[test]
    fn the_log_excerpt_keeps_info_and_above_and_the_last_lines() {
        let dir = std::env::temp_dir().join(format!("diagnose-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("w3.log");
        let lines: Vec<String> = (0..10)
            .map(|i| {
                let level = if i % 2 == 0 { "DEBUG" } else { " WARN" };
                format!("2026-12-07T23:15:1{i}Z {level} line {i}")
            })
            .collect();
        std::fs::write(&log, lines.join("\n")).unwrap();
        let excerpt = log_excerpt("w3", &log, 2);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            excerpt,
            "w3's log, last 2 of 5 lines at INFO or above:\n  \
             2026-12-07T23:15:17Z  WARN line 7\n  2026-12-07T23:15:19Z  WARN line 9\n"
        );
    }
}
