//! Lifecycle commands from API callers: decided from the head as it is when written, so
//! concurrent callers get definite answers (OK or the table's refusal), never a version
//! conflict. A command without a request id is decided from a plain read and written
//! only while the head is unchanged; when another change got there first, and always
//! with a request id (whose key is claimed in the same transaction), it is decided
//! again under the head's row lock.

use serde::{Deserialize, Serialize};
use tracing::instrument;

use super::Store;
use super::committed;
use super::create::correlation_id;
use super::errors::from_sqlx;
use super::idempotency::{self, Claim, Key};
use super::traced::Traced as _;
use super::writes::{Change, Guard, lock_state, record_commit, write_changes, write_guarded};
use crate::domain::validation::{validate_command, validate_context};
use crate::domain::{
    Command, Event, EventMetadata, RequestContext, TaskId, TaskState, decide, evolve,
};
use crate::error::Error;

/// The task's state after a command, and whether this is the stored answer to an earlier
/// request with the same request_id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Executed {
    pub state: TaskState,
    /// The first version the command appended.
    pub first_version: i64,
    /// The type of the last event it appended.
    #[serde(default)]
    pub last_event: String,
    #[serde(skip)]
    pub replayed: bool,
}

#[derive(Serialize)]
struct Fingerprint<'a> {
    task_id: TaskId,
    actor_id: &'a str,
    command: &'a Command,
}

impl Store {
    /// Runs a caller's command in one transaction: lock the head, decide from the
    /// current state, append, update head and listing row, record the request id.
    ///
    /// # Errors
    /// Validation errors; [`Error::TaskNotFound`]; the state table's refusals
    /// ([`Error::AlreadyCancelled`], ...); [`Error::IdempotencyKeyReused`];
    /// [`Error::StoreUnavailable`].
    #[instrument(skip_all, fields(task.id = %task_id, command = command.name()))]
    pub async fn execute(
        &self,
        task_id: TaskId,
        command: &Command,
        ctx: &RequestContext,
    ) -> Result<Executed, Error> {
        validate_context(ctx)?;
        validate_command(command)?;
        // Without a request id there is no key to claim in the same transaction: try
        // the two-round-trip form first, and decide under the lock only if it lost.
        if ctx.request_id.is_none()
            && let Some(executed) = self.execute_guarded(task_id, command, ctx).await?
        {
            return Ok(executed);
        }
        let started = std::time::Instant::now();
        let mut tx = self.pool.begin().traced("BEGIN").await.map_err(from_sqlx)?;
        let key = match &ctx.request_id {
            Some(id) => {
                let fingerprint = Fingerprint {
                    task_id,
                    actor_id: &ctx.actor_id,
                    command,
                };
                let key = Key::new(&ctx.principal, id, command.name(), &fingerprint)?;
                if let Claim::Replay(stored) = idempotency::claim(&mut tx, &key).await? {
                    let mut executed: Executed = idempotency::decode(stored)?;
                    executed.replayed = true;
                    return Ok(executed);
                }
                Some(key)
            }
            None => None,
        };

        let before = lock_state(&mut tx, task_id).await?;
        let events = decide(&before, command)?;
        let after = events
            .iter()
            .try_fold(before.clone(), |s, e| evolve(&s, e))?;
        let metadata = event_metadata(ctx);
        let listed = write_changes(&mut tx, &before, &after, &events, &metadata).await?;
        let executed = Executed {
            last_event: events
                .last()
                .map(|e| e.type_name().to_owned())
                .unwrap_or_default(),
            first_version: before.version + 1,
            state: after,
            replayed: false,
        };
        if let Some(key) = &key {
            idempotency::record(&mut tx, key, &executed).await?;
        }
        tx.commit().traced("COMMIT").await.map_err(from_sqlx)?;
        record_commit("api", started, &before, &executed.state);
        self.announce(&committed::join(
            [(
                &executed.state,
                last_type(&events),
                metadata.traceparent.as_deref(),
            )],
            &listed,
        ));
        Ok(executed)
    }

    /// Decides from a plain read of the head and writes only if the head is still what
    /// was read (a guarded write, its own transaction): a read and a write instead of
    /// begin, lock, write and commit. `None` when another change got there first.
    async fn execute_guarded(
        &self,
        task_id: TaskId,
        command: &Command,
        ctx: &RequestContext,
    ) -> Result<Option<Executed>, Error> {
        let started = std::time::Instant::now();
        let before = self.state(task_id).await?;
        let events = decide(&before, command)?;
        let after = events
            .iter()
            .try_fold(before.clone(), |s, e| evolve(&s, e))?;
        let metadata = event_metadata(ctx);
        let change = Change {
            before: &before,
            after: &after,
            events: &events,
            metadata: &metadata,
        };
        let listed = write_guarded(&self.pool, &[(change, Guard::default())]).await?;
        if listed.is_empty() {
            return Ok(None);
        }
        record_commit("api", started, &before, &after);
        self.announce(&committed::join(
            [(&after, last_type(&events), metadata.traceparent.as_deref())],
            &listed,
        ));
        Ok(Some(Executed {
            last_event: events
                .last()
                .map(|e| e.type_name().to_owned())
                .unwrap_or_default(),
            first_version: before.version + 1,
            state: after,
            replayed: false,
        }))
    }
}

fn event_metadata(ctx: &RequestContext) -> EventMetadata {
    EventMetadata {
        actor_id: ctx.actor_id.clone(),
        correlation_id: correlation_id(ctx),
        causation_id: ctx.causation_id.clone(),
        traceparent: ctx.traceparent.clone(),
        epoch: None,
    }
}

/// The type of the last event a command appended.
fn last_type(events: &[Event]) -> &'static str {
    events.last().map(Event::type_name).unwrap_or_default()
}
