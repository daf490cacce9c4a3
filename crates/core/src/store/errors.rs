//! The one place driver errors and SQLSTATEs become domain errors.

use crate::error::Error;

/// Maps a sqlx error. Anything that means "Postgres is not answering us right now" is
/// StoreUnavailable (retryable); a unique violation on an events key is a version
/// conflict; the rest is internal and logged.
pub(crate) fn from_sqlx(err: sqlx::Error) -> Error {
    match &err {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => Error::StoreUnavailable(err.to_string()),
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            match code.as_str() {
                // unique_violation: only the events key can race (heads are locked).
                "23505" if db.constraint().is_some_and(|c| c.starts_with("events")) => {
                    Error::VersionConflict {
                        expected: -1,
                        actual: -1,
                    }
                }
                // query_canceled (statement_timeout), lock_not_available (lock_timeout),
                // admin/crash shutdown, cannot_connect_now, too_many_connections, and
                // the connection exception class: all transient.
                "57014" | "55P03" | "57P01" | "57P02" | "57P03" | "53300" => {
                    Error::StoreUnavailable(db.message().to_owned())
                }
                c if c.starts_with("08") => Error::StoreUnavailable(db.message().to_owned()),
                // serialization_failure, deadlock_detected: retrying succeeds.
                "40001" | "40P01" => Error::StoreUnavailable(db.message().to_owned()),
                _ => internal(err),
            }
        }
        _ => internal(err),
    }
}

fn internal(err: sqlx::Error) -> Error {
    tracing::error!(error = %err, "unexpected database error");
    Error::Internal(err.to_string())
}

/// A row or value that does not decode into the domain: a broken invariant.
pub(crate) fn corrupt(what: impl std::fmt::Display) -> Error {
    tracing::error!(%what, "stored data does not fit the domain");
    Error::Internal(what.to_string())
}

/// How a failed call is named on its span: `error.type` (the SQLSTATE when the server
/// answered, else the driver's failure) and `db.response.status_code`.
pub(crate) fn span_error(err: &sqlx::Error) -> (String, Option<String>) {
    match err {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned());
            (code.clone().unwrap_or_else(|| "database".into()), code)
        }
        sqlx::Error::PoolTimedOut => ("pool_timed_out".into(), None),
        sqlx::Error::PoolClosed => ("pool_closed".into(), None),
        sqlx::Error::Io(_) => ("io".into(), None),
        sqlx::Error::Tls(_) => ("tls".into(), None),
        sqlx::Error::RowNotFound => ("row_not_found".into(), None),
        _ => ("_OTHER".into(), None),
    }
}
