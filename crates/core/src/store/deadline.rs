//! Client-side bounds on every store call.
//!
//! `statement_timeout` is Postgres's own bound, and it cannot fire when the network
//! between the two loses every packet: a call on a silent connection then waits for
//! TCP to give up, which takes minutes. So every statement the store sends is also
//! bounded here, by the time it may legitimately take (acquiring a connection, then
//! the statement, plus a little), and a call past it fails as unavailable.
//!
//! A connection whose call was abandoned (past the limit, or dropped by a client's
//! deadline or cancellation) may be silent for good. sqlx tests every
//! connection it gets back with a ping that has no bound of its own, so the pool's
//! `after_release` hook runs a bounded ping first, while calls have been timing out
//! lately, and closes the connection when that ping gets no answer: it is never
//! handed out again. In normal operation the hook costs nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use std::time::Instant;

/// The bound on one call, in milliseconds; 30 s until a store is connected with its
/// settings.
static CALL_LIMIT_MS: AtomicU64 = AtomicU64::new(30_000);

/// When a call last timed out, as milliseconds since `EPOCH` (0: never).
static LAST_TIMEOUT_MS: AtomicU64 = AtomicU64::new(0);

/// How long after a timeout released connections are checked before reuse.
const SUSPECT_FOR: Duration = Duration::from_secs(60);

/// How long a released connection's check may take.
pub(crate) const RELEASE_PING: Duration = Duration::from_secs(1);

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    // At least 1, so that 0 keeps meaning "never".
    (epoch().elapsed().as_millis() as u64).max(1)
}

/// Sets the bound on every call of this process's stores.
pub(crate) fn set_call_limit(limit: Duration) {
    CALL_LIMIT_MS.store(limit.as_millis() as u64, Ordering::Relaxed);
}

pub(crate) fn call_limit() -> Duration {
    Duration::from_millis(CALL_LIMIT_MS.load(Ordering::Relaxed))
}

pub(crate) fn note_timeout() {
    LAST_TIMEOUT_MS.store(now_ms(), Ordering::Relaxed);
}

/// Whether a call timed out lately: released connections are checked before reuse.
pub(crate) fn suspect() -> bool {
    suspect_at(now_ms())
}

fn suspect_at(now_ms: u64) -> bool {
    let last = LAST_TIMEOUT_MS.load(Ordering::Relaxed);
    last != 0 && now_ms.saturating_sub(last) < SUSPECT_FOR.as_millis() as u64
}

/// Marks connections suspect when the call it guards is dropped before it finished
/// (a client's deadline or cancellation abandons it midway just like a timeout does).
struct Abandoned {
    finished: bool,
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        if !self.finished {
            note_timeout();
        }
    }
}

/// Runs `call` within the call limit; past it the call is abandoned as unavailable.
pub(crate) async fn bounded<T>(
    call: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    let limit = call_limit();
    let mut guard = Abandoned { finished: false };
    let answer = tokio::time::timeout(limit, call).await;
    guard.finished = answer.is_ok();
    match answer {
        Ok(result) => result,
        Err(_) => {
            note_timeout();
            Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer from the store within {limit:?}"),
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The state is process-wide: each test looks only at what its own calls changed.

    #[tokio::test(start_paused = true)]
    async fn a_call_past_the_limit_fails_as_unavailable_and_makes_connections_suspect() {
        set_call_limit(Duration::from_millis(500));
        let silent = bounded(std::future::pending::<Result<(), sqlx::Error>>()).await;
        set_call_limit(Duration::from_secs(30));
        let err = silent.expect_err("abandoned");
        assert!(matches!(
            crate::store::errors::from_sqlx(err),
            crate::Error::StoreUnavailable(_)
        ));
        assert!(suspect());
        let later = now_ms() + SUSPECT_FOR.as_millis() as u64 + 1;
        assert!(!suspect_at(later), "suspect for a while only");
    }

    #[tokio::test]
    async fn a_call_dropped_midway_makes_connections_suspect() {
        let finished = bounded(async { Ok::<_, sqlx::Error>(()) }).await;
        assert!(finished.is_ok());
        let dropped = tokio::time::timeout(
            Duration::from_millis(10),
            bounded(std::future::pending::<Result<(), sqlx::Error>>()),
        )
        .await;
        assert!(dropped.is_err());
        assert!(suspect());
    }
}
