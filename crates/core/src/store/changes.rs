//! Change feeds that are safe against commit order, for watch streams and resume.
//!
//! Events record the id of the transaction that wrote them. Transaction ids are
//! assigned when a transaction first writes, not when it commits, so "events since
//! position N" can skip one that commits late. Every transaction of this database below
//! the oldest one still running has finished, though: a reader that only serves the
//! range `[from, watermark)` and then continues from the watermark sees every committed
//! change exactly once per range.

use tracing::instrument;

use super::Store;
use super::errors::from_sqlx;
use chrono::{DateTime, Utc};

use super::query::{RecordedEvent, TaskFilter, View, push_filter, select_tasks};
use super::rows::{TaskRow, task_columns};
use super::traced::Traced as _;
use crate::domain::{Task, TaskId};
use crate::error::Error;
use crate::telemetry::metrics::metrics;

/// The oldest running transaction of this database (or the snapshot's `xmax` when there
/// is none), and for how long it has been running. `pg_snapshot_xip` lists only
/// top-level transactions, which is what events record (`pg_current_xact_id()`).
const WATERMARK: &str = "\
WITH snap AS (SELECT pg_current_snapshot() AS s), \
ours AS ( \
    SELECT backend_xid AS xid, xact_start AS since FROM pg_stat_activity \
     WHERE datname = current_database() AND backend_xid IS NOT NULL \
    UNION ALL \
    SELECT transaction, prepared FROM pg_prepared_xacts WHERE database = current_database() \
), running AS ( \
    SELECT x, o.since FROM snap, pg_snapshot_xip(snap.s) AS x \
      JOIN ours o ON o.xid = xid(x) \
) \
SELECT COALESCE((SELECT min(x) FROM running), pg_snapshot_xmax(snap.s))::text, \
       (SELECT extract(epoch FROM clock_timestamp() - min(since))::float8 FROM running) \
  FROM snap";

