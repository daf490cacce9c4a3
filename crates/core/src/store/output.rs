//! Handler output: a chunked stream per pod epoch, kept apart from the event stream and
//! never folded into state.

use super::Store;
use super::errors::from_sqlx;
use super::keys::node_alive_sql;
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
    /// Fenced like a pod's appends: only while `epoch` is the task's live pod and its
    /// node holds its claim, so a
    /// chunk that reaches Postgres after its pod's end was recorded (held in a cut
    /// worker's socket, delivered by TCP after the heal) is refused, never stored beside
    /// the next epoch's output.
    ///
    /// # Errors
    /// [`Error::StaleEpoch`] when the epoch is not the task's live pod;
    /// [`Error::NodeFenced`] when the pod's node lost its lock session;
    /// [`Error::StoreUnavailable`].
    pub async fn append_output(
        &self,
        task_id: TaskId,
        epoch: i64,
        seq: i32,
        stream: &str,
        data: &[u8],
    ) -> Result<(), Error> {
        let live: bool = sqlx::query_scalar(concat!(
            "WITH head AS (SELECT pod_epoch = $2 AND pod_state <> 'none' AND ",
            node_alive_sql!("h.owner_node"),
            " AS live FROM task_heads h WHERE task_id = $1), \
                  stored AS (INSERT INTO task_output (task_id, epoch, seq, stream, data) \
                             SELECT $1, $2, $3, $4, $5 WHERE (SELECT live FROM head) \
                             ON CONFLICT DO NOTHING) \
             SELECT COALESCE((SELECT live FROM head), false)",
        ))
        .bind(task_id.as_uuid())
        .bind(epoch)
        .bind(seq)
        .bind(stream)
        .bind(data)
        .fetch_one(&self.pool)
        .traced("INSERT task_output")
        .await
        .map_err(from_sqlx)?;
        if live {
            Ok(())
        } else {
            Err(self.refused_pod_write(task_id, epoch).await)
        }
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
