//! The wake-up subscription: one Redis channel per owned partition, owned here and
//! started again if its task dies.
//!
//! Wake-ups only make checks prompt: the tick's check reads the change feed anyway, so a
//! lost message delays a start or a stop by a tick at most. A dead subscription task
//! would make every wake-up late for good, so its death is noticed, logged and
//! repaired, and the next check reads everything (anything may have been missed).

use std::collections::BTreeSet;

use taskpod_core::bus::{BusEvent, BusSettings, Subscription};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
pub(crate) struct Wakeups {
    settings: BusSettings,
    /// Cancelled when the worker stops; the subscription task ends with it.
    stop: CancellationToken,
    channels: BTreeSet<String>,
    live: Option<Live>,
}

#[derive(Debug)]
struct Live {
    subscription: Subscription,
    events: mpsc::Receiver<BusEvent>,
    task: JoinHandle<()>,
}

impl Wakeups {
    /// Subscribes (no channels yet); without a bus configured, nothing ever wakes.
    pub fn start(settings: &BusSettings, stop: CancellationToken) -> Self {
        let mut wakeups = Self {
            settings: settings.clone(),
            stop,
            channels: BTreeSet::new(),
            live: None,
        };
        wakeups.subscribe();
        wakeups
    }

    fn subscribe(&mut self) {
        self.live = Subscription::start(&self.settings, self.stop.clone()).map(
            |(subscription, events, task)| {
                subscription.set_channels(self.channels.clone());
                Live {
                    subscription,
                    events,
                    task,
                }
            },
        );
    }

    /// Listens on exactly these channels.
    pub fn set_channels(&mut self, channels: BTreeSet<String>) {
        if let Some(live) = &self.live {
            live.subscription.set_channels(channels.clone());
        }
        self.channels = channels;
    }

    /// The next event; pending forever without a bus. A subscription that died is
    /// started again and reported as a reconnect.
    pub async fn next(&mut self) -> BusEvent {
        let Some(live) = &mut self.live else {
            return std::future::pending().await;
        };
        let died = tokio::select! {
            event = live.events.recv() => match event {
                Some(event) => return event,
                None => "its events ended".to_owned(),
            },
            ended = &mut live.task => format!("its task ended: {ended:?}"),
        };
        if self.stop.is_cancelled() {
            return std::future::pending().await;
        }
        tracing::error!(died, "the wake-up subscription died; subscribing again");
        self.subscribe();
        BusEvent::Connected
    }

    /// An event that already arrived, if any.
    pub fn try_next(&mut self) -> Option<BusEvent> {
        self.live.as_mut()?.events.try_recv().ok()
    }

    /// Ends the subscription and waits for its task.
    pub async fn stop(self) {
        self.stop.cancel();
        if let Some(live) = self.live {
            let _ended = live.task.await;
        }
    }
}
