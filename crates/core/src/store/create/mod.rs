//! Creating tasks: stream, head and listing row in one transaction, one statement.
//!
//! CreateTask calls that arrive together share one transaction ([`Store::create_each`],
//! with or without request ids); CreateTasks is one transaction for its tasks. Rows go
//! through one multi-row statement (column arrays through `UNNEST`): one round trip for
//! up to [`BATCH_MAX`] tasks.
//!
//! Exactly once: every request's task ids are minted before its first attempt and kept
//! by any retry of it here, so a request can never be stored under two ids. A COMMIT
//! whose answer is lost is settled by asking Postgres (`store::commit`): committed is
//! answered as created, aborted is retried, and what cannot be learnt within the call
//! bound is answered as unavailable (outcome unknown), never retried blindly. A retry
//! that meets its own ids already stored answers with them.

mod plan;
mod rows;
pub mod seed;
pub mod shapes;

use serde::{Deserialize, Serialize};
use tracing::instrument;

use super::Store;
use super::commit::{self, CommitError, unknown_outcome};
use super::errors::from_sqlx;
use super::idempotency::{self, Claim, Key};
use super::traced::Traced as _;
use crate::domain::validation::{BATCH_MAX, validate_context, validate_new_task};
use crate::domain::{NewTask, RequestContext, TaskId};
use crate::error::Error;
use plan::Part;
pub(crate) use rows::correlation_id;
use rows::{InsertError, Origin, TaskColumns, insert, record_created};

/// The method a CreateTask's request id is claimed for.
const CREATE_TASK: &str = "create_task";

/// What a create answered, and whether it is the stored answer to an earlier request
/// with the same request_id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Created {
    /// In the order the tasks were given.
    pub task_ids: Vec<TaskId>,
    /// When the creating transaction began: the tasks' `created_at`.
    #[serde(default)]
    pub created_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(skip)]
    pub replayed: bool,
}

impl Created {
    /// The first (for CreateTask, the only) task id.
    pub fn task_id(&self) -> Option<TaskId> {
        self.task_ids.first().copied()
    }

    fn replayed(self) -> Self {
        Self {
            replayed: true,
            ..self
        }
    }
}

#[derive(Serialize)]
struct Fingerprint<'a> {
    actor_id: &'a str,
    tasks: &'a [NewTask],
}

/// A request's key, hashed over what makes it that request.
fn key<'a>(
    ctx: &'a RequestContext,
    request_id: &'a str,
    method: &'static str,
    tasks: &[NewTask],
) -> Result<Key<'a>, Error> {
    Key::new(
        &ctx.principal,
        request_id,
        method,
        &Fingerprint {
            actor_id: &ctx.actor_id,
            tasks,
        },
    )
}

impl Store {
    /// Creates one task (and requests its pod when `auto_start` is set).
    ///
    /// # Errors
    /// Validation errors; [`Error::IdempotencyKeyReused`]; [`Error::StoreUnavailable`].
    #[instrument(skip_all, fields(task.kind = %task.kind))]
    pub async fn create_task(
        &self,
        task: &NewTask,
        ctx: &RequestContext,
    ) -> Result<Created, Error> {
        validate_new_task(task)?;
        self.create(
            std::slice::from_ref(task),
            &[TaskId::new()],
            ctx,
            CREATE_TASK,
        )
        .await
    }

    /// Creates up to [`BATCH_MAX`] tasks, all or nothing.
    ///
    /// # Errors
    /// [`Error::InvalidBatchItem`] naming the first invalid item; the others as for
    /// [`Store::create_task`].
    #[instrument(skip_all, fields(batch.size = tasks.len()))]
    pub async fn create_tasks(
        &self,
        tasks: &[NewTask],
        ctx: &RequestContext,
    ) -> Result<Created, Error> {
        if tasks.is_empty() {
            return Err(Error::invalid("tasks", "at least one task is required"));
        }
        if tasks.len() > BATCH_MAX {
            return Err(Error::invalid(
                "tasks",
                format!("{} tasks, at most {BATCH_MAX} per call", tasks.len()),
            ));
        }
        for (index, task) in tasks.iter().enumerate() {
            validate_new_task(task).map_err(|e| Error::InvalidBatchItem {
                index,
                source: Box::new(e),
            })?;
        }
        let ids: Vec<TaskId> = tasks.iter().map(|_| TaskId::new()).collect();
        self.create(tasks, &ids, ctx, "create_tasks").await
    }

