//! WatchTasks clients through a storm, and the checks of what each one saw.
//!
//! Each watcher holds one stream with its filter on some replica and records every
//! message. When the stream fails (a replica killed or drained, its store link cut) it
//! resumes from the last token it received, on the next replica, as a client should,
//! and marks the resume in its history. Its *view* is what a client builds from the
//! messages: a task shown at a version, dropped on `left`.
//!
//! After the storm, with every task ended, each history is held to the stream's
//! promises (docs/api.md, WatchTasks):
//! - ordered, never twice: between two resumes, each task's versions strictly rise;
//! - none missing, terminal delivered: the view converges to what the store says the
//!   filter matches, each task at its final version;
//! - resumable: a stream opened from the last token is accepted and leaves the view as
//!   it is (it may repeat what the token trails, never change it).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt as _;
use taskpod_proto::v1::{self, task_service_client::TaskServiceClient, watch_tasks_response::Kind};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use uuid::Uuid;

use super::check::Violation;

/// Which tasks a watcher follows: its filter, and the same predicate over a stored
/// task's kind and status, for the oracle.
#[derive(Clone, Copy, Debug)]
pub struct WatchSpec {
    pub name: &'static str,
    pub filter: &'static str,
    pub matches: fn(kind: &str, status: &str) -> bool,
}

/// The storm's watchers: everything, one kind, and a filter every task leaves.
pub const STORM_WATCHERS: [WatchSpec; 3] = [
    WatchSpec {
        name: "all",
        filter: "",
        matches: |_, _| true,
    },
    WatchSpec {
        name: "exec",
        filter: r#"kind = "exec""#,
        matches: |kind, _| kind == "exec",
    },
    WatchSpec {
        name: "active",
        filter: "status = active",
        matches: |_, status| status == "active",
    },
];

/// One entry of a watcher's history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    Task {
        id: String,
        version: i64,
    },
    Left {
        id: String,
    },
    /// The stream failed with this status and the watcher resumed on `replica`.
    Resumed {
        replica: usize,
        why: String,
    },
}

#[derive(Debug, Default)]
struct Log {
    seen: Vec<Seen>,
    token: String,
    /// Refusals a client cannot recover from by resuming (an expired token).
    fatal: Vec<String>,
}

/// One watcher's history so far.
#[derive(Clone, Debug)]
pub struct History {
    pub spec: WatchSpec,
    pub seen: Vec<Seen>,
    pub token: String,
    pub fatal: Vec<String>,
}

impl History {
    pub fn resumes(&self) -> usize {
        self.seen
            .iter()
            .filter(|s| matches!(s, Seen::Resumed { .. }))
            .count()
    }

    /// The client's view: each shown task at the version last shown, minus those that
    /// left.
    pub fn view(&self) -> BTreeMap<String, i64> {
        let mut view = BTreeMap::new();
        for s in &self.seen {
            match s {
                Seen::Task { id, version } => {
                    view.insert(id.clone(), *version);
                }
                Seen::Left { id } => {
                    view.remove(id);
                }
                Seen::Resumed { .. } => {}
            }
        }
        view
    }
}

/// The running watchers.
#[derive(Debug)]
pub struct Watchers {
    logs: Vec<(WatchSpec, Arc<Mutex<Log>>)>,
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl Watchers {
    /// Opens one stream per spec, spread over `replicas`.
    pub fn start(specs: &[WatchSpec], replicas: Vec<TaskServiceClient<Channel>>) -> Self {
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let mut logs = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let log = Arc::new(Mutex::new(Log::default()));
            logs.push((*spec, Arc::clone(&log)));
            tasks.spawn(follow(
                *spec,
                replicas.clone(),
                i % replicas.len().max(1),
                log,
                stop.clone(),
            ));
        }
        Self { logs, stop, tasks }
    }

    /// Every watcher's history as of now.
    pub fn histories(&self) -> Vec<History> {
        self.logs
            .iter()
            .map(|(spec, log)| {
                let log = log.lock().unwrap_or_else(PoisonError::into_inner);
                History {
                    spec: *spec,
                    seen: log.seen.clone(),
                    token: log.token.clone(),
                    fatal: log.fatal.clone(),
                }
            })
            .collect()
    }

