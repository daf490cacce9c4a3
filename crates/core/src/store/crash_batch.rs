//! Many crashes in one transaction, for the pods a dead node leaves behind: adopting a
//! thousand pods must not take a thousand transactions of nine round trips each.
//!
//! Each item keeps the outcome [`Store::record_crash`] would give it alone: heads are
//! locked in task_id order (so two recorders cannot deadlock), every item is checked
//! against its own epoch and its partition's generation, the crash rows are inserted
//! with `ON CONFLICT DO NOTHING RETURNING` (an item already recorded is told so), and
//! each restart is decided from that task's own crashes in its window. If the shared
//! transaction fails for any other reason, every item is recorded alone.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use tracing::instrument;

use super::Store;
use super::committed;
use super::crashes::{CrashOutcome, CrashReport, decide_crash};
use super::errors::from_sqlx;
use super::keys::node_alive_sql;
use super::rows::{StateRow, state_columns};
use super::traced::Traced as _;
use super::writes::{Change, record_commit, write_many};
use crate::domain::restart::{CrashKind, RestartPolicy};
use crate::domain::{Event, EventMetadata, NodeId, Status, TaskId, TaskState, evolve};
use crate::error::Error;

/// One crash of a batch: the report, the generation at which the recorder owns the
/// task's partition, the jitter of its restart delay, and its event metadata.
#[derive(Clone, Debug)]
pub struct CrashItem {
    pub report: CrashReport,
    pub generation: i64,
    pub jitter: f64,
    pub metadata: EventMetadata,
}

/// What the batch decided for one item that passed its checks.
struct Decided {
    index: usize,
    before: TaskState,
    after: TaskState,
    events: Vec<Event>,
    metadata: EventMetadata,
    outcome: CrashOutcome,
    delay: Option<f64>,
}

