//! The Redis bus against real redis-server processes this test starts, pauses and
//! kills.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use taskpod_core::bus::subscriber::PING_EVERY;
use taskpod_core::bus::{BusEvent, BusSettings, Publisher, Subscription, TaskUpdate, channels};
use taskpod_core::domain::{Phase, Status, TaskId};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

struct Redis {
    port: u16,
    child: Child,
}

impl Redis {
    fn start(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test.sh installs it)");
        let r = Self { port, child };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return r;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start on {port}");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGSTOP (`STOP`) or SIGCONT (`CONT`): a paused Redis keeps its connections open
    /// and its kernel accepts new ones, but nothing is ever answered.
    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -s {name}");
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn update(task: TaskId, version: i64) -> TaskUpdate {
    TaskUpdate {
        task_id: task,
        version,
        status: Status::Active,
        phase: Phase::Planning,
        event_type: "phase_changed".into(),
        epoch: 1,
        partition: 7,
        kind: "sleep".into(),
        priority: 0,
        created_by: Some("alice".into()),
        created_at: None,
        updated_at: None,
        traceparent: None,
    }
}

async fn next(rx: &mut mpsc::Receiver<BusEvent>) -> BusEvent {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a bus event in time")
        .expect("open")
}

async fn next_message(rx: &mut mpsc::Receiver<BusEvent>) -> (String, TaskUpdate) {
    loop {
        if let BusEvent::Message { channel, payload } = next(rx).await {
            return (channel, serde_json::from_slice(&payload).unwrap());
        }
    }
}

/// A running subscription, connected (its first `Connected` consumed).
struct Listener {
    sub: Subscription,
    rx: mpsc::Receiver<BusEvent>,
    task: JoinHandle<()>,
    shutdown: CancellationToken,
}

impl Listener {
    async fn start(settings: &BusSettings, channels: BTreeSet<String>) -> Self {
        let shutdown = CancellationToken::new();
        let (sub, mut rx, task) = Subscription::start(settings, shutdown.clone()).unwrap();
        sub.set_channels(channels);
        assert_eq!(next(&mut rx).await, BusEvent::Connected);
        Self {
            sub,
            rx,
            task,
            shutdown,
        }
    }

    /// Publishes versions of `id` until one arrives (subscriptions and reconnects are
    /// asynchronous), and returns its channel.
    async fn publish_until_received(
        &mut self,
        publisher: &Publisher,
        id: TaskId,
        versions: std::ops::Range<i64>,
    ) -> String {
        for v in versions {
            publisher.publish(&[update(id, v)]);
            if let Ok(Some(BusEvent::Message { channel, payload })) =
                tokio::time::timeout(Duration::from_millis(300), self.rx.recv()).await
                && serde_json::from_slice::<TaskUpdate>(&payload)
                    .unwrap()
                    .task_id
                    == id
            {
                return channel;
            }
        }
        panic!("no message of {id} arrived");
    }