    /// Waits until every view equals `expected` (by watcher), at most `timeout`.
    pub async fn converge(&self, expected: &[BTreeMap<String, i64>], timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            let done = self
                .histories()
                .iter()
                .zip(expected)
                .all(|(h, want)| h.view() == *want);
            if done {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn stop(mut self) -> Vec<History> {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        self.histories()
    }
}

async fn follow(
    spec: WatchSpec,
    replicas: Vec<TaskServiceClient<Channel>>,
    mut replica: usize,
    log: Arc<Mutex<Log>>,
    stop: CancellationToken,
) {
    let record = |entry: Seen, token: &str| {
        let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
        log.seen.push(entry);
        if !token.is_empty() {
            token.clone_into(&mut log.token);
        }
    };
    loop {
        let token = log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .token
            .clone();
        let mut client = replicas[replica].clone();
        let request = v1::WatchTasksRequest {
            filter: spec.filter.into(),
            resume_token: token,
            ..Default::default()
        };
        let why = tokio::select! {
            () = stop.cancelled() => return,
            why = async {
                let mut stream = match client.watch_tasks(request).await {
                    Ok(s) => s.into_inner(),
                    Err(status) => return status,
                };
                loop {
                    match stream.next().await {
                        Some(Ok(m)) => match m.kind {
                            Some(Kind::Task(t)) => record(
                                Seen::Task { id: t.task_id, version: t.version },
                                &m.resume_token,
                            ),
                            Some(Kind::Left(l)) => {
                                record(Seen::Left { id: l.task_id }, &m.resume_token);
                            }
                            _ => record_token(&log, &m.resume_token),
                        },
                        Some(Err(status)) => return status,
                        None => return tonic::Status::unavailable("the stream ended"),
                    }
                }
            } => why,
        };
        if why.code() == tonic::Code::FailedPrecondition {
            log.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .fatal
                .push(format!("{}: {}", why.code(), why.message()));
            return;
        }
        replica = (replica + 1) % replicas.len().max(1);
        record(
            Seen::Resumed {
                replica,
                why: format!("{:?}: {}", why.code(), why.message()),
            },
            "",
        );
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

fn record_token(log: &Mutex<Log>, token: &str) {
    if !token.is_empty() {
        token.clone_into(&mut log.lock().unwrap_or_else(PoisonError::into_inner).token);
    }
}

/// What the store says each watcher should end up showing: every task its predicate
/// matches, at its final version.
///
/// # Errors
/// When Postgres refuses.
pub async fn expected_views(
    pool: &sqlx::PgPool,
    specs: &[WatchSpec],
) -> anyhow::Result<Vec<BTreeMap<String, i64>>> {
    let rows: Vec<(Uuid, i64, String, String)> = sqlx::query_as(
        "SELECT t.task_id, h.version, t.kind, h.status FROM tasks t \
             JOIN task_heads h ON h.task_id = t.task_id",
    )
    .fetch_all(pool)
    .await?;
    Ok(specs
        .iter()
        .map(|spec| {
            rows.iter()
                .filter(|(_, _, kind, status)| (spec.matches)(kind, status))
                .map(|(id, version, _, _)| (id.to_string(), *version))
                .collect()
        })
        .collect())
}

/// The violations of one watcher's history against the view the store expects.
pub fn check(history: &History, expected: &BTreeMap<String, i64>) -> Vec<Violation> {
    let name = history.spec.name;
    let mut out = Vec::new();
    for fatal in &history.fatal {
        out.push(Violation::new(
            "watch-resumable",
            None,
            format!("watcher {name} was refused a resume: {fatal}"),
        ));
    }
    // Between two resumes, each task's versions strictly rise.
    let mut last: BTreeMap<&str, i64> = BTreeMap::new();
    for (i, s) in history.seen.iter().enumerate() {
        match s {
            Seen::Task { id, version } => {
                if let Some(before) = last.insert(id.as_str(), *version)
                    && before >= *version
                {
                    out.push(
                        Violation::new(
                            "watch-ordered",
                            Some(id.clone()),
                            format!(
                                "watcher {name} got version {version} after {before} without a resume"
                            ),
                        )
                        .with(context(&history.seen, i)),
                    );
                }
            }
            Seen::Left { .. } => {}
            Seen::Resumed { .. } => last.clear(),
        }
    }
    let view = history.view();
    let mut missing = Vec::new();
    let mut wrong = Vec::new();
    for (id, version) in expected {
        match view.get(id) {
            None => missing.push(format!("{id} (final version {version}) never shown")),
            Some(v) if v != version => {
                wrong.push(format!(
                    "{id} shown at version {v}, final version {version}"
                ));
            }
            Some(_) => {}
        }
    }
    let extra: Vec<String> = view
        .iter()
        .filter(|(id, _)| !expected.contains_key(*id))
        .map(|(id, v)| format!("{id} still shown at version {v}: the filter no longer matches"))
        .collect();
    for (what, list) in [
        ("tasks never shown", missing),
        ("tasks not shown at their final version", wrong),
        ("tasks that left without a `left`", extra),
    ] {
        if !list.is_empty() {
            out.push(
                Violation::new(
                    "watch-complete",
                    None,
                    format!("watcher {name}: {} {what}", list.len()),
                )
                .with(list.into_iter().take(10)),
            );
        }
    }
    out
}

/// The entries around the `i`th, for evidence.
fn context(seen: &[Seen], i: usize) -> Vec<String> {
    seen[i.saturating_sub(3)..(i + 2).min(seen.len())]
        .iter()
        .map(|s| format!("{s:?}"))
        .collect()
}

/// Resumes each watcher once more from its last token, reads until the first
/// heartbeat, and checks the view stays as it was: the token is accepted and what
/// follows it repeats, never changes, what the client holds.
pub async fn check_resume(
    history: &History,
    client: &mut TaskServiceClient<Channel>,
    timeout: Duration,
) -> Vec<Violation> {
    let name = history.spec.name;
    let fail = |summary: String| vec![Violation::new("watch-resumable", None, summary)];
    let request = v1::WatchTasksRequest {
        filter: history.spec.filter.into(),
        resume_token: history.token.clone(),
        ..Default::default()
    };
    let mut stream = match client.watch_tasks(request).await {
        Ok(s) => s.into_inner(),
        Err(status) => return fail(format!("watcher {name}: resume refused: {status}")),
    };
    let mut after = history.clone();
    let read = tokio::time::timeout(timeout, async {
        while let Some(m) = stream.next().await {
            match m.map(|m| m.kind) {
                Ok(Some(Kind::Task(t))) => after.seen.push(Seen::Task {
                    id: t.task_id,
                    version: t.version,
                }),
                Ok(Some(Kind::Left(l))) => after.seen.push(Seen::Left { id: l.task_id }),
                Ok(Some(Kind::Heartbeat(_))) => return Ok(()),
                Ok(_) => {}
                Err(status) => return Err(status),
            }
        }
        Err(tonic::Status::unavailable("the stream ended"))
    })
    .await;
    match read {
        Err(_) => fail(format!(
            "watcher {name}: no heartbeat within {timeout:?} of a resume"
        )),
        Ok(Err(status)) => fail(format!(
            "watcher {name}: the resumed stream failed: {status}"
        )),
        Ok(Ok(())) if after.view() != history.view() => fail(format!(
            "watcher {name}: resuming from the last token changed the view ({} entries after it)",
            after.seen.len() - history.seen.len()
        )),
        Ok(Ok(())) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, version: i64) -> Seen {
        Seen::Task {
            id: id.into(),
            version,
        }
    }

    fn history(seen: Vec<Seen>) -> History {
        History {
            spec: STORM_WATCHERS[0],
            seen,
            token: String::new(),
            fatal: Vec::new(),
        }
    }

    fn expect(pairs: &[(&str, i64)]) -> BTreeMap<String, i64> {
        pairs.iter().map(|(id, v)| ((*id).to_owned(), *v)).collect()
    }

    fn invariants(v: &[Violation]) -> Vec<&'static str> {
        v.iter().map(|v| v.invariant).collect()
    }

    #[test]
    fn a_clean_history_passes_and_a_resume_may_repeat() {
        let resumed = Seen::Resumed {
            replica: 1,
            why: "Unavailable".into(),
        };
        let h = history(vec![
            task("a", 1),
            task("a", 3),
            resumed,
            task("a", 3),
            task("b", 2),
        ]);
        assert!(check(&h, &expect(&[("a", 3), ("b", 2)])).is_empty());
    }

    #[test]
    fn a_repeat_without_a_resume_is_caught() {
        let h = history(vec![task("a", 2), task("a", 2)]);
        assert_eq!(
            invariants(&check(&h, &expect(&[("a", 2)]))),
            ["watch-ordered"]
        );
    }

    #[test]
    fn missing_stale_and_unleft_tasks_are_caught() {
        let h = history(vec![task("a", 2), task("c", 1)]);
        let found = check(&h, &expect(&[("a", 3), ("b", 1)]));
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found.iter().all(|v| v.invariant == "watch-complete"));
        let left = history(vec![task("c", 1), Seen::Left { id: "c".into() }]);
        assert!(check(&left, &BTreeMap::new()).is_empty());
    }
}
