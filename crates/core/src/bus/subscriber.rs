//! One reconnecting subscription whose channel set its owner changes at will.
//!
//! The task that runs it connects (retrying with backoff while Redis is down),
//! subscribes to the current set, announces [`BusEvent::Connected`] (so the owner can
//! repair from the store whatever it missed while disconnected), relays messages, and
//! follows changes to the set. Messages go into a bounded channel: when the owner falls
//! behind, messages are dropped and a `Connected` is sent once there is room again,
//! since a gap must be repaired from the store either way.
//!
//! A subscription only reads, so a connection that went silent (a paused Redis, a NAT
//! or proxy that forgot it: no FIN, no RST) would look like a quiet channel until TCP
//! gave up many minutes later. So the task pings Redis on the subscription's own
//! connection every [`PING_EVERY`], and gives every ping and (un)subscribe
//! `bus.timeout_ms` to be answered; a connection that misses one is dropped and
//! replaced like a closed one. [`Subscription::live`] tells the owner whether a
//! subscription is in place, so it can read the store more often while it is not.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::future::{BoxFuture, Fuse, FusedFuture as _};
use futures::{FutureExt as _, StreamExt as _};
use redis::aio::{PubSub, PubSubSink};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{BusSettings, connection};
use crate::telemetry::metrics::metrics;

/// Messages buffered for a slow owner before the rest are dropped.
const BUFFER: usize = 1024;
/// How often a subscription's connection is pinged: a silent one is found within this
/// plus `bus.timeout_ms`.
pub const PING_EVERY: Duration = Duration::from_secs(2);
/// Waits before reconnecting: doubling from the first to the last while connections
/// fail, or die within [`STABLE`] of being made (Redis refusing us, or cutting us off
/// for a full output buffer, must not make every owner repair in a tight loop).
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
const STABLE: Duration = Duration::from_secs(10);

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
    live: watch::Receiver<bool>,
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
        let client = match connection::client(settings) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "invalid bus url; running without the bus");
                return None;
            }
        };
        let (set_tx, set_rx) = watch::channel(BTreeSet::new());
        let (live_tx, live) = watch::channel(false);
        let (tx, rx) = mpsc::channel(BUFFER);
        let task = Task {
            client,
            timeout: settings.timeout(),
            desired: set_rx,
            events: tx,
            live: live_tx,
            shutdown,
        };
        let task = tokio::spawn(task.run());
        Some((
            Self {
                channels: set_tx,
                live,
            },
            rx,
            task,
        ))
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

    /// True while a subscription is in place (connected, subscribed, answering pings);
    /// false while the task is reconnecting, and once it ended.
    pub fn live(&self) -> watch::Receiver<bool> {
        self.live.clone()
    }
}

/// Why a connection's service ended.
enum End {
    /// Shutdown, or the owner is gone.
    Stopped,
    /// The connection is dead: `closed`, or `unresponsive`.
    Lost(&'static str),
}

struct Task {
    client: redis::Client,
    timeout: Duration,
    desired: watch::Receiver<BTreeSet<String>>,
    events: mpsc::Sender<BusEvent>,
    live: watch::Sender<bool>,
    shutdown: CancellationToken,
}

impl Task {
    async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let connected = tokio::select! {
                () = self.shutdown.cancelled() => return,
                r = tokio::time::timeout(self.timeout, self.client.get_async_pubsub()) => r,
            };
            let stable = match connected {
                Ok(Ok(pubsub)) => {
                    let since = Instant::now();
                    let end = self.serve(pubsub).await;
                    self.live.send_replace(false);
                    match end {
                        End::Stopped => return,
                        End::Lost(cause) => {
                            tracing::info!(cause, "bus subscription lost; reconnecting");
                            metrics().bus_subscription_lost(cause);
                        }
                    }
                    since.elapsed() >= STABLE
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "bus unavailable");
                    false
                }
                Err(_) => {
                    tracing::debug!("bus connect timed out");
                    false
                }
            };
            if stable {
                backoff = BACKOFF_MIN;
                continue;
            }
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Follows the desired set on one connection and relays its messages, until the
    /// connection dies or the task must stop.
    async fn serve(&mut self, pubsub: PubSub) -> End {
        let (mut sink, mut stream) = pubsub.split();
        let mut subscribed: BTreeSet<String> = BTreeSet::new();
        let mut missed = true;
        let mut pings = tokio::time::interval_at(Instant::now() + PING_EVERY, PING_EVERY);
        pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ping: Fuse<BoxFuture<'static, Result<(), &'static str>>> = Fuse::terminated();
        // Only when the desired set changed: a worker follows hundreds of channels and
        // hears thousands of messages a second, and comparing the sets for each message
        // once cost it half a core during bulk creates.
        let mut resync = true;
        loop {
            if resync {
                let want = self.desired.borrow_and_update().clone();
                if let Err(cause) = self.follow(&mut sink, &subscribed, &want).await {
                    return End::Lost(cause);
                }
                subscribed = want;
                self.live
                    .send_if_modified(|live| !std::mem::replace(live, true));
                resync = false;
            }
            if missed && self.events.try_send(BusEvent::Connected).is_ok() {
                missed = false;
            }
            tokio::select! {
                () = self.shutdown.cancelled() => return End::Stopped,
                changed = self.desired.changed() => {
                    if changed.is_err() {
                        return End::Stopped;
                    }
                    resync = true;
                }
                msg = stream.next() => {
                    let Some(msg) = msg else { return End::Lost("closed") };
                    let event = BusEvent::Message {
                        channel: msg.get_channel_name().to_owned(),
                        payload: msg.get_payload_bytes().to_vec(),
                    };
                    match self.events.try_send(event) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => missed = true,
                        Err(mpsc::error::TrySendError::Closed(_)) => return End::Stopped,
                    }
                }
                _ = pings.tick(), if ping.is_terminated() => {
                    ping = answers(sink.clone(), self.timeout).boxed().fuse();
                }
                answered = &mut ping => {
                    if let Err(cause) = answered {
                        return End::Lost(cause);
                    }
                }
            }
        }
    }

    /// (Un)subscribes so that `subscribed` becomes `want`, each within the timeout.
    async fn follow(
        &self,
        sink: &mut PubSubSink,
        subscribed: &BTreeSet<String>,
        want: &BTreeSet<String>,
    ) -> Result<(), &'static str> {
        let add: Vec<&String> = want.difference(subscribed).collect();
        let drop: Vec<&String> = subscribed.difference(want).collect();
        if !add.is_empty() {
            within(self.timeout, sink.subscribe(&add)).await?;
        }
        if !drop.is_empty() {
            within(self.timeout, sink.unsubscribe(&drop)).await?;
        }
        Ok(())
    }
}

/// Whether Redis answers a PING on the subscription's connection within `timeout`.
async fn answers(mut sink: PubSubSink, timeout: Duration) -> Result<(), &'static str> {
    within(timeout, sink.ping::<redis::Value>()).await.map(drop)
}

/// A command's outcome as a connection's fate: `closed` when it failed, `unresponsive`
/// when it was not answered in time.
async fn within<T>(
    timeout: Duration,
    call: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, &'static str> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(_)) => Err("closed"),
        Err(_) => Err("unresponsive"),
    }
}
