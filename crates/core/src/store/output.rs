//! Handler output: a chunked stream per pod epoch, kept apart from the event stream and
//! never folded into state.

use super::Store;
use super::errors::from_sqlx;
use super::traced::Traced as _;
use crate::domain::TaskId;
use crate::error::Error;

/// One stored chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputChunk {
    pub epoch: i64,
    pub seq: i32,
    pub stream: String,
    pub data: Vec<u8>,
}

impl Store {
    /// Stores one chunk; `(task, epoch, seq)` is unique, so a retried write is a no-op.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    pub async fn append_output(
        &self,
        task_id: TaskId,
        epoch: i64,
        seq: i32,
        stream: &str,
        data: &[u8],
    ) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO task_output (task_id, epoch, seq, stream, data) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT DO NOTHING",
        )
        .bind(task_id.as_uuid())
        .bind(epoch)
        .bind(seq)
        .bind(stream)
        .bind(data)
        .execute(&self.pool).traced("INSERT task_output")
        .await
        .map_err(from_sqlx)?;
        Ok(())
    }

    /// A task's output, oldest first.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    pub async fn read_output(&self, task_id: TaskId) -> Result<Vec<OutputChunk>, Error> {
        let rows: Vec<(i64, i32, String, Vec<u8>)> = sqlx::query_as(
            "SELECT epoch, seq, stream, data FROM task_output WHERE task_id = $1 ORDER BY epoch, seq",
        )
        .bind(task_id.as_uuid())
        .fetch_all(&self.pool).traced("SELECT task_output")
        .await
        .map_err(from_sqlx)?;
        Ok(rows
            .into_iter()
            .map(|(epoch, seq, stream, data)| OutputChunk {
                epoch,
                seq,
                stream,
                data,
            })
            .collect())
    }
}
