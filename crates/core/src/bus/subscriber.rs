//! One reconnecting subscription whose channel set its owner changes at will.
//!
//! The task that runs it connects (retrying with backoff while Redis is down),
//! subscribes to the current set, announces [`BusEvent::Connected`] (so the owner can
//! repair from the store whatever it missed while disconnected), relays messages, and
//! follows changes to the set. Messages go into a bounded channel: when the owner falls
//! behind, messages are dropped and a `Connected` is sent once there is room again,
//! since a gap must be repaired from the store either way.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt as _;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::BusSettings;

/// Messages buffered for a slow owner before the rest are dropped.
const BUFFER: usize = 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BusEvent {
    /// A message on one of the subscribed channels.
    Message { channel: String, payload: Vec<u8> },
    /// (Re)connected, or messages were dropped: anything may have been missed.
    Connected,
}

/// Changes the channel set of a running subscription; dropping it ends the task.
#[derive(Debug)]
pub struct Subscription {
    channels: watch::Sender<BTreeSet<String>>,
}

impl Subscription {
    /// Starts the subscription task; it stops on `shutdown` or when the handle is
    /// dropped. Returns the handle, the events, and the task to own.
    pub fn start(
        settings: &BusSettings,
        shutdown: CancellationToken,
    ) -> Option<(Self, mpsc::Receiver<BusEvent>, tokio::task::JoinHandle<()>)> {
        if !settings.enabled() {
            return None;
        }
        let client = match redis::Client::open(settings.url.expose()) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "invalid bus url; running without the bus");
                return None;
            }
        };
        let (set_tx, set_rx) = watch::channel(BTreeSet::new());
        let (tx, rx) = mpsc::channel(BUFFER);
        let task = tokio::spawn(run(client, settings.timeout(), set_rx, tx, shutdown));
        Some((Self { channels: set_tx }, rx, task))
    }

    /// Subscribes to exactly `channels` from now on.
    pub fn set_channels(&self, channels: BTreeSet<String>) {
        self.channels.send_if_modified(|current| {
            if *current == channels {
                false
            } else {
                *current = channels;
                true
            }
        });
    }
}

async fn run(
    client: redis::Client,
    timeout: Duration,
    mut desired: watch::Receiver<BTreeSet<String>>,
    tx: mpsc::Sender<BusEvent>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let pubsub = tokio::select! {
            () = shutdown.cancelled() => return,
            r = tokio::time::timeout(timeout, client.get_async_pubsub()) => r,
        };
        let Ok(Ok(pubsub)) = pubsub else {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
            continue;
        };
        backoff = Duration::from_millis(100);
        let (mut sink, mut stream) = pubsub.split();
        let mut subscribed: BTreeSet<String> = BTreeSet::new();
        let mut missed = true;
        'connected: loop {
            let want = desired.borrow_and_update().clone();
            let add: Vec<&String> = want.difference(&subscribed).collect();
            let drop: Vec<&String> = subscribed.difference(&want).collect();
            if (!add.is_empty() && sink.subscribe(&add).await.is_err())
                || (!drop.is_empty() && sink.unsubscribe(&drop).await.is_err())
            {
                break 'connected;
            }
            subscribed = want;
            if missed && tx.try_send(BusEvent::Connected).is_ok() {
                missed = false;
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = desired.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                msg = stream.next() => {
                    let Some(msg) = msg else { break 'connected };
                    let event = BusEvent::Message {
                        channel: msg.get_channel_name().to_owned(),
                        payload: msg.get_payload_bytes().to_vec(),
                    };
                    match tx.try_send(event) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => missed = true,
                        Err(mpsc::error::TrySendError::Closed(_)) => return,
                    }
                }
            }
        }
        tracing::info!("bus connection lost; reconnecting");
    }
}
