//! The smoke check `taskpod dev` runs once the replicas answer: one task taken through
//! create, start (a worker runs its pod) and cancel, read back through every read path,
//! all over gRPC.
//!
//! It alternates replicas (create and start on the first, cancel and read on the
//! second), so a passing check means both serve the same store and that a write on one
//! is read on the other, not only that Postgres answers.

use std::time::Duration;

use taskpod_proto::v1;

use crate::output::{phase_name, status_name};
use taskpod_client::client::Client;
use taskpod_client::config::Settings;
use taskpod_client::error::CliError;

/// Attributed on the smoke task's events, so they are easy to tell from real work.
pub const ACTOR: &str = "taskpod-dev";
/// Each call's deadline. StartPod waits (up to this) for a worker to run the pod.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum SmokeError {
    #[error("smoke check failed to {step}")]
    Call {
        step: &'static str,
        #[source]
        source: CliError,
    },
    #[error("smoke check: {0}")]
    Unexpected(String),
}

fn at(step: &'static str) -> impl FnOnce(tonic::Status) -> SmokeError {
    move |status| SmokeError::Call {
        step,
        source: CliError::from(status),
    }
}

/// A client of one replica, attributed to [`ACTOR`].
///
/// # Errors
/// A malformed address.
pub fn client(url: &str) -> Result<Client, CliError> {
    let settings = Settings {
        address: url.to_owned(),
        token: None,
        actor: Some(ACTOR.to_owned()),
        profile: None,
    };
    Client::connect(&settings, CALL_TIMEOUT)
}

fn task_of(task: Option<v1::Task>, step: &str) -> Result<v1::Task, SmokeError> {
    task.ok_or_else(|| SmokeError::Unexpected(format!("{step} answered without a task")))
}

/// Runs the check, printing one line per step; returns the task's id.
///
/// # Errors
/// The first call a replica refuses, or whose answer is not what the state table says.
pub async fn run(first: &Client, second: &Client) -> Result<String, SmokeError> {
    let task_id = first
        .grpc()
        .create_task(first.request(v1::CreateTaskRequest {
            task: Some(v1::TaskSpec {
                title: "taskpod dev smoke check".into(),
                description: "created by `taskpod dev` to check the API end to end".into(),
                kind: "manual".into(),
                ..v1::TaskSpec::default()
            }),
            meta: first.meta(None),
        }))
        .await
        .map_err(at("create a task"))?
        .into_inner()
        .task_id;
    println!("smoke: created task {task_id} (replica 1)");

    let started = first
        .grpc()
        .start_pod(first.request(v1::StartPodRequest {
            task_id: task_id.clone(),
            meta: first.meta(None),
        }))
        .await
        .map_err(at("request a start"))?
        .into_inner();
    let started = task_of(started.task, "StartPod")?;
    expect("the start request", status_name(started.status), "active")?;
    let pod = match started.pod_node.as_str() {
        "" => "no pod running yet".to_owned(),
        node => format!("pod running on node {node}"),
    };
    println!(
        "smoke: requested a start: status {}, {pod}, version {} (replica 1)",
        status_name(started.status),
        started.version
    );

    let cancelled = second
        .grpc()
        .cancel_task(second.request(v1::CancelTaskRequest {
            task_id: task_id.clone(),
            reason: "taskpod dev smoke check done".into(),
            meta: second.meta(None),
        }))
        .await
        .map_err(at("cancel the task"))?
        .into_inner();
    let cancelled = task_of(cancelled.task, "CancelTask")?;
    expect("the cancel", status_name(cancelled.status), "cancelled")?;
    expect("the cancel", phase_name(cancelled.phase), "cancelled")?;
    println!(
        "smoke: cancelled it: status {}, phase {}, version {} (replica 2)",
        status_name(cancelled.status),
        phase_name(cancelled.phase),
        cancelled.version
    );

    let events = second
        .grpc()
        .list_task_events(second.request(v1::ListTaskEventsRequest {
            task_id: task_id.clone(),
            from_version: 1,
            page_size: 100,
            page_token: String::new(),
        }))
        .await
        .map_err(at("read the stream"))?
        .into_inner()
        .events;
    let types: Vec<&str> = events.iter().map(|e| e.r#type.as_str()).collect();
    // The pod's own events (pod_started, pod_stopped) interleave as the worker gets to
    // them; the API's are always there, in order.
    let ours: Vec<&str> = types
        .iter()
        .copied()
        .filter(|t| !t.starts_with("pod_") || *t == "pod_requested")
        .collect();
    if ours != ["task_created", "pod_requested", "task_cancelled"] {
        return Err(SmokeError::Unexpected(format!(
            "the stream is not created, requested, cancelled: {types:?}"
        )));
    }
    println!(
        "smoke: read its stream: {} events ({}) (replica 2)",
        events.len(),
        types.join(", ")
    );

    let page = second
        .grpc()
        .list_tasks(second.request(v1::ListTasksRequest {
            page_size: 10,
            ..v1::ListTasksRequest::default()
        }))
        .await
        .map_err(at("list tasks"))?
        .into_inner();
    // Newest change first: the task just cancelled leads the default listing.
    if !page.tasks.iter().any(|t| t.task_id == task_id) {
        return Err(SmokeError::Unexpected(format!(
            "task {task_id} is missing from the first page of the listing"
        )));
    }
    let total = first
        .grpc()
        .count_tasks(first.request(v1::CountTasksRequest {
            filter: String::new(),
            criteria: Some(v1::TaskCriteria {
                created_by: ACTOR.into(),
                ..v1::TaskCriteria::default()
            }),
        }))
        .await
        .map_err(at("count tasks"))?
        .into_inner()
        .count;
    println!(
        "smoke: listed tasks: {} on the first page, {total} created by {ACTOR} in all",
        page.tasks.len()
    );
    Ok(task_id)
}

fn expect(what: &str, got: String, want: &str) -> Result<(), SmokeError> {
    if got == want {
        Ok(())
    } else {
        Err(SmokeError::Unexpected(format!(
            "after {what} the task is {got}, not {want}"
        )))
    }
}
