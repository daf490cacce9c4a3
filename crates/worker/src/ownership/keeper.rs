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
//!
//! The keeper runs on a thread of its own, with a runtime of its own that owns the
//! session's socket. On the worker's runtime it queued behind the pods' work: with a
//! hundred `exec` pods on two cores, a ping's answer waited in that queue past the
//! detection bound, and a healthy node fenced itself and had its runs repeated. Its own
//! thread is woken by the kernel when the answer arrives, whatever the pods are doing.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::liveness::LivenessFeed;
use crate::lock::{Key, LockError, LockSession};
use crate::settings::LockSettings;

/// Requests waiting for the session; more only queue in the control loop.
const QUEUE: usize = 64;

enum Request {
    TryLockMany(Vec<Key>, oneshot::Sender<Result<Vec<Key>, LockError>>),
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
        Ok(self.try_lock_many(vec![key]).await?.contains(&key))
    }

    /// Takes every free key of `keys` in one round trip; answers the keys held
    /// afterwards.
    ///
    /// # Errors
    /// When the session fails, or is already gone.
    pub async fn try_lock_many(&self, keys: Vec<Key>) -> Result<Vec<Key>, LockError> {
        self.ask(|tx| Request::TryLockMany(keys, tx)).await?
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

/// The thread a keeper runs on, and how it ended.
#[derive(Debug)]
pub struct Keeper {
    /// Taken once the end was read.
    ended: Option<oneshot::Receiver<KeeperEnd>>,
    /// Cancelled to drop the session at once, without a word to Postgres.
    abort: CancellationToken,
}

impl Keeper {
    /// Resolves when the keeper ends: the session was lost (or closed). Cancel-safe;
    /// once it has answered, it answers [`LockError::Gone`].
    pub async fn ended(&mut self) -> KeeperEnd {
        let Some(rx) = self.ended.as_mut() else {
            return KeeperEnd::Lost(LockError::Gone);
        };
        let end = rx.await;
        self.ended = None;
        end.unwrap_or_else(|_| KeeperEnd::Lost(LockError::Lost("the lock keeper died".into())))
    }

    /// Drops the session at once (its socket closes; Postgres frees the locks when it
    /// notices). Does not wait.
    pub fn abort(&self) {
        self.abort.cancel();
    }
}

/// Opens the lock session on the keeper's own thread and starts keeping it; the session
/// is confirmed alive at once (it just connected).
///
/// # Errors
/// When the session cannot be opened, or the thread cannot be started.
pub async fn start(
    url: String,
    settings: LockSettings,
    feed: LivenessFeed,
    ping_interval: Duration,
) -> Result<(LockClient, Keeper), LockError> {
    let (tx, rx) = mpsc::channel(QUEUE);
    let (connected_tx, connected_rx) = oneshot::channel();
    let (end_tx, end_rx) = oneshot::channel();
    let abort = CancellationToken::new();
    let stop = abort.clone();
    // The thread inherits the caller's span, so its logs say which node they are of.
    let span = tracing::Span::current();
    std::thread::Builder::new()
        .name("taskpod-lock-keeper".into())
        .spawn(move || {
            let _entered = span.enter();
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = connected_tx.send(Err(LockError::Lost(format!(
                        "the lock keeper's runtime: {e}"
                    ))));
                    return;
                }
            };
            runtime.block_on(async move {
                let session = match LockSession::connect(&url, &settings).await {
                    Ok(session) => session,
                    Err(e) => {
                        let _ = connected_tx.send(Err(e));
                        return;
                    }
                };
                feed.confirm();
                if connected_tx.send(Ok(())).is_err() {
                    return;
                }
                let end = tokio::select! {
                    end = run(session, &feed, ping_interval, rx) => end,
                    () = stop.cancelled() => {
                        feed.lose();
                        KeeperEnd::Lost(LockError::Gone)
                    }
                };
                let _ = end_tx.send(end);
            });
        })
        .map_err(|e| LockError::Lost(format!("the lock keeper's thread: {e}")))?;
    connected_rx
        .await
        .map_err(|_| LockError::Lost("the lock keeper died while connecting".into()))??;
    let keeper = Keeper {
        ended: Some(end_rx),
        abort,
    };
    Ok((LockClient { tx }, keeper))
}

async fn run(
    mut session: LockSession,
    feed: &LivenessFeed,
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
        Request::TryLockMany(keys, reply) => {
            let got = session.try_lock_many(&keys).await;
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
