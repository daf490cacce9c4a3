//! One per replica: tells the watch relays when the tasks they follow may have changed.
//!
//! Relays register the channel they follow (`task:{id}`, or `tasks` for WatchTasks) and
//! get a counter that moves whenever that channel may have news; they then read the
//! store themselves, so a notification is only a hint and a lost one costs at most a
//! repair interval. News comes from Redis (one subscription per replica, following
//! exactly the channels some relay watches, so `tasks` only while a WatchTasks stream
//! is open) and from one poll of the store's change feed per replica, not per watcher:
//! every `repair_interval_ms` while the subscription is in place (to repair publishes
//! Redis dropped), every `poll_interval_ms` without a bus or while the subscription is
//! down or being replaced (Redis gone, stalled, or its connection silent), so a Redis
//! fault costs watchers the poll interval, not the repair interval.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use taskpod_core::bus::{BusEvent, BusSettings, Subscription, channels};
use taskpod_core::store::Store;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug)]
pub struct Hub {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Channel -> (its news counter, how many relays follow it).
    channels: Mutex<HashMap<String, (watch::Sender<u64>, usize)>>,
    /// Follows exactly the keys of `channels`; `None` without a bus.
    subscription: Option<Subscription>,
}

/// A relay's registration; dropping it unregisters.
#[derive(Debug)]
pub struct Follow {
    hub: Hub,
    channel: String,
    /// Moves when the channel may have news.
    pub news: watch::Receiver<u64>,
}

impl Drop for Follow {
    fn drop(&mut self) {
        self.hub.unfollow(&self.channel);
    }
}

impl Hub {
    /// Starts the hub's tasks (the subscription and the poller); they stop on `shutdown`.
    pub fn start(
        store: Store,
        bus: &BusSettings,
        poll: Duration,
        repair: Duration,
        shutdown: CancellationToken,
        tracker: &tokio_util::task::TaskTracker,
    ) -> Self {
        let subscription = Subscription::start(bus, shutdown.clone());
        let (subscription, events, live) = match subscription {
            Some((s, rx, task)) => {
                tracker.spawn(async move {
                    let _ = task.await;
                });
                let live = s.live();
                (Some(s), Some(rx), Some(live))
            }
            None => (None, None, None),
        };
        let hub = Self {
            inner: Arc::new(Inner {
                channels: Mutex::new(HashMap::new()),
                subscription,
            }),
        };
        if let Some(events) = events {
            tracker.spawn(hub.clone().relay_bus(events, shutdown.clone()));
        }
        let every = Intervals { poll, repair };
        tracker.spawn(hub.clone().poll_store(store, every, live, shutdown));
        hub
    }

    /// Follows `channel` until the returned [`Follow`] is dropped.
    pub fn follow(&self, channel: String) -> Follow {
        let news = {
            let mut map = self
                .inner
                .channels
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let entry = map
                .entry(channel.clone())
                .or_insert_with(|| (watch::channel(0).0, 0));
            entry.1 += 1;
            entry.0.subscribe()
        };
        self.resubscribe();
        Follow {
            hub: self.clone(),
            channel,
            news,
        }
    }

    fn unfollow(&self, channel: &str) {
        {
            let mut map = self
                .inner
                .channels
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(entry) = map.get_mut(channel) {
                entry.1 -= 1;
                if entry.1 == 0 {
                    map.remove(channel);
                }
            }
        }
        self.resubscribe();
    }

    /// How many relays follow `channel` (tests and metrics).
    pub fn followers(&self, channel: &str) -> usize {
        let map = self
            .inner
            .channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.get(channel).map_or(0, |e| e.1)
    }

    fn resubscribe(&self) {
        if let Some(subscription) = &self.inner.subscription {
            let map = self
                .inner
                .channels
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            subscription.set_channels(map.keys().cloned().collect());
        }
    }

    /// Tells the followers of these channels (all, for `None`) to look again.
    fn poke<'a>(&self, which: Option<impl Iterator<Item = &'a str>>) {
        let map = self
            .inner
            .channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let bump = |tx: &watch::Sender<u64>| tx.send_modify(|n| *n = n.wrapping_add(1));
        match which {
            None => map.values().for_each(|(tx, _)| bump(tx)),
            Some(channels) => {
                for c in channels {
                    if let Some((tx, _)) = map.get(c) {
                        bump(tx);
                    }
                }
            }
        }
    }

    async fn relay_bus(
        self,
        mut events: tokio::sync::mpsc::Receiver<BusEvent>,
        shutdown: CancellationToken,
    ) {
        loop {
            let event = tokio::select! {
                () = shutdown.cancelled() => return,
                e = events.recv() => e,
            };
            match event {
                None => return,
                // After a reconnect anything may have been missed: everyone looks again.
                Some(BusEvent::Connected) => self.poke(None::<std::iter::Empty<&str>>),
                Some(BusEvent::Message { channel, .. }) => {
                    self.poke(Some(std::iter::once(channel.as_str())))
                }
            }
        }
    }

    /// One change-feed poll for every watcher of this replica, as often as `live` (the
    /// subscription's state; `None` without a bus) asks.
    async fn poll_store(
        self,
        store: Store,
        every: Intervals,
        mut live: Option<watch::Receiver<bool>>,
        shutdown: CancellationToken,
    ) {
        let mut mark = None;
        let mut last: Option<Instant> = None;
        loop {
            let bus_up = live.as_ref().is_some_and(|l| *l.borrow());
            let interval = if bus_up { every.repair } else { every.poll };
            let due = last.map_or_else(Instant::now, |t| t + interval);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(due) => {}
                // Down: poll now, what it dropped is in the store. Up again: its
                // `Connected` has made every relay look, wait the repair interval.
                () = bus_changed(&mut live) => continue,
            }
            last = Some(Instant::now());
            let idle = self
                .inner
                .channels
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty();
            let Ok(now) = store.watermark().await else {
                continue;
            };
            if idle {
                mark = Some(now);
                continue;
            }
            let Some(from) = mark.replace(now) else {
                continue;
            };
            let Ok(changed) = store.changed_tasks(from, now).await else {
                // Try the same range again next time.
                mark = Some(from);
                continue;
            };
            if changed.is_empty() {
                continue;
            }
            let names: Vec<String> = changed.iter().map(|id| channels::task(*id)).collect();
            self.poke(Some(
                names
                    .iter()
                    .map(String::as_str)
                    .chain(std::iter::once(channels::TASKS)),
            ));
        }
    }
}

/// How often the hub polls the store: with a live subscription, and without one.
#[derive(Clone, Copy, Debug)]
struct Intervals {
    poll: Duration,
    repair: Duration,
}

/// Resolves when the subscription's state changes; never without a bus. A
/// subscription whose task ended counts as down from then on.
async fn bus_changed(live: &mut Option<watch::Receiver<bool>>) {
    let ended = match live.as_mut() {
        Some(rx) => rx.changed().await.is_err(),
        None => std::future::pending().await,
    };
    if ended {
        *live = None;
    }
}
