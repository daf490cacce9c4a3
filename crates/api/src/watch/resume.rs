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

/// Where a resumed stream starts: the watermark it had served up to, and a time no
/// earlier than when the token was issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resume {
    pub mark: u64,
    pub issued: chrono::DateTime<chrono::Utc>,
}

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

    /// Where to resume, or how old the token is when older than `ttl`.
    pub fn mark(
        self,
        now: chrono::DateTime<chrono::Utc>,
        ttl: Duration,
    ) -> Result<Resume, Option<Duration>> {
        match self {
            Self::Legacy(_) => Err(None),
            Self::Point { m, t } => {
                let age = Duration::from_secs(now.timestamp().saturating_sub(t).max(0) as u64);
                if age > ttl {
                    return Err(Some(age));
                }
                // Issued within the second after `t`.
                let issued =
                    chrono::DateTime::from_timestamp(t.saturating_add(1), 0).unwrap_or(now);
                Ok(Resume { mark: m, issued })
            }
        }
    }
}

/// The tasks a stream resumed at `at` follows: every task its client may hold.
///
/// The client holds what the stream showed before the token was issued, and a stream
/// shows rows as they are when read: past its watermark (a transaction of the database
/// still open when it began) a snapshot or a look may already have shown a later
/// version. So a task changed since the mark is followed when it matched at the mark
/// (at its version then), or at any version written before the token was issued (as
/// shown just before the first such version, so the stream shows it again from there:
/// a repeat after a resume, never a miss). A later `left` may then reach a client that
/// never held the task (it drops nothing); one that holds it always gets its `left`.
///
/// # Errors
/// [`Error::StoreUnavailable`]; [`Error::Internal`] for a stream that does not replay.
pub async fn followed_at(
    store: &Store,
    filter: &TaskFilter,
    at: Resume,
) -> Result<FollowSet, Error> {
    let mark = at.mark;
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
        let mut streams: HashMap<TaskId, Vec<(RecordedEvent, bool)>> = HashMap::new();
        for (e, below) in store.events_before(chunk, mark, Some(at.issued)).await? {
            streams.entry(e.task_id).or_default().push((e, below));
        }
        for row in rows {
            // No events below the mark: the task did not exist for the stream yet.
            let Some(events) = streams.get(&row.task_id) else {
                continue;
            };
            match first_match(&row, events, filter)? {
                Some(Match::AtMark(version)) => follow.insert(row.task_id, version),
                Some(Match::Later(version)) => follow.insert(row.task_id, version - 1),
                None => {}
            }
        }
    }
    Ok(follow)
}

/// Where a task changed since the mark first matched a stream's filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Match {
    /// At the mark: the client holds it at this version, or a later one.
    AtMark(i64),
    /// Only at this later version, written before the token was issued: the client may
    /// hold it, or not.
    Later(i64),
}

/// The first version at which `row` matched `filter`, among the states its stream
/// passed through up to `events` (in version order; a gap ends it), from the last
/// one written below the mark on.
fn first_match(
    row: &Task,
    stream: &[(RecordedEvent, bool)],
    filter: &TaskFilter,
) -> Result<Option<Match>, Error> {
    // The leading run of versions 1, 2, ...: a gap ends what can be replayed.
    let events: Vec<&RecordedEvent> = stream
        .iter()
        .enumerate()
        .take_while(|(i, (e, _))| e.version == *i as i64 + 1)
        .map(|(_, (e, _))| e)
        .collect();
    let states = TaskState::history(row.task_id, events.iter().map(|e| &e.event))?;
    // The earliest state the client can hold: after the leading events below the mark
    // (starting earlier only adds states). Events written after the mark but before
    // the token are the later states it may hold.
    let below = stream.iter().take_while(|(_, below)| *below).count().max(1);
    let at_mark = stream.first().is_some_and(|(_, b)| *b);
    for (end, (state, last)) in states.iter().zip(&events).enumerate().skip(below - 1) {
        let mut then = at_state(row, state);
        then.updated_at = last.recorded_at;
        if filter.matches(&then) {
            return Ok(Some(if end + 1 == below && at_mark {
                Match::AtMark(then.version)
            } else {
                Match::Later(then.version)
            }));
        }
    }
    Ok(None)
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
        let at = |r: Result<Resume, Option<Duration>>| r.map(|r| r.mark);
        assert_eq!(
            at(token.mark(issued + chrono::Duration::seconds(3600), ttl)),
            Ok(42)
        );
        assert_eq!(
            at(token.mark(issued + chrono::Duration::seconds(3601), ttl)),
            Err(Some(Duration::from_secs(3601)))
        );
        // A clock behind the issuer's does not make a token younger than new.
        assert_eq!(
            at(token.mark(issued - chrono::Duration::seconds(5), ttl)),
            Ok(42)
        );
        // The time it carries is no earlier than the issue.
        let resumed = token.mark(issued, ttl).unwrap();
        assert!(resumed.issued >= issued);
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
