//! What a write committed, and the one path that announces it.
//!
//! Every write of the store (creates, commands, pod appends, crash records) ends with
//! the tasks it changed as they now stand: the state it decided, the type of its last
//! event, and the listing fields its statement returned (`RETURNING`), so nothing is
//! read back after the commit and nothing is re-derived. [`Store::announce`] turns
//! them into bus messages with the one constructor, [`TaskUpdate::committed`], after
//! the commit: a publish only queues (it never waits on Redis), so announcing costs a
//! writer nothing, and no caller has to remember to do it.

use chrono::{DateTime, Utc};

use super::Store;
use crate::bus::TaskUpdate;
use crate::domain::{TaskId, TaskState};

/// The listing row's fields a change does not decide, as the writing statement
/// returned them.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct Listing {
    pub task_id: uuid::Uuid,
    pub partition: i32,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One task as a write left it.
#[derive(Clone, Debug, PartialEq)]
pub struct Committed {
    pub state: TaskState,
    /// The type of the last event the write appended.
    pub event_type: &'static str,
    pub partition: i32,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The writer's trace context, which the update carries to its readers.
    pub traceparent: Option<String>,
}

impl Committed {
    pub(crate) fn new(
        state: TaskState,
        event_type: &'static str,
        listing: &Listing,
        traceparent: Option<String>,
    ) -> Self {
        Self {
            state,
            event_type,
            partition: listing.partition,
            created_by: listing.created_by.clone(),
            created_at: listing.created_at,
            updated_at: listing.updated_at,
            traceparent,
        }
    }

    pub fn task_id(&self) -> TaskId {
        self.state.task_id
    }
}

/// Pairs each decided change with its listing row; a change whose row the statement
/// did not return (its guard failed) is left out.
pub(crate) fn join<'a>(
    decided: impl IntoIterator<Item = (&'a TaskState, &'static str, Option<&'a str>)>,
    listed: &[Listing],
) -> Vec<Committed> {
    let rows: std::collections::HashMap<uuid::Uuid, &Listing> =
        listed.iter().map(|l| (l.task_id, l)).collect();
    decided
        .into_iter()
        .filter_map(|(state, event_type, trace)| {
            let row = rows.get(&state.task_id.as_uuid())?;
            Some(Committed::new(
                state.clone(),
                event_type,
                row,
                trace.map(str::to_owned),
            ))
        })
        .collect()
}

impl Store {
    /// Publishes what was committed: one message per task, all in one queued batch.
    pub(crate) fn announce(&self, committed: &[Committed]) {
        if committed.is_empty() {
            return;
        }
        let updates: Vec<TaskUpdate> = committed.iter().map(TaskUpdate::committed).collect();
        self.bus.publish(&updates);
    }
}