    /// One request in a transaction of its own, its tasks under `ids`.
    async fn create(
        &self,
        tasks: &[NewTask],
        ids: &[TaskId],
        ctx: &RequestContext,
        method: &'static str,
    ) -> Result<Created, Error> {
        validate_context(ctx)?;
        let started = std::time::Instant::now();
        let mut tx = self.pool.begin().traced("BEGIN").await.map_err(from_sqlx)?;
        let key = match &ctx.request_id {
            Some(id) => {
                let key = key(ctx, id, method, tasks)?;
                if let Claim::Replay(stored) = idempotency::claim(&mut tx, &key).await? {
                    return Ok(idempotency::decode::<Created>(stored)?.replayed());
                }
                Some(key)
            }
            None => None,
        };
        let origin = Origin::of(ctx)?;
        let rows = TaskColumns::build(
            ids.iter().zip(tasks).map(|(id, t)| (*id, t, &origin)),
            self.partition_count,
        )?;
        let inserted = match insert(&mut tx, &rows).await {
            Ok(inserted) => inserted,
            Err(InsertError::AlreadyStored) => {
                drop(tx);
                return self.stored(ids).await;
            }
            Err(InsertError::Failed(e)) => return Err(e),
        };
        let created = Created {
            task_ids: ids.to_vec(),
            created_at: Some(inserted.created_at),
            replayed: false,
        };
        if let Some(key) = &key {
            idempotency::record(&mut tx, key, &created).await?;
        }
        commit::commit(&self.pool, tx, inserted.xact)
            .await
            .map_err(CommitError::into_error)?;
        record_created(tasks.iter(), started);
        self.announce(&rows.committed(inserted.created_at));
        Ok(created)
    }

    /// The answer for tasks an earlier attempt of the same request stored (its COMMIT
    /// answer was lost, its outcome not learnt).
    async fn stored(&self, ids: &[TaskId]) -> Result<Created, Error> {
        let uuids: Vec<uuid::Uuid> = ids.iter().map(TaskId::as_uuid).collect();
        let (count, created_at): (i64, Option<chrono::DateTime<chrono::Utc>>) =
            sqlx::query_as("SELECT count(*), min(created_at) FROM tasks WHERE task_id = ANY($1)")
                .bind(&uuids)
                .fetch_one(&self.pool)
                .traced("SELECT tasks")
                .await
                .map_err(from_sqlx)?;
        if usize::try_from(count).ok() != Some(ids.len()) {
            return Err(Error::Internal(format!(
                "{count} of {} tasks of one create are stored",
                ids.len()
            )));
        }
        Ok(Created {
            task_ids: ids.to_vec(),
            created_at,
            replayed: false,
        })
    }

    /// Creates one task for each of several callers in one transaction, each with the
    /// answer [`Store::create_task`] would give it: an invalid request is refused alone,
    /// a second request with a request id already in the batch runs alone after it, and
    /// when the transaction fails before committing (or is learnt to have aborted)
    /// every request is run alone, under the ids it was given here.
    #[instrument(skip_all, fields(requests = requests.len()))]
    pub async fn create_each(
        &self,
        requests: &[(NewTask, RequestContext)],
    ) -> Vec<Result<Created, Error>> {
        let parts = plan::plan(requests, |task, ctx| {
            validate_new_task(task).and_then(|()| validate_context(ctx))
        });
        let ids: Vec<TaskId> = requests.iter().map(|_| TaskId::new()).collect();
        let mut answers: Vec<Option<Result<Created, Error>>> = Vec::with_capacity(parts.len());
        let mut joining = Vec::with_capacity(parts.len());
        for (i, part) in parts.into_iter().enumerate() {
            answers.push(match part {
                Part::Refused(e) => Some(Err(e)),
                Part::Joins => {
                    joining.push(i);
                    None
                }
                Part::Deferred => None,
            });
        }
        if !joining.is_empty() {
            match self.create_batch(requests, &ids, &joining).await {
                Ok(done) => {
                    for (i, answer) in done {
                        answers[i] = Some(answer);
                    }
                }
                Err(CommitError::Unknown(e)) => {
                    for &i in &joining {
                        answers[i] = Some(Err(unknown_outcome(&e)));
                    }
                }
                Err(CommitError::NotCommitted(e)) => {
                    tracing::debug!(error = %e, "batched create failed; creating alone");
                }
            }
        }
        let mut out = Vec::with_capacity(requests.len());
        for (i, answer) in answers.into_iter().enumerate() {
            out.push(match answer {
                Some(answer) => answer,
                None => {
                    let (task, ctx) = &requests[i];
                    self.create(std::slice::from_ref(task), &ids[i..=i], ctx, CREATE_TASK)
                        .await
                }
            });
        }
        out
    }

