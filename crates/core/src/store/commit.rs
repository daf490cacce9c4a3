//! Commits whose answer may never come, and how their outcome is learnt.
//!
//! A COMMIT whose connection drops (or goes silent) before the answer arrives may have
//! committed or not: the client cannot tell from the error. Replaying the work would
//! do it twice if it had committed; reporting a failure would lie if it had. So a
//! transaction that may need this learns its own id and session first (for free, in a
//! statement it runs anyway: see `xact_columns!`), and when its COMMIT fails without
//! an answer from Postgres, another connection asks Postgres what became of it
//! (`pg_xact_status`). A transaction still open then belongs to a session its client
//! has given up on (a partition, a silent connection): that session is ended, which
//! settles the transaction one way or the other, and frees the rows and request ids it
//! holds now rather than when Postgres notices the client is gone.

use sqlx::{PgPool, Postgres, Transaction};

use super::errors::from_sqlx;
use super::traced::Traced as _;
use crate::error::Error;

/// The select-list items naming the current transaction and session, as read into
/// [`Xact`]: add them to a statement the transaction runs anyway.
macro_rules! xact_columns {
    () => {
        "pg_current_xact_id()::text::int8, pg_backend_pid()"
    };
}
pub(crate) use xact_columns;

/// How long ending a stuck session may wait for it to be gone.
const END_SESSION_WAIT_MS: i64 = 1_000;

/// A transaction as Postgres names it: enough to ask later whether it committed, and
/// to end its session while it is still open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Xact {
    /// `pg_current_xact_id()`: an xid8, which never wraps.
    pub id: i64,
    /// `pg_backend_pid()` of the session running it.
    pub backend: i32,
}

/// What became of a transaction, as `pg_xact_status` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fate {
    Committed,
    Aborted,
    /// Still open: its session has not sent (or Postgres has not read) its COMMIT yet.
    Open,
    /// Too old for Postgres to remember.
    Forgotten,
}

impl Fate {
    pub(crate) fn of(status: Option<&str>) -> Self {
        match status {
            Some("committed") => Fate::Committed,
            Some("aborted") => Fate::Aborted,
            Some(_) => Fate::Open,
            None => Fate::Forgotten,
        }
    }
}

/// Why a transaction is not known to have committed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CommitError {
    /// It did not commit and never will: the work may be done again.
    #[error(transparent)]
    NotCommitted(Error),
    /// It may have committed; that could not be learnt within the call bound.
    #[error("the outcome is unknown: {0}")]
    Unknown(Error),
}

impl CommitError {
    /// The answer for a caller: an unknown outcome is unavailable (retry, with a
    /// request id to be safe), never a failure that did not happen.
    pub(crate) fn into_error(self) -> Error {
        match self {
            CommitError::NotCommitted(e) => e,
            CommitError::Unknown(e) => unknown_outcome(&e),
        }
    }
}

/// What each caller of a transaction whose outcome is unknown is told.
pub(crate) fn unknown_outcome(cause: &Error) -> Error {
    Error::StoreUnavailable(format!("outcome unknown: {cause}"))
}

/// Commits `tx` (which is `xact`); when the COMMIT gets no answer, learns from
/// another connection whether it committed.
pub(crate) async fn commit(
    pool: &PgPool,
    tx: Transaction<'_, Postgres>,
    xact: Xact,
) -> Result<(), CommitError> {
    let err = match tx.commit().traced("COMMIT").await {
        Ok(()) => return Ok(()),
        // Postgres answered: it refused the commit, and the transaction is over.
        Err(e @ sqlx::Error::Database(_)) => return Err(CommitError::NotCommitted(from_sqlx(e))),
        Err(e) => from_sqlx(e),
    };
    match settle(pool, xact).await {
        Ok(Fate::Committed) => {
            tracing::warn!(error = %err, "the COMMIT's answer was lost; it committed");
            Ok(())
        }
        Ok(Fate::Aborted) => Err(CommitError::NotCommitted(err)),
        Ok(Fate::Open | Fate::Forgotten) => Err(CommitError::Unknown(err)),
        Err(e) => {
            tracing::warn!(error = %e, "could not learn the fate of a lost COMMIT");
            Err(CommitError::Unknown(err))
        }
    }
}

