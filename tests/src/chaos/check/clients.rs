//! What clients were told, held against the store:
//! - `acked-create-exists`: an acknowledged create's task exists and carries its
//!   request id;
//! - `acks-agree`: every `ok` for one request id names the same task (a retry gets
//!   the stored first answer);
//! - `one-task-per-request`: no request id made two tasks, however often it was sent;
//! - `refused-create-made-no-task`: a create refused on every attempt made nothing;
//! - `task-without-request`: every stored task comes from a request the clients sent;
//! - `acked-cancel-holds`: an acknowledged cancel leaves the task cancelled;
//! - `refused-cancel-agrees`: a cancel refused as ALREADY_COMPLETED / _FAILED /
//!   _CANCELLED finds the task ended that way.

use std::collections::{BTreeMap, BTreeSet};

use uuid::Uuid;

use super::{Input, Violation};
use crate::chaos::history::{Call, Intent, Resolution};

pub fn check(input: &Input<'_>) -> Vec<Violation> {
    let snapshot = input.snapshot;
    let mut out = Vec::new();
    let mut by_request: BTreeMap<&str, Vec<Uuid>> = BTreeMap::new();
    for task in snapshot.tasks.values() {
        if let Some(rid) = task.request_id.as_deref() {
            by_request.entry(rid).or_default().push(task.task_id);
        }
    }
    let mut sent: BTreeSet<&str> = BTreeSet::new();
    for intent in input.intents {
        match &intent.call {
            Call::Create { request_id, .. } => {
                sent.insert(request_id);
                let made = by_request
                    .get(request_id.as_str())
                    .cloned()
                    .unwrap_or_default();
                out.extend(check_create(input, intent, &made));
            }
            Call::Cancel { task_id, .. } => out.extend(check_cancel(input, intent, task_id)),
        }
    }
    for task in snapshot.tasks.values() {
        let known = task
            .request_id
            .as_deref()
            .is_some_and(|rid| sent.contains(rid));
        if !known {
            out.push(
                Violation::new(
                    "task-without-request",
                    Some(task.task_id.to_string()),
                    format!("no client sent request id {:?}", task.request_id),
                )
                .with(snapshot.rows(&task.task_id)),
            );
        }
    }
    out
}

fn check_create(input: &Input<'_>, intent: &Intent, made: &[Uuid]) -> Vec<Violation> {
    let snapshot = input.snapshot;
    let rid = intent.request_id();
    let mut out = Vec::new();
    let acked = intent.acked_task_ids();
    if acked.len() > 1 {
        out.push(
            Violation::new(
                "acks-agree",
                None,
                format!(
                    "request {rid} was acknowledged with {} task ids: {acked:?}",
                    acked.len()
                ),
            )
            .with(intent.describe()),
        );
    }
    if made.len() > 1 {
        let mut v = Violation::new(
            "one-task-per-request",
            None,
            format!("request {rid} made {} tasks", made.len()),
        )
        .with(intent.describe());
        for task in made {
            v.evidence.push(format!("  task {task}:"));
            v.evidence.extend(snapshot.rows(task));
        }
        out.push(v);
    }
    match intent.resolution() {
        Resolution::Acked { task_id } => {
            let stored = Uuid::parse_str(&task_id)
                .ok()
                .and_then(|id| snapshot.tasks.get(&id));
            match stored {
                None => out.push(
                    Violation::new(
                        "acked-create-exists",
                        Some(task_id.clone()),
                        format!("request {rid} was acknowledged, but the task is not stored"),
                    )
                    .with(intent.describe()),
                ),
                Some(task) if task.request_id.as_deref() != Some(rid) => out.push(
                    Violation::new(
                        "acked-create-exists",
                        Some(task_id.clone()),
                        format!(
                            "request {rid} was acknowledged with a task made by {:?}",
                            task.request_id
                        ),
                    )
                    .with(intent.describe()),
                ),
                Some(_) => {}
            }
        }
        Resolution::Refused { reason } if !made.is_empty() => out.push(
            Violation::new(
                "refused-create-made-no-task",
                Some(made[0].to_string()),
                format!("request {rid} was refused ({reason}) on every attempt, yet made a task"),
            )
            .with(intent.describe()),
        ),
        _ => {}
    }
    out
}

fn check_cancel(input: &Input<'_>, intent: &Intent, task_id: &str) -> Vec<Violation> {
    let snapshot = input.snapshot;
    let Some(task) = Uuid::parse_str(task_id)
        .ok()
        .and_then(|id| snapshot.tasks.get(&id))
    else {
        return vec![
            Violation::new(
                "acked-create-exists",
                Some(task_id.to_owned()),
                "a cancel named a task that is not stored",
            )
            .with(intent.describe()),
        ];
    };
    let expected = match intent.resolution() {
        Resolution::Acked { .. } => Some(("acked-cancel-holds", "cancelled".to_owned())),
        Resolution::Refused { reason } | Resolution::RefusedAfterUnknown { reason } => {
            let status = match reason.as_str() {
                "ALREADY_COMPLETED" => "completed",
                "ALREADY_FAILED" => "failed",
                "ALREADY_CANCELLED" => "cancelled",
                other => other,
            };
            Some(("refused-cancel-agrees", status.to_owned()))
        }
        Resolution::Unresolved => None,
    };
    match expected {
        Some((invariant, status)) if task.status != status => vec![
            Violation::new(
                invariant,
                Some(task_id.to_owned()),
                format!(
                    "the cancel's answer implies status {status}, the store says {}",
                    task.status
                ),
            )
            .with(intent.describe())
            .with(snapshot.rows(&task.task_id))
            .with(snapshot.tail(&task.task_id, 6)),
        ],
        _ => Vec::new(),
    }
}
