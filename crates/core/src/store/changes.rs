//! Change feeds that are safe against commit order, for watch streams and resume.
//!
//! Events record the id of the transaction that wrote them. Transaction ids are
//! assigned when a transaction first writes, not when it commits, so "events since
//! position N" can skip one that commits late. Every transaction below a snapshot's
//! `xmin` has finished, though: a reader that only serves the range `[from, xmin)` and
//! then continues from `xmin` sees every committed change exactly once per range.

use tracing::instrument;

use super::Store;
use super::errors::from_sqlx;
use chrono::{DateTime, Utc};

use super::query::{RecordedEvent, TaskFilter, View, push_filter, select_tasks};
use super::rows::{TaskRow, task_columns};
use super::traced::Traced as _;
use crate::domain::{Task, TaskId};
use crate::error::Error;

impl Store {
    /// The current snapshot's xmin: every transaction with a lower id has finished.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    pub async fn watermark(&self) -> Result<u64, Error> {
        let text: String =
            sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
                .fetch_one(&self.pool)
                .traced("SELECT pg_snapshot_xmin")
                .await
                .map_err(from_sqlx)?;
        text.parse()
            .map_err(|_| Error::Internal(format!("unexpected xmin {text:?}")))
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

    /// The events of `ids` written by transactions below `mark`, by task and version:
    /// each task's stream as a watch stream resumed at `mark` last showed it.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    #[instrument(skip_all, fields(ids = ids.len(), mark))]
    pub async fn events_before(
        &self,
        ids: &[TaskId],
        mark: u64,
    ) -> Result<Vec<RecordedEvent>, Error> {
        type Row = (
            uuid::Uuid,
            i64,
            String,
            serde_json::Value,
            serde_json::Value,
            DateTime<Utc>,
        );
        let uuids: Vec<uuid::Uuid> = ids.iter().map(TaskId::as_uuid).collect();
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT stream_id, version, type, data, metadata, recorded_at FROM events \
             WHERE stream_id = ANY($1) AND tx_id < $2::text::xid8 ORDER BY stream_id, version",
        )
        .bind(uuids)
        .bind(mark.to_string())
        .fetch_all(&self.pool)
        .traced("SELECT events")
        .await
        .map_err(from_sqlx)?;
        rows.into_iter()
            .map(|(id, version, ty, data, metadata, recorded_at)| {
                RecordedEvent::decode(TaskId(id), version, &ty, data, metadata, recorded_at)
            })
            .collect()
    }
}
