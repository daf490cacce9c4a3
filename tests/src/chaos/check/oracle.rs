//! What the store holds after a run, read once from Postgres: the oracle every
//! invariant is checked against. Only the columns the checks need.

use std::collections::BTreeMap;

use sqlx::PgPool;
use uuid::Uuid;

use crate::chaos::load::REQUEST_ID_KEY;

/// A `tasks` row (the listing row).
#[derive(Clone, Debug)]
pub struct TaskRow {
    pub task_id: Uuid,
    pub kind: String,
    pub status: String,
    pub phase: String,
    pub last_error: Option<String>,
    /// The request id that created it (from its metadata).
    pub request_id: Option<String>,
    /// `metadata.restart`, when the task tightens the workers' budget.
    pub max_restart_attempts: Option<u32>,
    pub restart_window_seconds: Option<u64>,
    pub program: Option<String>,
}

/// A `task_heads` row.
#[derive(Clone, Debug)]
pub struct HeadRow {
    pub version: i64,
    pub status: String,
    pub phase: String,
    pub last_error: Option<String>,
    pub pod_state: String,
    pub pod_epoch: i64,
    pub owner_node: Option<Uuid>,
}

/// An `events` row.
#[derive(Clone, Debug)]
pub struct EventRow {
    pub version: i64,
    pub kind: String,
    pub data: serde_json::Value,
    /// `metadata.epoch`: the pod epoch the writer acted under.
    pub epoch: Option<i64>,
    /// The writing transaction (`tx_id`).
    pub tx: u64,
    /// `metadata.actor_id`: who wrote it (`worker:<node>` for pods and workers).
    pub actor: String,
    pub recorded_ms: i64,
}

impl EventRow {
    /// `data.epoch`, for the pod lifecycle events.
    pub fn data_epoch(&self) -> Option<i64> {
        self.data.get("epoch").and_then(serde_json::Value::as_i64)
    }

    /// The node in `data.node` (pod_started).
    pub fn data_node(&self) -> Option<Uuid> {
        self.data
            .get("node")
            .and_then(serde_json::Value::as_str)
            .and_then(|n| Uuid::parse_str(n).ok())
    }
}

/// A `pod_crashes` row.
#[derive(Clone, Debug)]
pub struct CrashRow {
    pub epoch: i64,
    pub kind: String,
    pub reason: String,
    pub node: Option<Uuid>,
    pub at_ms: i64,
}

/// A unix time in milliseconds as a UTC time of day, `01:20:27.335`: how evidence
/// rows, fault times and the servers' logs are lined up.
pub fn clock(unix_ms: i64) -> String {
    let ms = unix_ms.rem_euclid(86_400_000);
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1_000 % 60,
        ms % 1_000
    )
}

/// Everything, by task.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub tasks: BTreeMap<Uuid, TaskRow>,
    pub heads: BTreeMap<Uuid, HeadRow>,
    /// In version order.
    pub events: BTreeMap<Uuid, Vec<EventRow>>,
    pub crashes: BTreeMap<Uuid, Vec<CrashRow>>,
    /// Worker incarnations (`nodes.node_id`) by the name a test knows them by, e.g.
    /// `w2#3` for w2's third incarnation; filled in by whoever watched `nodes`.
    pub node_names: BTreeMap<Uuid, String>,
}

type TaskTuple = (
    Uuid,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<String>,
);

type HeadTuple = (
    Uuid,
    i64,
    String,
    String,
    Option<String>,
    String,
    i64,
    Option<Uuid>,
);
type EventTuple = (
    Uuid,
    i64,
    String,
    serde_json::Value,
    Option<i64>,
    String,
    i64,
    String,
);