    /// Waits for a `Connected` (messages before it are skipped).
    async fn reconnected(&mut self) {
        while next(&mut self.rx).await != BusEvent::Connected {}
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }
}

fn tasks_channel() -> BTreeSet<String> {
    BTreeSet::from([channels::TASKS.to_owned()])
}

/// A publisher and the tracker its task runs on.
fn publisher(settings: &BusSettings) -> (Publisher, TaskTracker) {
    let tracker = TaskTracker::new();
    let publisher = Publisher::start(settings, &tracker).unwrap();
    (publisher, tracker)
}

/// Drops the last handle and waits for the publisher's task, at most `within`.
async fn stop(publisher: Publisher, tracker: TaskTracker, within: Duration) {
    drop(publisher);
    tracker.close();
    tokio::time::timeout(within, tracker.wait())
        .await
        .expect("the publisher stops in time");
}

#[tokio::test]
async fn updates_reach_subscribers_of_every_channel_they_name() {
    let redis = Redis::start(free_port());
    let settings = BusSettings::with_url(redis.url());
    let id = TaskId::new();
    let mut listener = Listener::start(
        &settings,
        BTreeSet::from([channels::task(id), channels::partition(7)]),
    )
    .await;
    let (publisher, tracker) = publisher(&settings);
    listener.publish_until_received(&publisher, id, 0..50).await;
    let (channel, u) = next_message(&mut listener.rx).await;
    assert!(
        channel == channels::task(id) || channel == channels::partition(7),
        "{channel}"
    );
    assert_eq!(u.task_id, id);
    assert_eq!(publisher.failures(), 0);
    listener.stop().await;
    stop(publisher, tracker, settings.timeout()).await;
}

/// Workers are the partition channels' only readers, and a task created inactive has
/// nothing for them: its creation goes to its task's channel and `tasks` only.
#[tokio::test]
async fn an_inactive_creation_skips_the_partition_channel() {
    let redis = Redis::start(free_port());
    let settings = BusSettings::with_url(redis.url());
    let mut both = tasks_channel();
    both.insert(channels::partition(7));
    let mut listener = Listener::start(&settings, both).await;
    let (publisher, tracker) = publisher(&settings);
    listener
        .publish_until_received(&publisher, TaskId::new(), 0..50)
        .await;
    let (created, started) = (TaskId::new(), TaskId::new());
    let creation = TaskUpdate {
        status: Status::Inactive,
        phase: Phase::SpecClarification,
        event_type: "task_created".into(),
        epoch: 0,
        ..update(created, 1)
    };
    publisher.publish(&[creation, update(started, 3)]);
    // In publish order: the creation on `tasks`, then the other on partition 7.
    let mut seen = Vec::new();
    loop {
        let (channel, u) = next_message(&mut listener.rx).await;
        if u.task_id == started && channel == channels::partition(7) {
            break;
        }
        if u.task_id == created {
            seen.push(channel);
        }
    }
    assert_eq!(seen, [channels::TASKS.to_owned()]);
    listener.stop().await;
    stop(publisher, tracker, settings.timeout()).await;
}

#[tokio::test]
async fn redis_going_away_costs_writers_nothing_and_subscribers_reconnect() {
    let port = free_port();
    let redis = Redis::start(port);
    let settings = BusSettings::with_url(redis.url());
    let mut listener = Listener::start(&settings, tasks_channel()).await;
    let (publisher, _tracker) = publisher(&settings);
    publisher.publish(&[update(TaskId::new(), 1)]);

    drop(redis);
    // Writers carry on: their updates are dropped and counted.
    publisher.publish(&[update(TaskId::new(), 2)]);
    publisher.publish(&[update(TaskId::new(), 3)]);
    until("the publisher counts its failures", || {
        publisher.failures() >= 1
    })
    .await;

    // Redis comes back on the same port: the subscriber says it reconnected (so its
    // owner repairs from the store) and receives again.
    let _redis = Redis::start(port);
    listener.reconnected().await;
    listener
        .publish_until_received(&publisher, TaskId::new(), 0..50)
        .await;
    listener.stop().await;
}

/// Waits (at most 20 s) until `check` holds.
async fn until(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the subscription's state is `want`, and returns how long that took.
async fn live_becomes(live: &mut watch::Receiver<bool>, want: bool) -> Duration {
    let started = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(20), live.wait_for(|l| *l == want))
        .await
        .unwrap_or_else(|_| panic!("the subscription never became live={want}"))
        .unwrap();
    started.elapsed()
}

#[tokio::test]
async fn a_paused_redis_holds_no_publish_and_its_silent_subscription_is_replaced() {
    let redis = Redis::start(free_port());
    let settings = BusSettings::with_url(redis.url());
    let mut listener = Listener::start(&settings, tasks_channel()).await;
    let mut live = listener.sub.live();
    live_becomes(&mut live, true).await;
    let (publisher, _tracker) = publisher(&settings);
    let id = TaskId::new();
    listener.publish_until_received(&publisher, id, 0..50).await;

    redis.signal("STOP");
    let started = std::time::Instant::now();
    for v in 100..1_100 {
        publisher.publish(&[update(id, v)]);
    }
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "a thousand publishes waited on a paused Redis: {:?}",
        started.elapsed()
    );
    // Found dead by its ping, within a ping interval and the timeout (and slack).
    let noticed = live_becomes(&mut live, false).await;
    assert!(
        noticed < PING_EVERY + settings.timeout() + Duration::from_secs(3),
        "the silent subscription was noticed after {noticed:?}"
    );

    redis.signal("CONT");
    live_becomes(&mut live, true).await;
    // Reported as a gap, then messages flow again.
    listener.reconnected().await;
    listener
        .publish_until_received(&publisher, TaskId::new(), 0..50)
        .await;
    listener.stop().await;
}

#[tokio::test]
async fn a_full_queue_drops_its_oldest_updates_and_a_stop_is_bounded() {
    let redis = Redis::start(free_port());
    let settings = BusSettings::with_url(redis.url());
    let (publisher, tracker) = publisher(&settings);
    redis.signal("STOP");
    let id = TaskId::new();
    for v in 0..20_000 {
        publisher.publish(&[update(id, v)]);
    }
    // The queue holds 16 384 updates and a round trip 512: the rest were dropped.
    assert!(
        publisher.dropped() >= 20_000 - 16_384 - 512,
        "dropped {}",
        publisher.dropped()
    );
    // The last handle gone, the task gives up on the paused Redis within its timeout.
    stop(publisher, tracker, settings.timeout() * 3).await;
    redis.signal("CONT");
}

#[tokio::test]
async fn what_is_queued_when_the_last_handle_drops_is_still_sent() {
    let redis = Redis::start(free_port());
    let settings = BusSettings::with_url(redis.url());
    // Subscribing completes before `Connected`: a message sent now is received.
    let mut listener = Listener::start(&settings, tasks_channel()).await;
    let (publisher, tracker) = publisher(&settings);
    let id = TaskId::new();
    publisher.publish(&[update(id, 7)]);
    stop(publisher, tracker, settings.timeout() * 3).await;
    let (_, u) = next_message(&mut listener.rx).await;
    assert_eq!((u.task_id, u.version), (id, 7));
    listener.stop().await;
}

#[tokio::test]
async fn a_bus_without_url_is_disabled() {
    let settings = BusSettings::default();
    assert!(!settings.enabled());
    assert!(Subscription::start(&settings, CancellationToken::new()).is_none());
    let (publisher, tracker) = publisher(&settings);
    publisher.publish(&[update(TaskId::new(), 1)]);
    assert_eq!((publisher.failures(), publisher.dropped()), (0, 0));
    assert!(tracker.is_empty(), "no task without a bus");
}
