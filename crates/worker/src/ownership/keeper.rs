//! The lock keeper: the one task that owns a node's lock session.
//!
//! It pings the session every ping interval, whatever the rest of the worker is doing,
//! and serves the lock requests of the control loop (try, unlock, probe a peer's key)
//! in between. Every answer confirms the session on the node's [`LivenessFeed`]; the
//! first failure or timeout declares it lost there and ends the keeper. So liveness
//! never depends on the control loop making progress: a loop busy recording thousands
//! of crashes, or stuck on a silent pool connection, cannot leave the session idle
//! past `idle_session_timeout`, and a session that stops answering is acted on
//! (pods stop, `exec` guards starve) without the loop.
//!
//! One incarnation, one keeper: a lost session is never reconnected here. The control
//! loop registers a new incarnation with a new session and a new keeper.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::liveness::LivenessFeed;
use crate::lock::{Key, LockError, LockSession};

/// Requests waiting for the session; more only queue in the control loop.
const QUEUE: usize = 64;

enum Request {
    TryLock(Key, oneshot::Sender<Result<bool, LockError>>),
    Unlock(Key, oneshot::Sender<Result<(), LockError>>),
    HeldElsewhere(Key, oneshot::Sender<Result<bool, LockError>>),
}

/// The control loop's handle on the keeper. Dropping every clone closes the session
/// (a graceful release: Postgres frees whatever it still held).
#[derive(Clone, Debug)]
pub struct LockClient {
    tx: mpsc::Sender<Request>,
}

/// Why a keeper ended.
#[derive(Debug)]
pub enum KeeperEnd {
    /// Every client was dropped: the session was closed on purpose.
    Closed,
    /// The session failed or stopped answering: every lock must be assumed lost.
    Lost(LockError),
}

impl LockClient {
    /// Takes `key` if free (a key already held answers true without locking again).
    ///
    /// # Errors
    /// When the session fails, or is already gone.
    pub async fn try_lock(&self, key: Key) -> Result<bool, LockError> {
        self.ask(|tx| Request::TryLock(key, tx)).await?
    }

    /// Releases `key`.
    ///
    /// # Errors
    /// [`LockError::NotHeld`] when it was not held; when the session fails.
    pub async fn unlock(&self, key: Key) -> Result<(), LockError> {
        self.ask(|tx| Request::Unlock(key, tx)).await?
    }

    /// Whether another session holds `key` (a peer's node key: its session is alive).
    ///
    /// # Errors
    /// When the session fails.
    pub async fn is_held_elsewhere(&self, key: Key) -> Result<bool, LockError> {
        self.ask(|tx| Request::HeldElsewhere(key, tx)).await?
    }

    async fn ask<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T, LockError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(request(tx))
            .await
            .map_err(|_| LockError::Gone)?;
        rx.await.map_err(|_| LockError::Gone)
    }
}

/// Starts the keeper of `session`, which is confirmed alive at once (it just
/// connected).
pub fn spawn(
    session: LockSession,
    feed: LivenessFeed,
    ping_interval: Duration,
) -> (LockClient, JoinHandle<KeeperEnd>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    feed.confirm();
    let task = tokio::spawn(run(session, feed, ping_interval, rx));
    (LockClient { tx }, task)
}

async fn run(
    mut session: LockSession,
    feed: LivenessFeed,
    ping_interval: Duration,
    mut rx: mpsc::Receiver<Request>,
) -> KeeperEnd {
    let mut ping = tokio::time::interval(ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let answered = tokio::select! {
            biased;
            _ = ping.tick() => session.ping().await,
            request = rx.recv() => match request {
                None => {
                    session.close().await;
                    feed.lose();
                    return KeeperEnd::Closed;
                }
                Some(request) => serve(&mut session, request).await,
            },
        };
        match answered {
            Ok(()) => feed.confirm(),
            Err(e) => {
                tracing::warn!(error = %e, "lock session lost");
                feed.lose();
                return KeeperEnd::Lost(e);
            }
        }
    }
}

/// Answers one request; `Err` when the session itself failed (the request's own
/// refusal, such as an unlock of a key not held, is the caller's answer).
async fn serve(session: &mut LockSession, request: Request) -> Result<(), LockError> {
    match request {
        Request::TryLock(key, reply) => {
            let got = session.try_lock(key).await;
            let failed = session_failed(&got);
            let _ = reply.send(got);
            failed
        }
        Request::Unlock(key, reply) => {
            let done = session.unlock(key).await;
            let failed = session_failed(&done);
            let _ = reply.send(done);
            failed
        }
        Request::HeldElsewhere(key, reply) => {
            let held = session.is_held_elsewhere(key).await;
            let failed = session_failed(&held);
            let _ = reply.send(held);
            failed
        }
    }
}

fn session_failed<T>(answer: &Result<T, LockError>) -> Result<(), LockError> {
    match answer {
        Err(LockError::Db(e)) => Err(LockError::Lost(e.to_string())),
        Err(LockError::Timeout(d)) => Err(LockError::Timeout(*d)),
        Err(LockError::Lost(e)) => Err(LockError::Lost(e.clone())),
        Ok(_) | Err(LockError::NotHeld(_) | LockError::Gone) => Ok(()),
    }
}
