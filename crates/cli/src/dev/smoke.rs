//! The smoke check `taskpod dev` runs once the database is ready: one task taken
//! through create, start request and cancel, read back through every read path.
//!
//! It goes through the same `Store` the API uses, so a passing check means the schema,
//! the state table and the store agree on this machine, not only that Postgres answers.

use taskpod_core::domain::{
    Command, Event, MANUAL_KIND, NewTask, Phase, RequestContext, Status, TaskId,
};
use taskpod_core::store::{ListQuery, Store, TaskFilter};

/// Attributed on the smoke task's events, so they are easy to tell from real work.
pub const ACTOR: &str = "taskpod-dev";

#[derive(Debug, thiserror::Error)]
pub enum SmokeError {
    #[error("smoke check failed to {step}")]
    Store {
        step: &'static str,
        #[source]
        source: taskpod_core::Error,
    },
    #[error("smoke check: {0}")]
    Unexpected(String),
}

fn at(step: &'static str) -> impl FnOnce(taskpod_core::Error) -> SmokeError {
    move |source| SmokeError::Store { step, source }
}

/// Runs the check, printing one line per step.
///
/// # Errors
/// The first step the store refuses, or whose answer is not what the state table says.
pub async fn run(store: &Store) -> Result<TaskId, SmokeError> {
    let ctx = RequestContext::new(ACTOR);
    let mut task = NewTask::new("taskpod dev smoke check", MANUAL_KIND);
    task.description = "created by `taskpod dev` to check the store end to end".into();

    let created = store
        .create_task(&task, &ctx)
        .await
        .map_err(at("create a task"))?;
    let task_id = created
        .task_id()
        .ok_or_else(|| SmokeError::Unexpected("create returned no task id".into()))?;
    println!("smoke: created task {task_id}");

    let started = store
        .execute(task_id, &Command::RequestStart, &ctx)
        .await
        .map_err(at("request a start"))?;
    expect("the start request", started.state.status, Status::Active)?;
    println!(
        "smoke: requested a start: status {}, version {}",
        started.state.status, started.state.version
    );

    let cancel = Command::Cancel {
        reason: "taskpod dev smoke check done".into(),
    };
    let cancelled = store
        .execute(task_id, &cancel, &ctx)
        .await
        .map_err(at("cancel the task"))?;
    expect("the cancel", cancelled.state.status, Status::Cancelled)?;
    expect("the cancel", cancelled.state.phase, Phase::Cancelled)?;
    println!(
        "smoke: cancelled it: status {}, phase {}, version {}",
        cancelled.state.status, cancelled.state.phase, cancelled.state.version
    );

    let stream = store
        .read_stream(task_id, 1, 100)
        .await
        .map_err(at("read the stream"))?;
    let types: Vec<&str> = stream.iter().map(|e| e.event.type_name()).collect();
    if !matches!(
        stream.last().map(|e| &e.event),
        Some(Event::TaskCancelled { .. })
    ) {
        return Err(SmokeError::Unexpected(format!(
            "the stream does not end with task_cancelled: {types:?}"
        )));
    }
    println!(
        "smoke: read its stream: {} events ({})",
        stream.len(),
        types.join(", ")
    );

    let page = store
        .list_tasks(&ListQuery {
            page_size: 10,
            ..ListQuery::default()
        })
        .await
        .map_err(at("list tasks"))?;
    let mine = TaskFilter {
        created_by: Some(ACTOR.to_owned()),
        ..TaskFilter::default()
    };
    let total = store.count_tasks(&mine).await.map_err(at("count tasks"))?;
    // Newest change first: the task just cancelled leads the default listing.
    if !page.tasks.iter().any(|t| t.task_id == task_id) {
        return Err(SmokeError::Unexpected(format!(
            "task {task_id} is missing from the first page of the listing"
        )));
    }
    println!(
        "smoke: listed tasks: {} on the first page, {total} created by {ACTOR} in all",
        page.tasks.len()
    );
    Ok(task_id)
}

fn expect<T: PartialEq + std::fmt::Display>(what: &str, got: T, want: T) -> Result<(), SmokeError> {
    if got == want {
        Ok(())
    } else {
        Err(SmokeError::Unexpected(format!(
            "after {what} the task is {got}, not {want}"
        )))
    }
}