impl Store {
    /// The change feed's watermark: every transaction of this database with a lower id
    /// has finished, so the range below it is complete.
    ///
    /// Not the snapshot's `xmin`, which is cluster-wide: an open transaction in another
    /// database, or one prepared there, would freeze every feed of this one while it
    /// lasts. The running transactions that count are this database's (in
    /// `pg_stat_activity` and `pg_prepared_xacts`); with none, the snapshot's `xmax`.
    /// A transaction that finishes between the snapshot and the read of
    /// `pg_stat_activity` may be left out: it has committed, and the caller reads its
    /// range in a later statement, which sees it. How long the oldest of them has been
    /// holding the watermark is the `taskpod_change_feed_lag_seconds` gauge.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    pub async fn watermark(&self) -> Result<u64, Error> {
        let (text, held_secs): (String, Option<f64>) = sqlx::query_as(WATERMARK)
            .fetch_one(&self.pool)
            .traced("SELECT pg_current_snapshot")
            .await
            .map_err(from_sqlx)?;
        metrics().change_feed_lag(held_secs.unwrap_or(0.0).max(0.0));
        text.parse()
            .map_err(|_| Error::Internal(format!("unexpected watermark {text:?}")))
    }

    /// The tasks with events written by transactions in `[from, to)`, where `to` is a
    /// watermark read before this call.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    #[instrument(skip_all, fields(from, to))]
    pub async fn changed_tasks(&self, from: u64, to: u64) -> Result<Vec<TaskId>, Error> {
        if from >= to {
            return Ok(Vec::new());
        }
        let ids: Vec<uuid::Uuid> = sqlx::query_scalar(
            "SELECT DISTINCT stream_id FROM events \
             WHERE tx_id >= $1::text::xid8 AND tx_id < $2::text::xid8",
        )
        .bind(from.to_string())
        .bind(to.to_string())
        .fetch_all(&self.pool)
        .traced("SELECT events")
        .await
        .map_err(from_sqlx)?;
        Ok(ids.into_iter().map(TaskId).collect())
    }

    /// Reads several tasks in one query; missing ids are left out.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    pub async fn get_tasks(&self, ids: &[TaskId]) -> Result<Vec<Task>, Error> {
        let ids: Vec<uuid::Uuid> = ids.iter().map(TaskId::as_uuid).collect();
        let rows: Vec<TaskRow> = sqlx::query_as(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks t JOIN task_heads h ON h.task_id = t.task_id WHERE t.task_id = ANY($1)"
        ))
        .bind(ids)
        .fetch_all(&self.pool)
        .traced("SELECT tasks task_heads")
        .await
        .map_err(from_sqlx)?;
        rows.into_iter().map(Task::try_from).collect()
    }

    /// The tasks with events written by transactions from `from` on, committed now or
    /// above any watermark: what changed since a resume point.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    pub async fn changed_since(&self, from: u64) -> Result<Vec<TaskId>, Error> {
        self.changed_tasks(from, u64::MAX).await
    }

    /// The rows among `ids` that match `filter`, or that are in `also` whatever they
    /// match: a watch stream reads the changed tasks it shows or follows, and never the
    /// payload of one it does neither with.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    #[instrument(skip_all, fields(ids = ids.len(), also = also.len()))]
    pub async fn changed_rows(
        &self,
        ids: &[TaskId],
        filter: &TaskFilter,
        also: &[TaskId],
        view: View,
    ) -> Result<Vec<Task>, Error> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let uuids = |ids: &[TaskId]| ids.iter().map(TaskId::as_uuid).collect::<Vec<_>>();
        let mut qb = select_tasks(view);
        qb.push(" AND t.task_id = ANY(")
            .push_bind(uuids(ids))
            .push(") AND ((TRUE");
        push_filter(&mut qb, filter);
        qb.push(") OR t.task_id = ANY(")
            .push_bind(uuids(also))
            .push("))");
        let rows: Vec<TaskRow> = qb
            .build_query_as()
            .fetch_all(&self.pool)
            .traced("SELECT tasks task_heads")
            .await
            .map_err(from_sqlx)?;
        rows.into_iter().map(Task::try_from).collect()
    }

    /// The rows of the tasks changed by transactions in `[from, to)` that match `filter`,
    /// or that are in `also` whatever they match, in one statement: a narrow stream
    /// reads only what it shows or follows, never the ids of every task changed in the
    /// cluster (`changed_tasks` then `changed_rows` carries those both ways).
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    #[instrument(skip_all, fields(from, to, also = also.len()))]
    pub async fn changed_rows_between(
        &self,
        from: u64,
        to: u64,
        filter: &TaskFilter,
        also: &[TaskId],
        view: View,
    ) -> Result<Vec<Task>, Error> {
        if from >= to {
            return Ok(Vec::new());
        }
        let also: Vec<uuid::Uuid> = also.iter().map(TaskId::as_uuid).collect();
        let mut qb = select_tasks(view);
        qb.push(
            " AND t.task_id IN (SELECT stream_id FROM events \
             WHERE tx_id >= ",
        )
        .push_bind(from.to_string())
        .push("::text::xid8 AND tx_id < ")
        .push_bind(to.to_string())
        .push("::text::xid8) AND ((TRUE");
        push_filter(&mut qb, filter);
        qb.push(") OR t.task_id = ANY(").push_bind(also).push("))");
        let rows: Vec<TaskRow> = qb
            .build_query_as()
            .fetch_all(&self.pool)
            .traced("SELECT tasks task_heads events")
            .await
            .map_err(from_sqlx)?;
        rows.into_iter().map(Task::try_from).collect()
    }

    /// The events of `ids` written by transactions below `mark`, or recorded no later
    /// than `until`, by task and version, each with whether it is below the mark:
    /// each task's stream as a watch stream resumed at `mark` (its token issued at
    /// `until`) may have shown it.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    #[instrument(skip_all, fields(ids = ids.len(), mark))]
    pub async fn events_before(
        &self,
        ids: &[TaskId],
        mark: u64,
        until: Option<DateTime<Utc>>,
    ) -> Result<Vec<(RecordedEvent, bool)>, Error> {
        type Row = (
            uuid::Uuid,
            i64,
            String,
            serde_json::Value,
            serde_json::Value,
            DateTime<Utc>,
            bool,
        );
        let uuids: Vec<uuid::Uuid> = ids.iter().map(TaskId::as_uuid).collect();
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT stream_id, version, type, data, metadata, recorded_at, \
                    tx_id < $2::text::xid8 FROM events \
             WHERE stream_id = ANY($1) \
               AND (tx_id < $2::text::xid8 OR recorded_at <= $3) \
             ORDER BY stream_id, version",
        )
        .bind(uuids)
        .bind(mark.to_string())
        .bind(until)
        .fetch_all(&self.pool)
        .traced("SELECT events")
        .await
        .map_err(from_sqlx)?;
        rows.into_iter()
            .map(|(id, version, ty, data, metadata, recorded_at, below)| {
                RecordedEvent::decode(TaskId(id), version, &ty, data, metadata, recorded_at)
                    .map(|e| (e, below))
            })
            .collect()
    }
}
