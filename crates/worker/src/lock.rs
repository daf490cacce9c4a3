//! The dedicated lock session: one unpooled Postgres connection that holds this node's
//! session advisory locks.
//!
//! Key scheme (two-int advisory keys): `(PARTITION_NAMESPACE, partition)` for partition
//! ownership, `(NODE_NAMESPACE, nodes.lock_key)` for the node's own liveness key. Session
//! locks are re-entrant, so a key already held is never locked again (one unlock would
//! then leave it held); every unlock's result is checked.

use std::collections::HashSet;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions as _, Connection as _};

use crate::settings::LockSettings;

pub use taskpod_core::store::keys::{Key, NODE_NAMESPACE, PARTITION_NAMESPACE};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("lock session: {0}")]
    Db(#[from] sqlx::Error),
    #[error("lock session did not answer within {0:?}")]
    Timeout(Duration),
    #[error("advisory unlock of {0:?} found it not held")]
    NotHeld(Key),
    /// The session failed earlier; the keeper that owned it has ended.
    #[error("lock session lost: {0}")]
    Lost(String),
    /// The keeper is gone (its session was lost or closed).
    #[error("the lock session is gone")]
    Gone,
}

/// The session and the keys it holds. Every call is bounded by the ping timeout: a
/// session that stops answering is treated as lost.
#[derive(Debug)]
pub struct LockSession {
    conn: PgConnection,
    held: HashSet<Key>,
    timeout: Duration,
}

impl LockSession {
    /// Opens the session with keepalives and `tcp_user_timeout` set on the server side of
    /// this connection, so a cut-off worker's session (and its locks) ends in seconds.
    ///
    /// # Errors
    /// When Postgres cannot be reached.
    pub async fn connect(url: &str, settings: &LockSettings) -> Result<Self, LockError> {
        let opts: PgConnectOptions = url.parse()?;
        let idle = settings.keepalive_idle_secs.to_string();
        let interval = settings.keepalive_interval_secs.to_string();
        let count = settings.keepalive_count.to_string();
        let user_timeout = settings.tcp_user_timeout_ms.to_string();
        let idle_timeout = settings.idle_session_timeout_ms.to_string();
        let opts = opts
            .application_name("taskpod-worker-locks")
            .options([
                ("tcp_keepalives_idle", idle.as_str()),
                ("tcp_keepalives_interval", interval.as_str()),
                ("tcp_keepalives_count", count.as_str()),
                ("tcp_user_timeout", user_timeout.as_str()),
                ("idle_session_timeout", idle_timeout.as_str()),
                ("statement_timeout", "0"),
            ])
            // Prepared statements are per connection; this one lives long, so cache.
            .statement_cache_capacity(16);
        let timeout = Duration::from_millis(settings.ping_timeout_ms);
        let conn = tokio::time::timeout(timeout * 5, opts.connect())
            .await
            .map_err(|_| LockError::Timeout(timeout * 5))??;
        Ok(Self {
            conn,
            held: HashSet::new(),
            timeout,
        })
    }

    /// Checks the session answers.
    ///
    /// # Errors
    /// When it does not within the timeout.
    pub async fn ping(&mut self) -> Result<(), LockError> {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.conn.ping())
            .await
            .map_err(|_| LockError::Timeout(timeout))??;
        Ok(())
    }

    /// Takes every free key of `keys` in one statement, and answers the keys this
    /// session holds afterwards (those it already held included). A node taking over a
    /// dead peer's partitions tries dozens at once; one round trip each made a loaded
    /// node's takeover take seconds.
    ///
    /// # Errors
    /// When the session fails: which keys were taken is then unknown, and the session
    /// must be treated as lost.
    pub async fn try_lock_many(&mut self, keys: &[Key]) -> Result<Vec<Key>, LockError> {
        let mut fresh: Vec<Key> = keys
            .iter()
            .copied()
            .filter(|k| !self.held.contains(k))
            .collect();
        // A key listed twice would be locked twice (locks are re-entrant).
        fresh.sort_unstable();
        fresh.dedup();
        if !fresh.is_empty() {
            let (first, second): (Vec<i32>, Vec<i32>) = fresh.into_iter().unzip();
            // The function runs once per row of the unnest, in the WHERE of a plain
            // function scan: nothing else can call it twice or skip it.
            let q = sqlx::query_as::<_, (i32, i32)>(
                "SELECT a, b FROM unnest($1::int4[], $2::int4[]) AS k(a, b) \
                 WHERE pg_try_advisory_lock(a, b)",
            )
            .bind(first)
            .bind(second);
            let timeout = self.timeout;
            let got = tokio::time::timeout(timeout, q.fetch_all(&mut self.conn))
                .await
                .map_err(|_| LockError::Timeout(timeout))??;
            self.held.extend(got);
        }
        Ok(keys
            .iter()
            .copied()
            .filter(|k| self.held.contains(k))
            .collect())
    }

    /// Releases `key`.
    ///
    /// # Errors
    /// [`LockError::NotHeld`] when Postgres says it was not held (a bug or a lost
    /// session); when the session fails.
    pub async fn unlock(&mut self, key: Key) -> Result<(), LockError> {
        if !self.held.remove(&key) {
            return Err(LockError::NotHeld(key));
        }
        let q = sqlx::query_scalar::<_, bool>("SELECT pg_advisory_unlock($1, $2)")
            .bind(key.0)
            .bind(key.1);
        let timeout = self.timeout;
        let released = tokio::time::timeout(timeout, q.fetch_one(&mut self.conn))
            .await
            .map_err(|_| LockError::Timeout(timeout))??;
        if released {
            Ok(())
        } else {
            Err(LockError::NotHeld(key))
        }
    }

    /// Whether another session holds `key`: a shared lock is free only when nobody holds
    /// it exclusively, and it is released at once. Never probe a key this session holds
    /// (locks are re-entrant: the probe would succeed).
    ///
    /// # Errors
    /// When the session fails.
    pub async fn is_held_elsewhere(&mut self, key: Key) -> Result<bool, LockError> {
        debug_assert!(!self.held.contains(&key), "probing our own key");
        let q = sqlx::query_scalar::<_, bool>(
            "SELECT CASE WHEN pg_try_advisory_lock_shared($1, $2) \
             THEN pg_advisory_unlock_shared($1, $2) ELSE false END",
        )
        .bind(key.0)
        .bind(key.1);
        let timeout = self.timeout;
        let free = tokio::time::timeout(timeout, q.fetch_one(&mut self.conn))
            .await
            .map_err(|_| LockError::Timeout(timeout))??;
        Ok(!free)
    }

    pub fn holds(&self, key: Key) -> bool {
        self.held.contains(&key)
    }

    /// Closes the session; Postgres releases whatever it still held.
    pub async fn close(self) {
        let _ = self.conn.close().await;
    }
}