impl Store {
    /// Records every item's crash as [`Store::record_crash`] would, in one transaction;
    /// the answers are in the items' order.
    #[instrument(skip_all, fields(items = items.len()))]
    pub async fn record_crashes(
        &self,
        items: &[CrashItem],
        owner: NodeId,
        policy: &RestartPolicy,
    ) -> Vec<Result<CrashOutcome, Error>> {
        if items.is_empty() {
            return Vec::new();
        }
        let mut ids: Vec<TaskId> = items.iter().map(|i| i.report.task_id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() == items.len() {
            match self.record_batch(items, owner, policy).await {
                Ok(answers) => return answers,
                Err(e) => {
                    tracing::debug!(error = %e, "crash batch failed; recording each alone");
                }
            }
        }
        let mut answers = Vec::with_capacity(items.len());
        for item in items {
            answers.push(
                self.record_crash(
                    &item.report,
                    owner,
                    item.generation,
                    policy,
                    item.jitter,
                    &item.metadata,
                )
                .await,
            );
        }
        answers
    }

    /// The shared transaction; `Err` only for what must be replayed item by item.
    async fn record_batch(
        &self,
        items: &[CrashItem],
        owner: NodeId,
        policy: &RestartPolicy,
    ) -> Result<Vec<Result<CrashOutcome, Error>>, Error> {
        let started = std::time::Instant::now();
        let ids: Vec<uuid::Uuid> = items.iter().map(|i| i.report.task_id.as_uuid()).collect();
        let mut tx = self.pool.begin().traced("BEGIN").await.map_err(from_sqlx)?;
        let heads: Vec<StateRow> = sqlx::query_as(concat!(
            "SELECT ",
            state_columns!(),
            " FROM task_heads h JOIN tasks t ON t.task_id = h.task_id",
            " WHERE h.task_id = ANY($1) ORDER BY h.task_id FOR UPDATE OF h"
        ))
        .bind(&ids)
        .fetch_all(&mut *tx)
        .traced("SELECT task_heads tasks")
        .await
        .map_err(from_sqlx)?;
        let mut states: HashMap<TaskId, TaskState> = HashMap::with_capacity(heads.len());
        for row in heads {
            let state = TaskState::try_from(row)?;
            states.insert(state.task_id, state);
        }
        // FOR SHARE: a concurrent re-claim (generation bump) waits for this batch.
        let partitions: Vec<(
            uuid::Uuid,
            Option<uuid::Uuid>,
            i64,
            Option<serde_json::Value>,
        )> = sqlx::query_as(
            "SELECT t.task_id, p.owner_node, p.generation, t.metadata->'restart' \
                 FROM tasks t JOIN partitions p ON p.partition = t.partition \
                 WHERE t.task_id = ANY($1) ORDER BY p.partition FOR SHARE OF p",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .traced("SELECT partitions tasks")
        .await
        .map_err(from_sqlx)?;
        let partitions: HashMap<TaskId, (Option<uuid::Uuid>, i64, Option<serde_json::Value>)> =
            partitions
                .into_iter()
                .map(|(t, o, g, r)| (TaskId(t), (o, g, r)))
                .collect();

        // In this transaction, so the answer holds until it commits: a recorder whose
        // lock session is gone writes nothing.
        let alive: bool = sqlx::query_scalar(concat!("SELECT ", node_alive_sql!("$1")))
            .bind(owner.0)
            .fetch_one(&mut *tx)
            .traced("SELECT nodes")
            .await
            .map_err(from_sqlx)?;
        if !alive {
            return Ok(items
                .iter()
                .map(|_| Err(Error::NodeFenced(owner)))
                .collect());
        }
        let mut answers: Vec<Option<Result<CrashOutcome, Error>>> =
            (0..items.len()).map(|_| None).collect();
        let mut checked = Vec::new();
        for (index, item) in items.iter().enumerate() {
            let task_id = item.report.task_id;
            let (Some(before), Some((node, generation, restart))) =
                (states.get(&task_id), partitions.get(&task_id))
            else {
                answers[index] = Some(Err(Error::TaskNotFound(task_id)));
                continue;
            };
            if *node != Some(owner.0) || *generation != item.generation {
                answers[index] = Some(Err(Error::StaleGeneration {
                    held: item.generation,
                    current: *generation,
                }));
                continue;
            }
            if before.pod_epoch != item.report.epoch || !before.has_pod() {
                answers[index] = Some(Err(Error::StaleEpoch {
                    held: item.report.epoch,
                    current: before.pod_epoch,
                }));
                continue;
            }
            checked.push((index, policy.tightened_by(restart.as_ref())));
        }
        if checked.is_empty() {
            // Nothing to write; dropping the transaction releases the locks.
            return Ok(answered(answers));
        }

        let inserted: Vec<uuid::Uuid> = {
            let rows = checked.iter().map(|(i, _)| &items[*i].report);
            let (mut t, mut e, mut n, mut r, mut k) = (vec![], vec![], vec![], vec![], vec![]);
            for report in rows {
                t.push(report.task_id.as_uuid());
                e.push(report.epoch);
                n.push(report.node.map(|n| n.0));
                r.push(report.reason.clone());
                k.push(report.kind.as_str());
            }
            sqlx::query_scalar(
                "INSERT INTO pod_crashes (task_id, epoch, node, reason, kind) \
                 SELECT * FROM UNNEST($1::uuid[], $2::int8[], $3::uuid[], $4::text[], $5::text[]) \
                 LIMIT cardinality($1::uuid[]) \
                 ON CONFLICT DO NOTHING RETURNING task_id",
            )
            .bind(t)
            .bind(e)
            .bind(n)
            .bind(r)
            .bind(k)
            .fetch_all(&mut *tx)
            .traced("INSERT pod_crashes")
            .await
            .map_err(from_sqlx)?
        };
        let inserted: std::collections::HashSet<TaskId> =
            inserted.into_iter().map(TaskId).collect();

        // The crashes within each budgeted task's own window, this one included.
        let budgeted: Vec<(TaskId, f64)> = checked
            .iter()
            .filter(|(i, _)| {
                let report = &items[*i].report;
                inserted.contains(&report.task_id)
                    && report.kind != CrashKind::Interrupted
                    && states
                        .get(&report.task_id)
                        .is_some_and(|s| s.status == Status::Active)
            })
            .map(|(i, p)| (items[*i].report.task_id, p.window.as_secs_f64()))
            .collect();
        let counts: Vec<(uuid::Uuid, i64, i64)> = if budgeted.is_empty() {
            Vec::new()
        } else {
            sqlx::query_as(
                "SELECT c.task_id, count(*) FILTER (WHERE c.kind = 'handler'), \
                    count(*) FILTER (WHERE c.kind = 'node_lost') \
             FROM UNNEST($1::uuid[], $2::float8[]) AS w(task_id, window_s) \
             JOIN pod_crashes c ON c.task_id = w.task_id \
             WHERE c.at > now() - make_interval(secs => w.window_s) \
             GROUP BY c.task_id",
            )
            .bind(
                budgeted
                    .iter()
                    .map(|(t, _)| t.as_uuid())
                    .collect::<Vec<_>>(),
            )
            .bind(budgeted.iter().map(|(_, w)| *w).collect::<Vec<_>>())
            .fetch_all(&mut *tx)
            .traced("SELECT pod_crashes")
            .await
            .map_err(from_sqlx)?
        };
        let counts: HashMap<TaskId, (i64, i64)> = counts
            .into_iter()
            .map(|(t, h, l)| (TaskId(t), (h, l)))
            .collect();

        let mut decided = Vec::new();
        for (index, policy) in checked {
            let item = &items[index];
            let report = &item.report;
            if !inserted.contains(&report.task_id) {
                answers[index] = Some(Ok(CrashOutcome::AlreadyRecorded));
                continue;
            }
            let Some(before) = states.get(&report.task_id) else {
                continue;
            };
            let counts = counts.get(&report.task_id).copied().unwrap_or((0, 0));
            let (events, outcome, delay) =
                decide_crash(before, report, &policy, counts, item.jitter);
            let delay = delay.map(|d| d.as_secs_f64());
            let after = events
                .iter()
                .try_fold(before.clone(), |s, e| evolve(&s, e))?;
            decided.push(Decided {
                index,
                before: before.clone(),
                after,
                events,
                metadata: EventMetadata {
                    epoch: Some(report.epoch),
                    ..item.metadata.clone()
                },
                outcome,
                delay,
            });
        }

        let changes: Vec<Change<'_>> = decided
            .iter()
            .map(|d| Change {
                before: &d.before,
                after: &d.after,
                events: &d.events,
                metadata: &d.metadata,
            })
            .collect();
        let listed = if changes.is_empty() {
            Vec::new()
        } else {
            write_many(&mut tx, &changes).await?
        };
        let delayed: Vec<(uuid::Uuid, f64)> = decided
            .iter()
            .filter_map(|d| d.delay.map(|s| (d.before.task_id.as_uuid(), s)))
            .collect();
        let restarts: Vec<(uuid::Uuid, DateTime<Utc>)> = if delayed.is_empty() {
            Vec::new()
        } else {
            sqlx::query_as(
                "UPDATE task_heads h SET not_before = now() + make_interval(secs => d.delay_s) \
             FROM (SELECT * FROM UNNEST($1::uuid[], $2::float8[]) LIMIT cardinality($1::uuid[])) \
                  AS d(task_id, delay_s) \
             WHERE h.task_id = d.task_id RETURNING h.task_id, h.not_before",
            )
            .bind(delayed.iter().map(|(t, _)| *t).collect::<Vec<_>>())
            .bind(delayed.iter().map(|(_, s)| *s).collect::<Vec<_>>())
            .fetch_all(&mut *tx)
            .traced("UPDATE task_heads")
            .await
            .map_err(from_sqlx)?
        };
        let restarts: HashMap<TaskId, DateTime<Utc>> = restarts
            .into_iter()
            .map(|(t, at)| (TaskId(t), at))
            .collect();
        tx.commit().traced("COMMIT").await.map_err(from_sqlx)?;
        self.announce(&committed::join(
            decided.iter().filter_map(|d| {
                let last = d.events.last()?;
                Some((
                    &d.after,
                    last.type_name(),
                    d.metadata.traceparent.as_deref(),
                ))
            }),
            &listed,
        ));

        for d in decided {
            record_commit("worker", started, &d.before, &d.after);
            let outcome = match (d.delay, restarts.get(&d.before.task_id)) {
                (Some(delay), Some(at)) => CrashOutcome::Restart {
                    not_before: *at,
                    after: std::time::Duration::from_secs_f64(delay),
                },
                _ => d.outcome,
            };
            answers[d.index] = Some(Ok(outcome));
        }
        Ok(answered(answers))
    }
}

/// Every item's answer; an item the batch did not answer would be a bug, and says so.
fn answered(answers: Vec<Option<Result<CrashOutcome, Error>>>) -> Vec<Result<CrashOutcome, Error>> {
    answers
        .into_iter()
        .map(|a| {
            a.unwrap_or_else(|| {
                Err(Error::Internal(
                    "crash batch left an item unanswered".into(),
                ))
            })
        })
        .collect()
}
