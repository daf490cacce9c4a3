//! The checker against hand-made stores: a clean task passes every invariant, and each
//! kind of corruption is reported under its own name. A check that cannot fail proves
//! nothing, so each one is made to fail here at least once.

use std::time::Duration;

use uuid::Uuid;

use super::oracle::{CrashRow, EventRow, HeadRow, Snapshot, TaskRow};
use super::{Budget, Input, check};
use crate::chaos::history::{Call, History, Intent, Outcome};
use crate::chaos::overlap::LogLine;

/// One task's store rows, built event by event.
struct TaskFixture {
    id: Uuid,
    task: TaskRow,
    head: HeadRow,
    events: Vec<EventRow>,
    crashes: Vec<CrashRow>,
}

impl TaskFixture {
    /// A sleep task created by request `rid`, run by one pod to completion.
    fn completed(rid: &str) -> Self {
        let mut f = Self::created(rid);
        f.event(
            "pod_started",
            serde_json::json!({"epoch": 1, "node": Uuid::nil()}),
            Some(1),
        );
        f.event(
            "phase_changed",
            serde_json::json!({"from": "spec_clarification", "to": "planning"}),
            Some(1),
        );
        f.event(
            "task_completed",
            serde_json::json!({"from_phase": "planning"}),
            Some(1),
        );
        f.event(
            "pod_stopped",
            serde_json::json!({"epoch": 1, "reason": "completed"}),
            Some(1),
        );
        f.finish("completed", 1);
        f
    }

    fn created(rid: &str) -> Self {
        let id = Uuid::now_v7();
        let mut f = Self {
            id,
            task: TaskRow {
                task_id: id,
                kind: "sleep".into(),
                status: "active".into(),
                phase: "spec_clarification".into(),
                last_error: None,
                request_id: Some(rid.into()),
                max_restart_attempts: None,
                restart_window_seconds: None,
                program: None,
            },
            head: HeadRow {
                version: 0,
                status: "active".into(),
                phase: "spec_clarification".into(),
                last_error: None,
                pod_state: "none".into(),
                pod_epoch: 0,
                owner_node: None,
            },
            events: Vec::new(),
            crashes: Vec::new(),
        };
        f.event("task_created", serde_json::json!({}), None);
        f.event("pod_requested", serde_json::json!({}), None);
        f
    }

    /// Appends an event in its own transaction.
    fn event(&mut self, kind: &str, data: serde_json::Value, epoch: Option<i64>) -> &mut Self {
        let version = self.events.len() as i64 + 1;
        self.events.push(EventRow {
            version,
            kind: kind.into(),
            data,
            epoch,
            tx: 100 + version as u64,
            actor: "tester".into(),
            recorded_ms: 1_000 * version,
        });
        self.head.version = version;
        self
    }

    /// Puts the last event in the previous one's transaction.
    fn same_tx_as_previous(&mut self) -> &mut Self {
        let n = self.events.len();
        if n >= 2 {
            self.events[n - 1].tx = self.events[n - 2].tx;
        }
        self
    }

    fn crash(&mut self, epoch: i64, kind: &str, at_ms: i64) -> &mut Self {
        self.event(
            "pod_crashed",
            serde_json::json!({"epoch": epoch, "kind": kind, "reason": "boom"}),
            Some(epoch),
        );
        self.crashes.push(CrashRow {
            epoch,
            kind: kind.into(),
            reason: "boom".into(),
            node: None,
            at_ms,
        });
        self
    }

    fn finish(&mut self, status: &str, epoch: i64) -> &mut Self {
        for (s, p) in [
            (&mut self.task.status, &mut self.task.phase),
            (&mut self.head.status, &mut self.head.phase),
        ] {
            *s = status.into();
            *p = if ["completed", "cancelled", "failed"].contains(&status) {
                status.into()
            } else {
                "planning".into()
            };
        }
        self.head.pod_epoch = epoch;
        self
    }
}

