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
}