impl Snapshot {
    /// Reads the whole store.
    ///
    /// # Errors
    /// When Postgres cannot be queried.
    pub async fn load(pool: &PgPool) -> anyhow::Result<Self> {
        let mut snapshot = Self::default();
        let tasks: Vec<TaskTuple> = sqlx::query_as(
            "SELECT task_id, kind, status, phase, last_error, metadata->>$1, \
                    (metadata->'restart'->>'max_restart_attempts')::bigint, \
                    (metadata->'restart'->>'restart_window_seconds')::bigint, \
                    payload->>'program' \
             FROM tasks",
        )
        .bind(REQUEST_ID_KEY)
        .fetch_all(pool)
        .await?;
        for (task_id, kind, status, phase, last_error, request_id, attempts, window, program) in
            tasks
        {
            snapshot.tasks.insert(
                task_id,
                TaskRow {
                    task_id,
                    kind,
                    status,
                    phase,
                    last_error,
                    request_id,
                    max_restart_attempts: attempts.and_then(|n| u32::try_from(n).ok()),
                    restart_window_seconds: window.and_then(|n| u64::try_from(n).ok()),
                    program,
                },
            );
        }
        let heads: Vec<HeadTuple> = sqlx::query_as(
            "SELECT task_id, version, status, phase, last_error, pod_state, pod_epoch, owner_node \
                 FROM task_heads",
        )
        .fetch_all(pool)
        .await?;
        for (task_id, version, status, phase, last_error, pod_state, pod_epoch, owner_node) in heads
        {
            snapshot.heads.insert(
                task_id,
                HeadRow {
                    version,
                    status,
                    phase,
                    last_error,
                    pod_state,
                    pod_epoch,
                    owner_node,
                },
            );
        }
        let events: Vec<EventTuple> = sqlx::query_as(
            "SELECT stream_id, version, type, data, (metadata->>'epoch')::bigint, tx_id::text, \
                        (extract(epoch FROM recorded_at) * 1000)::bigint, \
                        COALESCE(metadata->>'actor_id', '') \
                 FROM events ORDER BY stream_id, version",
        )
        .fetch_all(pool)
        .await?;
        for (stream, version, kind, data, epoch, tx, recorded_ms, actor) in events {
            snapshot.events.entry(stream).or_default().push(EventRow {
                version,
                kind,
                data,
                epoch,
                tx: tx.parse().unwrap_or_default(),
                actor,
                recorded_ms,
            });
        }
        let crashes: Vec<(Uuid, i64, String, String, Option<Uuid>, i64)> = sqlx::query_as(
            "SELECT task_id, epoch, kind, reason, node, (extract(epoch FROM at) * 1000)::bigint \
             FROM pod_crashes ORDER BY task_id, at, epoch",
        )
        .fetch_all(pool)
        .await?;
        for (task, epoch, kind, reason, node, at_ms) in crashes {
            snapshot.crashes.entry(task).or_default().push(CrashRow {
                epoch,
                kind,
                reason,
                node,
                at_ms,
            });
        }
        let nodes: Vec<(Uuid, String)> = sqlx::query_as("SELECT node_id, name FROM nodes")
            .fetch_all(pool)
            .await?;
        for (id, name) in nodes {
            snapshot.node_names.entry(id).or_insert(name);
        }
        Ok(snapshot)
    }

    /// A node id with its name when known: `01a2... (w2#3)`.
    pub fn node(&self, node: Option<Uuid>) -> String {
        match node {
            None => "-".to_owned(),
            Some(id) => match self.node_names.get(&id) {
                Some(name) => format!("{id} ({name})"),
                None => id.to_string(),
            },
        }
    }

    /// One event as a line of evidence.
    pub fn event_line(&self, e: &EventRow) -> String {
        let mut line = format!(
            "v{} {} epoch={} tx={} at={} data={}",
            e.version,
            e.kind,
            e.epoch.map_or_else(|| "-".to_owned(), |x| x.to_string()),
            e.tx,
            clock(e.recorded_ms),
            e.data
        );
        if let Some(node) = e.data_node().and_then(|n| self.node_names.get(&n)) {
            line.push_str(&format!(" [node {node}]"));
        }
        line
    }

    /// One crash row as a line of evidence.
    pub fn crash_line(&self, c: &CrashRow) -> String {
        format!(
            "crash row epoch={} kind={} node={} at={} reason={:?}",
            c.epoch,
            c.kind,
            self.node(c.node),
            clock(c.at_ms),
            c.reason
        )
    }

    pub fn events_of(&self, task: &Uuid) -> &[EventRow] {
        self.events.get(task).map_or(&[], Vec::as_slice)
    }

    pub fn crashes_of(&self, task: &Uuid) -> &[CrashRow] {
        self.crashes.get(task).map_or(&[], Vec::as_slice)
    }

    /// The last `n` events of a task, as evidence lines.
    pub fn tail(&self, task: &Uuid, n: usize) -> Vec<String> {
        let events = self.events_of(task);
        events[events.len().saturating_sub(n)..]
            .iter()
            .map(|e| format!("  {}", self.event_line(e)))
            .collect()
    }

    /// The head and the listing row of a task, as evidence lines.
    pub fn rows(&self, task: &Uuid) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(t) = self.tasks.get(task) {
            out.push(format!(
                "  tasks: kind={} program={:?} status={} phase={} last_error={:?}",
                t.kind, t.program, t.status, t.phase, t.last_error
            ));
        }
        if let Some(h) = self.heads.get(task) {
            out.push(format!(
                "  task_heads: version={} status={} phase={} pod_state={} pod_epoch={} owner={} last_error={:?}",
                h.version,
                h.status,
                h.phase,
                h.pod_state,
                h.pod_epoch,
                self.node(h.owner_node),
                h.last_error
            ));
        }
        out
    }
}
