//! AIP-155 request ids: a retry gets the first response; the same id for a different
//! request is refused.
//!
//! The key row is inserted first thing in the change's transaction, so a concurrent
//! retry blocks on it (unique index) until the first commits, then reads the stored
//! response; if the first rolls back, the retry goes ahead as the first. Failed
//! requests leave no record: nothing changed, so a retry decides afresh.

use std::time::Duration;

use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Postgres, Transaction};

use super::errors::from_sqlx;
use super::traced::Traced as _;
use crate::error::Error;

/// One request's key, scoped to the principal that sent it.
#[derive(Debug)]
pub(crate) struct Key<'a> {
    pub principal: &'a str,
    pub request_id: &'a str,
    pub method: &'static str,
    pub hash: Vec<u8>,
}

impl<'a> Key<'a> {
    /// Hashes what makes the request what it is (its method and semantic fields), so a
    /// retry with a fresh correlation id or trace is still the same request.
    pub fn new(
        principal: &'a str,
        request_id: &'a str,
        method: &'static str,
        request: &impl Serialize,
    ) -> Result<Self, Error> {
        let bytes = serde_json::to_vec(request)
            .map_err(|e| Error::Internal(format!("hashing request: {e}")))?;
        let mut h = Sha256::new();
        h.update(method.as_bytes());
        h.update([0]);
        h.update(&bytes);
        Ok(Self {
            principal,
            request_id,
            method,
            hash: h.finalize().to_vec(),
        })
    }
}

pub(crate) enum Claim {
    /// The id is new: go ahead, then [`record`] the response.
    Fresh,
    /// The id was used for this same request: answer with the stored response.
    Replay(serde_json::Value),
}

pub(crate) async fn claim(
    tx: &mut Transaction<'_, Postgres>,
    key: &Key<'_>,
) -> Result<Claim, Error> {
    let inserted = sqlx::query(
        "INSERT INTO idempotency_keys (principal, request_id, method, request_hash) \
         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
    )
    .bind(key.principal)
    .bind(key.request_id)
    .bind(key.method)
    .bind(&key.hash)
    .execute(&mut **tx)
    .traced("INSERT idempotency_keys")
    .await
    .map_err(from_sqlx)?
    .rows_affected();
    if inserted == 1 {
        return Ok(Claim::Fresh);
    }
    let stored: Option<(String, Vec<u8>, Option<serde_json::Value>)> = sqlx::query_as(
        "SELECT method, request_hash, response FROM idempotency_keys \
         WHERE principal = $1 AND request_id = $2",
    )
    .bind(key.principal)
    .bind(key.request_id)
    .fetch_optional(&mut **tx)
    .traced("SELECT idempotency_keys")
    .await
    .map_err(from_sqlx)?;
    match stored {
        Some((method, hash, Some(response))) if method == key.method && hash == key.hash => {
            Ok(Claim::Replay(response))
        }
        Some(_) => Err(Error::IdempotencyKeyReused {
            request_id: key.request_id.to_owned(),
        }),
        // Pruned between the two statements: vanishingly rare, and retryable.
        None => Err(Error::StoreUnavailable(
            "idempotency key pruned concurrently".into(),
        )),
    }
}

pub(crate) async fn record(
    tx: &mut Transaction<'_, Postgres>,
    key: &Key<'_>,
    response: &impl Serialize,
) -> Result<(), Error> {
    let response = serde_json::to_value(response)
        .map_err(|e| Error::Internal(format!("serialising response: {e}")))?;
    sqlx::query(
        "UPDATE idempotency_keys SET response = $3 WHERE principal = $1 AND request_id = $2",
    )
    .bind(key.principal)
    .bind(key.request_id)
    .bind(response)
    .execute(&mut **tx)
    .traced("UPDATE idempotency_keys")
    .await
    .map_err(from_sqlx)?;
    Ok(())
}

pub(crate) async fn prune(pool: &PgPool, ttl: Duration) -> Result<u64, Error> {
    super::prune::in_batches(
        pool,
        "DELETE FROM idempotency_keys WHERE ctid = ANY(ARRAY( \
             SELECT ctid FROM idempotency_keys \
              WHERE created_at < now() - make_interval(secs => $1) LIMIT $2))",
        ttl,
        "DELETE idempotency_keys",
    )
    .await
}

/// Decodes a stored response.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, Error> {
    serde_json::from_value(value).map_err(|e| Error::Internal(format!("stored response: {e}")))
}
