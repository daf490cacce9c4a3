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
    claim_many(tx, std::slice::from_ref(key))
        .await?
        .pop()
        .unwrap_or_else(|| Err(Error::Internal("a claim went unanswered".into())))
}

/// Claims every key in one statement (and reads the ones already taken in a second):
/// each key's own [`claim`] answer, in order. The keys must differ. They are inserted
/// in key order, so two transactions claiming some of the same keys wait for one
/// another instead of deadlocking.
pub(crate) async fn claim_many(
    tx: &mut Transaction<'_, Postgres>,
    keys: &[Key<'_>],
) -> Result<Vec<Result<Claim, Error>>, Error> {
    let principals: Vec<&str> = keys.iter().map(|k| k.principal).collect();
    let request_ids: Vec<&str> = keys.iter().map(|k| k.request_id).collect();
    let methods: Vec<&str> = keys.iter().map(|k| k.method).collect();
    let hashes: Vec<&[u8]> = keys.iter().map(|k| k.hash.as_slice()).collect();
    let claimed: Vec<(String, String)> = sqlx::query_as(
        "INSERT INTO idempotency_keys (principal, request_id, method, request_hash) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bytea[]) \
             AS k(principal, request_id, method, request_hash) \
          ORDER BY principal, request_id \
         ON CONFLICT DO NOTHING RETURNING principal, request_id",
    )
    .bind(&principals)
    .bind(&request_ids)
    .bind(&methods)
    .bind(&hashes)
    .fetch_all(&mut **tx)
    .traced("INSERT idempotency_keys")
    .await
    .map_err(from_sqlx)?;
    let fresh: std::collections::HashSet<(&str, &str)> = claimed
        .iter()
        .map(|(p, r)| (p.as_str(), r.as_str()))
        .collect();
    let taken: Vec<&Key<'_>> = keys
        .iter()
        .filter(|k| !fresh.contains(&(k.principal, k.request_id)))
        .collect();
    // A new statement: it sees the keys whose first request committed while the
    // INSERT waited for it.
    let stored: Vec<TakenKey> = if taken.is_empty() {
        Vec::new()
    } else {
        sqlx::query_as(
            "SELECT principal, request_id, method, request_hash, response \
                   FROM idempotency_keys \
                  WHERE (principal, request_id) IN \
                        (SELECT * FROM UNNEST($1::text[], $2::text[]))",
        )
        .bind(taken.iter().map(|k| k.principal).collect::<Vec<_>>())
        .bind(taken.iter().map(|k| k.request_id).collect::<Vec<_>>())
        .fetch_all(&mut **tx)
        .traced("SELECT idempotency_keys")
        .await
        .map_err(from_sqlx)?
    };
    Ok(keys
        .iter()
        .map(|key| {
            if fresh.contains(&(key.principal, key.request_id)) {
                return Ok(Claim::Fresh);
            }
            let row = stored
                .iter()
                .find(|t| t.principal == key.principal && t.request_id == key.request_id)
                .map(|t| (t.method.as_str(), t.request_hash.as_slice(), &t.response));
            judge(key, row)
        })
        .collect())
}

/// A key some earlier request holds.
#[derive(sqlx::FromRow)]
struct TakenKey {
    principal: String,
    request_id: String,
    method: String,
    request_hash: Vec<u8>,
    response: Option<serde_json::Value>,
}

/// What a key already taken answers: the stored response of the same request, or a
/// refusal when the id named another request.
fn judge(
    key: &Key<'_>,
    stored: Option<(&str, &[u8], &Option<serde_json::Value>)>,
) -> Result<Claim, Error> {
    match stored {
        Some((method, hash, Some(response))) if method == key.method && hash == key.hash => {
            Ok(Claim::Replay(response.clone()))
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
    record_many(tx, &[(key, response)]).await
}

/// Stores each fresh key's response, in one statement.
pub(crate) async fn record_many<R: Serialize>(
    tx: &mut Transaction<'_, Postgres>,
    responses: &[(&Key<'_>, R)],
) -> Result<(), Error> {
    let values = responses
        .iter()
        .map(|(_, r)| serde_json::to_value(r))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Internal(format!("serialising response: {e}")))?;
    sqlx::query(
        "UPDATE idempotency_keys k SET response = r.response \
           FROM UNNEST($1::text[], $2::text[], $3::jsonb[]) AS r(principal, request_id, response) \
          WHERE k.principal = r.principal AND k.request_id = r.request_id",
    )
    .bind(
        responses
            .iter()
            .map(|(k, _)| k.principal)
            .collect::<Vec<_>>(),
    )
    .bind(
        responses
            .iter()
            .map(|(k, _)| k.request_id)
            .collect::<Vec<_>>(),
    )
    .bind(values)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key(hash: u8) -> Key<'static> {
        Key {
            principal: "alice",
            request_id: "r1",
            method: "create_task",
            hash: vec![hash],
        }
    }

    #[test]
    fn a_taken_key_replays_its_own_request_and_refuses_any_other() {
        let response = Some(serde_json::json!({"task_ids": []}));
        assert!(matches!(
            judge(&key(1), Some(("create_task", &[1], &response))),
            Ok(Claim::Replay(_))
        ));
        for other in [
            judge(&key(1), Some(("create_task", &[2], &response))),
            judge(&key(1), Some(("create_tasks", &[1], &response))),
            // Taken by a request that did not record its answer: never a replay.
            judge(&key(1), Some(("create_task", &[1], &None))),
        ] {
            assert!(matches!(other, Err(Error::IdempotencyKeyReused { .. })));
        }
        assert!(matches!(
            judge(&key(1), None),
            Err(Error::StoreUnavailable(_))
        ));
    }
}