    /// The `joining` requests in one transaction: each one's answer, or why the
    /// transaction as a whole is not known to have committed.
    async fn create_batch(
        &self,
        requests: &[(NewTask, RequestContext)],
        ids: &[TaskId],
        joining: &[usize],
    ) -> Result<Vec<(usize, Result<Created, Error>)>, CommitError> {
        let started = std::time::Instant::now();
        let mut answers = Vec::with_capacity(joining.len());
        let mut writing = Vec::with_capacity(joining.len());
        let (mut keyed, mut keys) = (Vec::new(), Vec::new());
        for &i in joining {
            let (task, ctx) = &requests[i];
            match &ctx.request_id {
                None => writing.push(i),
                Some(id) => match key(ctx, id, CREATE_TASK, std::slice::from_ref(task)) {
                    Ok(key) => {
                        keyed.push(i);
                        keys.push(key);
                    }
                    Err(e) => answers.push((i, Err(e))),
                },
            }
        }
        let failed = CommitError::NotCommitted;
        let mut tx = self
            .pool
            .begin()
            .traced("BEGIN")
            .await
            .map_err(|e| failed(from_sqlx(e)))?;
        let mut fresh = Vec::new();
        if !keys.is_empty() {
            let claims = idempotency::claim_many(&mut tx, &keys)
                .await
                .map_err(failed)?;
            for ((i, key), claim) in keyed.into_iter().zip(&keys).zip(claims) {
                match claim {
                    Ok(Claim::Fresh) => {
                        writing.push(i);
                        fresh.push((i, key));
                    }
                    Ok(Claim::Replay(stored)) => answers.push((
                        i,
                        idempotency::decode::<Created>(stored).map(Created::replayed),
                    )),
                    Err(e) => answers.push((i, Err(e))),
                }
            }
        }
        if writing.is_empty() {
            // Only answers from earlier commits: nothing to write.
            return Ok(answers);
        }
        let origins = writing
            .iter()
            .map(|&i| Origin::of(&requests[i].1))
            .collect::<Result<Vec<_>, _>>()
            .map_err(failed)?;
        let rows = TaskColumns::build(
            writing
                .iter()
                .zip(&origins)
                .map(|(&i, origin)| (ids[i], &requests[i].0, origin)),
            self.partition_count,
        )
        .map_err(failed)?;
        let inserted = insert(&mut tx, &rows).await.map_err(|e| failed(e.into()))?;
        let created = |i: usize| Created {
            task_ids: vec![ids[i]],
            created_at: Some(inserted.created_at),
            replayed: false,
        };
        if !fresh.is_empty() {
            let responses: Vec<(&Key<'_>, Created)> =
                fresh.iter().map(|(i, key)| (*key, created(*i))).collect();
            idempotency::record_many(&mut tx, &responses)
                .await
                .map_err(failed)?;
        }
        commit::commit(&self.pool, tx, inserted.xact).await?;
        record_created(writing.iter().map(|&i| &requests[i].0), started);
        self.announce(&rows.committed(inserted.created_at));
        answers.extend(writing.iter().map(|&i| (i, Ok(created(i)))));
        Ok(answers)
    }
}
