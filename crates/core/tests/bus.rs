//! The Redis bus against real redis-server processes this test starts and kills.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use taskpod_core::bus::{BusEvent, BusSettings, Publisher, Subscription, TaskUpdate, channels};
use taskpod_core::domain::{Phase, Status, TaskId};
use tokio_util::sync::CancellationToken;

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

async fn next(rx: &mut tokio::sync::mpsc::Receiver<BusEvent>) -> BusEvent {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a bus event in time")
        .expect("open")
}

async fn next_message(rx: &mut tokio::sync::mpsc::Receiver<BusEvent>) -> (String, TaskUpdate) {
    loop {
        if let BusEvent::Message { channel, payload } = next(rx).await {
            return (channel, serde_json::from_slice(&payload).unwrap());
        }
    }
}

#[tokio::test]
async fn updates_reach_subscribers_of_every_channel_they_name() {
    let redis = Redis::start(free_port());
    let settings = BusSettings::with_url(redis.url());
    let shutdown = CancellationToken::new();
    let (sub, mut rx, task) = Subscription::start(&settings, shutdown.clone()).unwrap();
    let id = TaskId::new();
    sub.set_channels(BTreeSet::from([channels::task(id), channels::partition(7)]));
    assert_eq!(next(&mut rx).await, BusEvent::Connected);
    // Subscriptions are asynchronous: publish until the first message lands.
    let publisher = Publisher::new(&settings).unwrap();
    let mut got = Vec::new();
    for attempt in 0..50 {
        publisher.publish(&[update(id, attempt)]).await;
        if let Ok(Some(BusEvent::Message { channel, .. })) =
            tokio::time::timeout(Duration::from_millis(100), rx.recv()).await
        {
            got.push(channel);
            break;
        }
    }
    assert!(!got.is_empty(), "no message arrived");
    let (channel, u) = next_message(&mut rx).await;
    assert!(
        channel == channels::task(id) || channel == channels::partition(7),
        "{channel}"
    );
    assert_eq!(u.task_id, id);
    assert_eq!(publisher.failures(), 0);
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn redis_going_away_costs_writers_nothing_and_subscribers_reconnect() {
    let port = free_port();
    let redis = Redis::start(port);
    let settings = BusSettings::with_url(redis.url());
    let shutdown = CancellationToken::new();
    let (sub, mut rx, task) = Subscription::start(&settings, shutdown.clone()).unwrap();
    sub.set_channels(BTreeSet::from([channels::TASKS.to_owned()]));
    assert_eq!(next(&mut rx).await, BusEvent::Connected);
    let publisher = Publisher::new(&settings).unwrap();
    publisher.publish(&[update(TaskId::new(), 1)]).await;

    drop(redis);
    // Writers carry on: a publish fails fast and is only counted.
    let started = tokio::time::Instant::now();
    publisher.publish(&[update(TaskId::new(), 2)]).await;
    publisher.publish(&[update(TaskId::new(), 3)]).await;
    assert!(publisher.failures() >= 1);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "publishing must not hang while Redis is down"
    );

    // Redis comes back on the same port: the subscriber says it reconnected (so its
    // owner repairs from the store) and receives again.
    let _redis = Redis::start(port);
    loop {
        if next(&mut rx).await == BusEvent::Connected {
            break;
        }
    }
    let id = TaskId::new();
    let mut received = false;
    for v in 0..50 {
        // The publisher retries its connection at most once a second.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        publisher.publish(&[update(id, v)]).await;
        if let Ok(Some(BusEvent::Message { .. })) =
            tokio::time::timeout(Duration::from_millis(200), rx.recv()).await
        {
            received = true;
            break;
        }
    }
    assert!(received, "no message after the reconnect");
    shutdown.cancel();
    task.await.unwrap();
}

#[test]
fn a_bus_without_url_is_disabled() {
    let settings = BusSettings::default();
    assert!(!settings.enabled());
    assert!(Subscription::start(&settings, CancellationToken::new()).is_none());
    assert_eq!(Publisher::new(&settings).unwrap().failures(), 0);
}
