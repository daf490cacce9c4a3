//! What this node knows of its own claim: whether its lock session answered recently.
//!
//! The lock session's pinger (the only writer, through [`LivenessFeed`]) confirms the
//! session after each answered ping and declares it lost when a ping fails or times
//! out. Everything that must stop when the claim may be gone (pods, `exec` watchdogs,
//! the minting of epochs) reads a [`Liveness`] instead of waiting on the control loop,
//! so a node that lost its claim acts on it without any help from the network it lost.
//!
//! "Alive" has a bound of its own: a confirmation older than `fresh_for` is not alive
//! even if no failure was declared yet (a pinger stuck in a call, a paused process
//! woken up), so readers never trust a stale confirmation.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// One state of the session, as the pinger last saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pulse {
    /// The session answered at this instant.
    Confirmed(Instant),
    /// No session, or it failed: every lock is assumed lost.
    Lost,
}

/// The pinger's side: the only writer.
#[derive(Debug)]
pub struct LivenessFeed {
    tx: watch::Sender<Pulse>,
    fresh_for: Duration,
}

/// A reader's side; cheap to clone.
#[derive(Clone, Debug)]
pub struct Liveness {
    rx: watch::Receiver<Pulse>,
    fresh_for: Duration,
}

impl LivenessFeed {
    /// A feed whose confirmations count as alive for `fresh_for` (the detection bound:
    /// ping interval plus ping timeout). It starts lost, until the first confirmation.
    pub fn new(fresh_for: Duration) -> (Self, Liveness) {
        let (tx, rx) = watch::channel(Pulse::Lost);
        (Self { tx, fresh_for }, Liveness { rx, fresh_for })
    }

    /// The session answered just now.
    pub fn confirm(&self) {
        self.tx.send_replace(Pulse::Confirmed(Instant::now()));
    }

    /// The session failed or is gone: readers stop at once.
    pub fn lose(&self) {
        self.tx.send_replace(Pulse::Lost);
    }

    pub fn liveness(&self) -> Liveness {
        Liveness {
            rx: self.tx.subscribe(),
            fresh_for: self.fresh_for,
        }
    }
}

impl Liveness {
    /// A liveness that is always alive, for handlers run outside a worker (unit tests).
    pub fn always() -> Self {
        let (tx, rx) = watch::channel(Pulse::Confirmed(Instant::now()));
        // Dropping the sender freezes the value; `fresh_for` makes it never go stale.
        drop(tx);
        Self {
            rx,
            fresh_for: Duration::MAX,
        }
    }

    /// Whether the session answered within the detection bound and was not lost since.
    pub fn is_alive(&self) -> bool {
        match *self.rx.borrow() {
            Pulse::Confirmed(at) => at.elapsed() < self.fresh_for,
            Pulse::Lost => false,
        }
    }

    /// Resolves once this node must assume its claim is gone: a declared loss, or the
    /// last confirmation growing older than the detection bound.
    pub async fn lost(&mut self) {
        loop {
            let pulse = *self.rx.borrow_and_update();
            let stale_at = match pulse {
                Pulse::Lost => return,
                Pulse::Confirmed(at) => at.checked_add(self.fresh_for),
            };
            let Some(stale_at) = stale_at else {
                // Never goes stale: wait for a declared loss alone.
                if self.rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
                continue;
            };
            tokio::select! {
                () = tokio::time::sleep_until(stale_at) => {
                    if *self.rx.borrow() == pulse {
                        return;
                    }
                }
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        // The pinger is gone without a word: stale once the bound passes.
                        tokio::time::sleep_until(stale_at).await;
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_confirmation_goes_stale_after_the_detection_bound() {
        let (feed, mut live) = LivenessFeed::new(Duration::from_millis(500));
        assert!(!live.is_alive(), "lost until the first confirmation");
        feed.confirm();
        assert!(live.is_alive());
        tokio::time::advance(Duration::from_millis(499)).await;
        assert!(live.is_alive());
        let started = Instant::now();
        live.lost().await;
        assert!(!live.is_alive());
        assert_eq!(started.elapsed(), Duration::from_millis(1));
    }

    #[tokio::test(start_paused = true)]
    async fn fresh_confirmations_keep_it_alive_and_a_loss_ends_it_at_once() {
        let (feed, mut live) = LivenessFeed::new(Duration::from_millis(500));
        feed.confirm();
        let waiter = tokio::spawn(async move {
            live.lost().await;
            Instant::now()
        });
        for _ in 0..10 {
            tokio::time::advance(Duration::from_millis(300)).await;
            feed.confirm();
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished(), "confirmed every 300 ms");
        let lost_at = Instant::now();
        feed.lose();
        assert_eq!(waiter.await.ok(), Some(lost_at));
    }

    #[tokio::test(start_paused = true)]
    async fn always_never_goes_stale() {
        let live = Liveness::always();
        tokio::time::advance(Duration::from_secs(86_400)).await;
        assert!(live.is_alive());
    }
}
