//! Lifecycle commands from API callers: decided under the head row lock, so concurrent
//! callers get definite answers (OK or the table's refusal), never a version conflict.

use serde::{Deserialize, Serialize};
use tracing::instrument;

use super::Store;
use super::create::correlation_id;
use super::errors::from_sqlx;
use super::idempotency::{self, Claim, Key};
use super::traced::Traced as _;
use super::writes::{lock_state, record_commit, write_changes};
use crate::domain::validation::{validate_command, validate_context};
use crate::domain::{Command, EventMetadata, RequestContext, TaskId, TaskState, decide, evolve};
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
        let metadata = EventMetadata {
            actor_id: ctx.actor_id.clone(),
            correlation_id: correlation_id(ctx),
            causation_id: ctx.causation_id.clone(),
            traceparent: ctx.traceparent.clone(),
            epoch: None,
        };
        write_changes(&mut tx, &before, &after, &events, &metadata).await?;
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
        Ok(executed)
    }
}