fn snapshot(fixtures: Vec<TaskFixture>) -> Snapshot {
    let mut s = Snapshot::default();
    for f in fixtures {
        s.tasks.insert(f.id, f.task);
        s.heads.insert(f.id, f.head);
        s.events.insert(f.id, f.events);
        if !f.crashes.is_empty() {
            s.crashes.insert(f.id, f.crashes);
        }
    }
    s
}

fn acked_create(history: &History, rid: &str, task: Uuid) {
    let id = history.invoke(
        0,
        "api1",
        Call::Create {
            request_id: rid.into(),
            what: "sleep".into(),
        },
    );
    history.complete(
        id,
        Outcome::Ok {
            task_id: task.to_string(),
            status: None,
        },
    );
}

fn budget() -> Budget {
    Budget {
        max_restart_attempts: 3,
        restart_window: Duration::from_secs(3_600),
        max_node_losses: 2,
    }
}

/// The invariants broken, sorted, with duplicates.
fn broken(snapshot: &Snapshot, intents: &[Intent], exec: &[LogLine]) -> Vec<&'static str> {
    broken_with_outages(snapshot, intents, exec, &[])
}

fn broken_with_outages(
    snapshot: &Snapshot,
    intents: &[Intent],
    exec: &[LogLine],
    store_outages: &[(i64, i64)],
) -> Vec<&'static str> {
    let budget = budget();
    let report = check(&Input {
        snapshot,
        intents,
        exec_lines: exec,
        budget: &budget,
        settle_timeout: Duration::from_secs(120),
        store_outages,
        exec_overlap_bound: crate::chaos::overlap::EXEC_OVERLAP_BOUND,
    });
    let mut names: Vec<&'static str> = report.violations.iter().map(|v| v.invariant).collect();
    names.sort_unstable();
    names
}

#[test]
fn a_clean_run_breaks_nothing() {
    let history = History::new();
    let a = TaskFixture::completed("r1");
    acked_create(&history, "r1", a.id);
    let mut b = TaskFixture::created("r2");
    b.event("pod_started", serde_json::json!({"epoch": 1}), Some(1))
        .crash(1, "node_lost", 5_000)
        .event("pod_started", serde_json::json!({"epoch": 2}), Some(2))
        .crash(2, "handler", 6_000)
        .event(
            "task_failed",
            serde_json::json!({"error": "restart budget spent"}),
            Some(2),
        )
        .same_tx_as_previous()
        .finish("failed", 2);
    b.task.max_restart_attempts = Some(0);
    b.task.last_error = Some("restart budget spent: 1 handler crashes within 3600s".into());
    b.head.last_error = b.task.last_error.clone();
    acked_create(&history, "r2", b.id);
    let s = snapshot(vec![a, b]);
    assert_eq!(broken(&s, &history.intents(), &[]), Vec::<&str>::new());
}

#[test]
fn client_acknowledgements_are_held_to_the_store() {
    let history = History::new();
    // Acknowledged, never stored.
    acked_create(&history, "lost", Uuid::now_v7());
    // One request id, two tasks.
    let a = TaskFixture::completed("twice");
    let b = TaskFixture::completed("twice");
    acked_create(&history, "twice", a.id);
    // A task nobody asked for.
    let c = TaskFixture::completed("never-sent");
    // An acknowledged cancel of a task that completed anyway.
    let d = TaskFixture::completed("d");
    acked_create(&history, "d", d.id);
    let id = history.invoke(
        0,
        "api1",
        Call::Cancel {
            request_id: "d-cancel".into(),
            task_id: d.id.to_string(),
        },
    );
    history.complete(
        id,
        Outcome::Ok {
            task_id: d.id.to_string(),
            status: Some("TASK_STATUS_CANCELLED".into()),
        },
    );
    let s = snapshot(vec![a, b, c, d]);
    assert_eq!(
        broken(&s, &history.intents(), &[]),
        [
            "acked-cancel-holds",
            "acked-create-exists",
            "one-task-per-request",
            "task-without-request",
        ]
    );
}

