//! Every statement the store sends runs in a Postgres client span and records
//! `db.client.operation.duration` (see `telemetry::spans`): `.traced("SELECT tasks")`
//! between a query's `fetch_*` and its `.await`. It is also bounded on the client side
//! (see [`super::deadline`]).

use crate::telemetry::spans::{DbSystem, db_call};

use super::deadline::bounded;
use super::errors::span_error;

pub(crate) trait Traced<T>: Future<Output = Result<T, sqlx::Error>> + Sized {
    /// This call as a client span named `summary` (operation and tables, as the
    /// semantic conventions' `db.query.summary`: a literal, never built from input).
    fn traced(self, summary: &'static str) -> impl Future<Output = Result<T, sqlx::Error>> {
        db_call(DbSystem::Postgres, summary, bounded(self), span_error)
    }
}

impl<T, F: Future<Output = Result<T, sqlx::Error>>> Traced<T> for F {}
