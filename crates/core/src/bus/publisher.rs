//! Best-effort, pipelined publishing: one round trip for every channel of every update.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use tokio::sync::Mutex;
use tokio::time::Instant;

use tracing::Instrument as _;

use super::{BusError, BusSettings, TaskUpdate, channels};
use crate::telemetry::metrics::metrics;
use crate::telemetry::spans::{DbSystem, db_call, publish_span};

/// A wait between reconnect attempts, so a Redis outage costs each write nothing but a
/// check of this clock.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct Publisher {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    client: redis::Client,
    timeout: Duration,
    conn: Mutex<Conn>,
    failures: AtomicU64,
}

#[derive(Debug, Default)]
struct Conn {
    live: Option<MultiplexedConnection>,
    next_attempt: Option<Instant>,
}

impl Publisher {
    /// A publisher that connects on first use.
    ///
    /// # Errors
    /// [`BusError::InvalidUrl`].
    pub fn new(settings: &BusSettings) -> Result<Self, BusError> {
        if !settings.enabled() || settings.drop_publishes {
            return Ok(Self::disabled());
        }
        let client = redis::Client::open(settings.url.expose())
            .map_err(|e| BusError::InvalidUrl(e.to_string()))?;
        Ok(Self {
            inner: Some(Arc::new(Inner {
                client,
                timeout: settings.timeout(),
                conn: Mutex::new(Conn::default()),
                failures: AtomicU64::new(0),
            })),
        })
    }

    /// A publisher that publishes nothing (no bus configured).
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// Publishes failed so far (for the `taskpod_bus_publish_failures_total` metric).
    pub fn failures(&self) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |i| i.failures.load(Ordering::Relaxed))
    }

    /// Publishes each update on its task's channel, its partition's channel and
    /// `tasks`, in one pipelined round trip, inside a PRODUCER span (a child of the
    /// writer's span). Never fails: a lost publish is repaired by the readers' paths to
    /// Postgres, and counted in `taskpod_bus_publish_failures_total`.
    pub async fn publish(&self, updates: &[TaskUpdate]) {
        let Some(inner) = &self.inner else { return };
        if updates.is_empty() {
            return;
        }
        let span = publish_span(updates.len());
        if !inner.publish(updates).instrument(span.clone()).await {
            span.record("error.type", "publish_failed");
            inner.failures.fetch_add(1, Ordering::Relaxed);
            metrics().bus_publish_failed();
            tracing::debug!("bus publish failed; readers repair from the store");
        }
    }
}

impl Inner {
    /// Whether every message went out.
    async fn publish(&self, updates: &[TaskUpdate]) -> bool {
        let Some(mut conn) = self.connection().await else {
            return false;
        };
        let mut pipe = redis::pipe();
        for u in updates {
            let Ok(payload) = serde_json::to_vec(u) else {
                continue;
            };
            pipe.publish(channels::task(u.task_id), &payload).ignore();
            pipe.publish(channels::partition(u.partition), &payload)
                .ignore();
            pipe.publish(channels::TASKS, &payload).ignore();
        }
        let sent = db_call(
            DbSystem::Redis,
            "PUBLISH",
            async {
                match tokio::time::timeout(self.timeout, pipe.query_async::<()>(&mut conn)).await {
                    Ok(result) => result.map_err(|e| e.to_string()),
                    Err(_) => Err("timeout".to_owned()),
                }
            },
            |e: &String| (e.clone(), None),
        )
        .await;
        if sent.is_err() {
            self.conn.lock().await.live = None;
        }
        sent.is_ok()
    }

    async fn connection(&self) -> Option<MultiplexedConnection> {
        let mut conn = self.conn.lock().await;
        if let Some(live) = &conn.live {
            return Some(live.clone());
        }
        if conn.next_attempt.is_some_and(|t| Instant::now() < t) {
            return None;
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        match self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(c) => {
                conn.live = Some(c.clone());
                conn.next_attempt = None;
                Some(c)
            }
            Err(e) => {
                tracing::debug!(error = %e, "bus unavailable");
                conn.next_attempt = Some(Instant::now() + RECONNECT_EVERY);
                None
            }
        }
    }
}