#[test]
fn streams_heads_and_rows_must_agree() {
    let history = History::new();
    let mut gap = TaskFixture::completed("gap");
    gap.events.remove(2);
    let mut head = TaskFixture::completed("head");
    head.head.version = 3;
    let mut row = TaskFixture::completed("row");
    row.task.status = "active".into();
    let mut twice = TaskFixture::completed("twice");
    twice.event("task_completed", serde_json::json!({}), Some(1));
    for f in [&gap, &head, &row, &twice] {
        acked_create(
            &history,
            f.task.request_id.as_deref().unwrap_or_default(),
            f.id,
        );
    }
    let s = snapshot(vec![gap, head, row, twice]);
    assert_eq!(
        broken(&s, &history.intents(), &[]),
        [
            "head-version",
            "row-agrees-with-head",
            "stream-agrees-with-head",
            "versions-contiguous",
        ]
    );
}

#[test]
fn writes_under_a_crashed_or_older_epoch_are_caught() {
    let history = History::new();
    // A zombie: the pod of epoch 1 appends after its node_lost was recorded.
    let mut zombie = TaskFixture::created("zombie");
    zombie
        .event("pod_started", serde_json::json!({"epoch": 1}), Some(1))
        .crash(1, "node_lost", 2_000)
        .event(
            "phase_changed",
            serde_json::json!({"from": "spec_clarification", "to": "planning"}),
            Some(1),
        )
        .event("task_completed", serde_json::json!({}), Some(1))
        .finish("completed", 1);
    // Epochs going back, and a crash row without its event.
    let mut back = TaskFixture::created("back");
    back.event("pod_started", serde_json::json!({"epoch": 2}), Some(2))
        .event("pod_started", serde_json::json!({"epoch": 1}), Some(1))
        .event("task_completed", serde_json::json!({}), Some(1))
        .finish("completed", 2);
    back.crashes.push(CrashRow {
        epoch: 7,
        kind: "handler".into(),
        reason: "?".into(),
        node: None,
        at_ms: 0,
    });
    for f in [&zombie, &back] {
        acked_create(
            &history,
            f.task.request_id.as_deref().unwrap_or_default(),
            f.id,
        );
    }
    let s = snapshot(vec![zombie, back]);
    assert_eq!(
        broken(&s, &history.intents(), &[]),
        [
            "crash-row-matches-event",
            // Started 2 then 1; and two writes under 1 after one under 2.
            "epochs-increase",
            "epochs-increase",
            "epochs-increase",
            "no-write-after-crash",
        ]
    );
}

#[test]
fn hangs_stale_pods_and_spent_budgets_are_caught() {
    let history = History::new();
    let mut hung = TaskFixture::created("hung");
    hung.event("pod_started", serde_json::json!({"epoch": 1}), Some(1));
    hung.head.pod_state = "running".into();
    hung.head.pod_epoch = 1;
    let mut stale = TaskFixture::completed("stale");
    stale.events.pop();
    stale.head.version -= 1;
    stale.head.pod_state = "stopping".into();
    // Budget 3 restarts: a 5th handler crash should never have happened.
    let mut spent = TaskFixture::created("spent");
    for epoch in 1..=5 {
        spent
            .event(
                "pod_started",
                serde_json::json!({"epoch": epoch}),
                Some(epoch),
            )
            .crash(epoch, "handler", epoch * 1_000);
    }
    spent
        .event("task_failed", serde_json::json!({}), Some(5))
        .same_tx_as_previous()
        .finish("failed", 5);
    // Failed for a spent budget after one crash.
    let mut early = TaskFixture::created("early");
    early
        .event("pod_started", serde_json::json!({"epoch": 1}), Some(1))
        .crash(1, "handler", 1_000)
        .event("task_failed", serde_json::json!({}), Some(1))
        .same_tx_as_previous()
        .finish("failed", 1);
    early.task.last_error = Some("restart budget spent: 1 handler crashes within 3600s".into());
    early.head.last_error = early.task.last_error.clone();
    for f in [&hung, &stale, &spent, &early] {
        acked_create(
            &history,
            f.task.request_id.as_deref().unwrap_or_default(),
            f.id,
        );
    }
    let s = snapshot(vec![hung, stale, spent, early]);
    assert_eq!(
        broken(&s, &history.intents(), &[]),
        [
            "budget-not-spent-early",
            "crash-budget",
            "terminal-in-time",
            "terminal-pod-state-none",
        ]
    );
}

