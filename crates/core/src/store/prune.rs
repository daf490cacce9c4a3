//! Deleting old rows in small batches.
//!
//! One unbounded `DELETE` of a table that grew for months runs into
//! `statement_timeout` and never catches up, and while it runs it holds a transaction id
//! that keeps the change feed's watermark (`Store::watermark`) from moving, which stalls
//! every watch stream and every worker's tick. Each batch here is its own short
//! statement, so neither happens, however far behind the prune is.

use std::time::Duration;

use sqlx::PgPool;

use super::errors::from_sqlx;
use super::traced::Traced as _;
use crate::error::Error;

/// Rows one statement deletes at most.
pub(crate) const BATCH: i64 = 1_000;

/// Runs `delete` (a statement taking the age as `$1` in seconds and the batch size as
/// `$2`) until a batch deletes fewer rows than asked. Returns how many went.
pub(crate) async fn in_batches(
    pool: &PgPool,
    delete: &'static str,
    age: Duration,
    summary: &'static str,
) -> Result<u64, Error> {
    let mut total = 0;
    loop {
        let n = sqlx::query(sqlx::AssertSqlSafe(delete))
            .bind(age.as_secs_f64())
            .bind(BATCH)
            .execute(pool)
            .traced(summary)
            .await
            .map_err(from_sqlx)?
            .rows_affected();
        total += n;
        if n < BATCH as u64 {
            return Ok(total);
        }
    }
}