/// The fate of `xact`, after ending its session if it was still open.
async fn settle(pool: &PgPool, xact: Xact) -> Result<Fate, Error> {
    let first = fate(pool, xact).await?;
    if first != Fate::Open {
        return Ok(first);
    }
    end_session(pool, xact).await?;
    fate(pool, xact).await
}

async fn fate(pool: &PgPool, xact: Xact) -> Result<Fate, Error> {
    let status: Option<String> = sqlx::query_scalar("SELECT pg_xact_status($1::int8::text::xid8)")
        .bind(xact.id)
        .fetch_one(pool)
        .traced("SELECT pg_xact_status")
        .await
        .map_err(from_sqlx)?;
    Ok(Fate::of(status.as_deref()))
}

/// Ends the session running `xact`, if it still is (a pid alone may be reused), and
/// waits a little for it to be gone: its transaction then has a final fate.
async fn end_session(pool: &PgPool, xact: Xact) -> Result<(), Error> {
    sqlx::query(
        "SELECT pg_terminate_backend(pid, $3) FROM pg_stat_activity \
          WHERE pid = $1 AND backend_xid = xid($2::int8::text::xid8)",
    )
    .bind(xact.backend)
    .bind(xact.id)
    .bind(END_SESSION_WAIT_MS)
    .execute(pool)
    .traced("SELECT pg_terminate_backend")
    .await
    .map_err(from_sqlx)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_postgres_gives_has_a_fate() {
        assert_eq!(Fate::of(Some("committed")), Fate::Committed);
        assert_eq!(Fate::of(Some("aborted")), Fate::Aborted);
        assert_eq!(Fate::of(Some("in progress")), Fate::Open);
        assert_eq!(Fate::of(None), Fate::Forgotten);
    }

    #[test]
    fn an_unknown_outcome_is_unavailable_and_a_refusal_stays_what_it_was() {
        let unknown = CommitError::Unknown(Error::StoreUnavailable("reset".into()));
        assert!(
            matches!(unknown.into_error(), Error::StoreUnavailable(m) if m.contains("outcome unknown"))
        );
        let refused = CommitError::NotCommitted(Error::Internal("x".into()));
        assert!(matches!(refused.into_error(), Error::Internal(_)));
    }

    async fn open_xact(tx: &mut Transaction<'_, Postgres>) -> Xact {
        let (id, backend): (i64, i32) = sqlx::query_as(concat!("SELECT ", xact_columns!()))
            .fetch_one(&mut **tx)
            .await
            .expect("name the transaction");
        Xact { id, backend }
    }

    #[sqlx::test(migrations = false)]
    async fn a_transaction_left_open_is_ended_and_then_known_aborted(pool: PgPool) {
        let mut stuck = pool.begin().await.expect("begin");
        let xact = open_xact(&mut stuck).await;
        assert_eq!(fate(&pool, xact).await.expect("status"), Fate::Open);
        // Its client went quiet here, as behind a silent connection.
        assert_eq!(settle(&pool, xact).await.expect("settle"), Fate::Aborted);
        assert!(
            sqlx::query("SELECT 1").execute(&mut *stuck).await.is_err(),
            "its session was ended"
        );
    }

    #[sqlx::test(migrations = false)]
    async fn a_committed_transaction_is_known_committed_and_its_session_kept(pool: PgPool) {
        let mut conn = pool.acquire().await.expect("acquire");
        let mut tx = sqlx::Connection::begin(&mut *conn).await.expect("begin");
        let xact = open_xact(&mut tx).await;
        tx.commit().await.expect("commit");
        assert_eq!(settle(&pool, xact).await.expect("settle"), Fate::Committed);
        sqlx::query("SELECT 1")
            .execute(&mut *conn)
            .await
            .expect("the session lives on");
    }
}