#[test]
fn exec_runs_overlapping_past_the_bound_are_caught() {
    let history = History::new();
    let f = TaskFixture::completed("exec");
    acked_create(&history, "exec", f.id);
    let line = |epoch, at_ms| LogLine {
        task: f.id.to_string(),
        epoch,
        at_ms,
    };
    let mut lines: Vec<LogLine> = (0..100).map(|i| line(1, i * 100)).collect();
    lines.extend((30..150).map(|i| line(2, i * 100)));
    let s = snapshot(vec![f]);
    // Epochs 1 and 2 both ran from 3.0 s to 9.9 s.
    assert_eq!(
        broken(&s, &history.intents(), &lines),
        ["exec-overlap-bound"]
    );
    assert_eq!(
        broken(&s, &history.intents(), &lines[..60]),
        Vec::<&str>::new()
    );
}

#[test]
fn losses_charged_to_no_budget_need_a_store_outage() {
    let history = History::new();
    // Started at 3 s, lost as interrupted at 4 s.
    let mut f = TaskFixture::created("lost");
    f.event("pod_started", serde_json::json!({"epoch": 1}), Some(1))
        .crash(1, "interrupted", 4_000)
        .event("pod_started", serde_json::json!({"epoch": 2}), Some(2))
        .event("task_completed", serde_json::json!({}), Some(2))
        .event("pod_stopped", serde_json::json!({"epoch": 2}), Some(2))
        .finish("completed", 2);
    acked_create(&history, "lost", f.id);
    let s = snapshot(vec![f]);
    let intents = history.intents();
    // Postgres went down while the pod lived: fine.
    assert_eq!(
        broken_with_outages(&s, &intents, &[], &[(3_500, 3_900)]),
        Vec::<&str>::new()
    );
    // Postgres was down only long before: the loss was a node's, not everyone's.
    assert_eq!(
        broken_with_outages(&s, &intents, &[], &[(-60_000, -50_000)]),
        ["interrupted-only-by-outage"]
    );
}

#[test]
fn a_loss_its_own_node_recorded_is_charged_to_no_budget_without_an_outage() {
    let history = History::new();
    let node = uuid::Uuid::from_u128(7);
    let mut f = TaskFixture::created("own");
    f.event("pod_started", serde_json::json!({"epoch": 1}), Some(1))
        .crash(1, "interrupted", 4_000);
    // The draining node recorded its own cut-off pod.
    if let Some(e) = f.events.last_mut() {
        e.actor = format!("worker:{node}");
    }
    if let Some(c) = f.crashes.last_mut() {
        c.node = Some(node);
    }
    f.event("pod_started", serde_json::json!({"epoch": 2}), Some(2))
        .event("task_completed", serde_json::json!({}), Some(2))
        .event("pod_stopped", serde_json::json!({"epoch": 2}), Some(2))
        .finish("completed", 2);
    acked_create(&history, "own", f.id);
    let s = snapshot(vec![f]);
    assert_eq!(
        broken_with_outages(&s, &history.intents(), &[], &[]),
        Vec::<&str>::new()
    );
}
