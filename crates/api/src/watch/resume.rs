//! Resume tokens of WatchTasks, and what a resumed stream follows.
//!
//! A token names a watermark (see `Store::changed_tasks`) and when it was issued. A
//! stream resumed at a watermark must behave as the stream that issued the token would
//! have: show what changed since, and send `left` only for a task the client was shown
//! as matching. The client's set is not in the token, so it is rebuilt from the store:
//! the tasks matching now and unchanged since the mark, plus the changed ones whose
//! stream below the mark replays to a matching state. Tokens expire, which bounds that
//! rebuild by the changes of one token lifetime.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use taskpod_core::Error;
use taskpod_core::domain::{Task, TaskId, TaskState};
use taskpod_core::store::{
    ListQuery, RecordedEvent, SortDirection, SortField, Store, TaskFilter, TaskOrder, View,
};

use super::at_state;
use super::follow::FollowSet;

/// Tasks read per round trip while rebuilding.
const CHUNK: usize = 500;

/// What a WatchTasks resume token carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ResumeToken {
    Point {
        /// The watermark the stream had served up to.
        m: u64,
        /// When it was issued, in seconds since the Unix epoch.
        t: i64,
    },
    /// A token from before tokens carried their age: always expired.
    Legacy(u64),
}

impl ResumeToken {
    pub fn issue(mark: u64, now: chrono::DateTime<chrono::Utc>) -> Self {
        Self::Point {
            m: mark,
            t: now.timestamp(),
        }
    }

    /// The watermark to resume from, or how old the token is when older than `ttl`.
    pub fn mark(
        self,
        now: chrono::DateTime<chrono::Utc>,
        ttl: Duration,
    ) -> Result<u64, Option<Duration>> {
        match self {
            Self::Legacy(_) => Err(None),
            Self::Point { m, t } => {
                let age = Duration::from_secs(now.timestamp().saturating_sub(t).max(0) as u64);
                if age > ttl { Err(Some(age)) } else { Ok(m) }
            }
        }
    }
}

/// The tasks a stream resumed at `mark` follows: those that matched `filter` then,
/// each at its version then.
///
/// # Errors
/// [`Error::StoreUnavailable`]; [`Error::Internal`] for a stream that does not replay.
pub async fn followed_at(
    store: &Store,
    filter: &TaskFilter,
    mark: u64,
) -> Result<FollowSet, Error> {
    let mut matching_now: Vec<(TaskId, i64)> = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list_tasks(&ListQuery {
                filter: filter.clone(),
                order: TaskOrder {
                    field: SortField::CreatedAt,
                    direction: SortDirection::Asc,
                },
                page_size: 1000,
                after,
                view: View::Basic,
            })
            .await?;
        matching_now.extend(page.tasks.iter().map(|t| (t.task_id, t.version)));
        match page.next {
            Some(c) => after = Some(c),
            None => break,
        }
    }
    // Read after the listing: every change the listing saw is among these.
    let changed: HashSet<TaskId> = store.changed_since(mark).await?.into_iter().collect();
    let mut follow = FollowSet::new();
    let mut candidates = Vec::new();
    for (id, version) in matching_now {
        if changed.contains(&id) {
            candidates.push(id);
        } else {
            follow.insert(id, version);
        }
    }
    if !filter.fixed_per_task() {
        // A task that does not match now may have matched at the mark.
        let now: HashSet<TaskId> = candidates.iter().copied().collect();
        candidates.extend(changed.into_iter().filter(|id| !now.contains(id)));
    }
    for chunk in candidates.chunks(CHUNK) {
        let rows = store.get_tasks(chunk).await?;
        let mut streams: HashMap<TaskId, Vec<RecordedEvent>> = HashMap::new();
        for e in store.events_before(chunk, mark).await? {
            streams.entry(e.task_id).or_default().push(e);
        }
        for row in rows {
            // No events below the mark: the task did not exist for the stream yet.
            let Some(events) = streams.get(&row.task_id) else {
                continue;
            };
            let then = as_of(&row, events)?;
            if filter.matches(&then) {
                follow.insert(row.task_id, then.version);
            }
        }
    }
    Ok(follow)
}

/// `row` as it stood after `events` (a prefix of its stream).
fn as_of(row: &Task, events: &[RecordedEvent]) -> Result<Task, Error> {
    let state = TaskState::replay(row.task_id, events.iter().map(|e| &e.event))?;
    let mut task = at_state(row, &state);
    if let Some(last) = events.last() {
        task.updated_at = last.recorded_at;
    }
    Ok(task)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use chrono::{TimeZone as _, Utc};

    #[test]
    fn a_token_older_than_its_lifetime_is_refused_with_its_age() {
        let issued = Utc.with_ymd_and_hms(2026, 12, 7, 10, 0, 0).unwrap();
        let token = ResumeToken::issue(42, issued);
        let ttl = Duration::from_secs(3600);
        assert_eq!(
            token.mark(issued + chrono::Duration::seconds(3600), ttl),
            Ok(42)
        );
        assert_eq!(
            token.mark(issued + chrono::Duration::seconds(3601), ttl),
            Err(Some(Duration::from_secs(3601)))
        );
        // A clock behind the issuer's does not make a token younger than new.
        assert_eq!(
            token.mark(issued - chrono::Duration::seconds(5), ttl),
            Ok(42)
        );
    }

    #[test]
    fn tokens_round_trip_and_old_ones_are_expired() {
        let issued = Utc.with_ymd_and_hms(2026, 12, 7, 10, 0, 0).unwrap();
        let json = serde_json::to_string(&ResumeToken::issue(7, issued)).unwrap();
        let back: ResumeToken = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ResumeToken::issue(7, issued));
        let legacy: ResumeToken = serde_json::from_str("7").unwrap();
        assert_eq!(legacy.mark(issued, Duration::from_secs(3600)), Err(None));
    }
}
