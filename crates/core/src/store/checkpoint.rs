//! Handler checkpoints: a pod saves its handler's state on the head, so the next pod of
//! the task loads the checkpoint plus the events after it instead of replaying the
//! whole stream. Fenced by epoch and node; the update touches no indexed column (HOT).

use super::Store;
use super::errors::from_sqlx;
use super::keys::node_alive_sql;
use super::traced::Traced as _;
use crate::domain::TaskId;
use crate::error::Error;

/// A saved handler state and the stream version it reflects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub version: i64,
    pub state: serde_json::Value,
}

impl Checkpoint {
    /// The checkpoint as `task_heads.handler_state` holds it (`{"version", "state"}`).
    pub(crate) fn from_saved(saved: serde_json::Value) -> Self {
        let version = saved
            .get("version")
            .and_then(serde_json::Value::as_i64)
            .unwrap_or(0);
        let state = saved
            .get("state")
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        Self { version, state }
    }
}

impl Store {
    /// Saves `state` as of `version` for the pod holding `epoch`.
    ///
    /// # Errors
    /// [`Error::StaleEpoch`] when another pod owns the task now; [`Error::NodeFenced`]
    /// when the pod's node lost its lock session; [`Error::StoreUnavailable`].
    pub async fn save_checkpoint(
        &self,
        task_id: TaskId,
        epoch: i64,
        version: i64,
        state: &serde_json::Value,
    ) -> Result<(), Error> {
        let n = sqlx::query(concat!(
            "UPDATE task_heads h SET handler_state = jsonb_build_object('version', $3::bigint, 'state', $4::jsonb) \
             WHERE task_id = $1 AND pod_epoch = $2 AND pod_state <> 'none' AND ",
            node_alive_sql!("h.owner_node"),
        ))
        .bind(task_id.as_uuid())
        .bind(epoch)
        .bind(version)
        .bind(state)
        .execute(&self.pool).traced("UPDATE task_heads")
        .await
        .map_err(from_sqlx)?
        .rows_affected();
        if n == 1 {
            return Ok(());
        }
        Err(self.refused_pod_write(task_id, epoch).await)
    }

    /// The task's last checkpoint, if a handler saved one.
    ///
    /// # Errors
    /// [`Error::TaskNotFound`]; [`Error::StoreUnavailable`].
    pub async fn load_checkpoint(&self, task_id: TaskId) -> Result<Option<Checkpoint>, Error> {
        let row: Option<Option<serde_json::Value>> =
            sqlx::query_scalar("SELECT handler_state FROM task_heads WHERE task_id = $1")
                .bind(task_id.as_uuid())
                .fetch_optional(&self.pool)
                .traced("SELECT task_heads")
                .await
                .map_err(from_sqlx)?;
        let Some(saved) = row.ok_or(Error::TaskNotFound(task_id))? else {
            return Ok(None);
        };
        Ok(Some(Checkpoint::from_saved(saved)))
    }
}
