//! Waiting for pods: StartPod and RestartPod return when the pod runs, StopPod when it
//! has stopped, or when the wait limit (the client's deadline, capped by `pod_wait_ms`)
//! passes; the answer is then the task as it stands. A retried call with the same
//! request_id gets the stored first response from the store and waits again, so a
//! client whose deadline passed can simply retry.

use std::time::Duration;

use taskpod_core::Error;
use taskpod_core::bus::channels;
use taskpod_core::domain::{PodState, Status, TaskId};
use taskpod_core::store::Store;
use tonic::metadata::MetadataMap;

use crate::hub::Hub;

/// How often a waiting call re-reads the head when no news wakes it first (without a
/// bus, or when a publish was lost).
const POLL: Duration = Duration::from_millis(100);
/// Left for the answer to travel back before the client's deadline.
const MARGIN: Duration = Duration::from_millis(50);

/// What the call waits for.
#[derive(Clone, Copy, Debug)]
pub enum Until {
    /// A pod with an epoch above this one runs (or the task left `active`).
    RunningAfter(i64),
    /// No pod is minted or running (or the task is active again with a new pod).
    Stopped,
}

#[derive(Clone, Debug)]
pub struct PodWaits {
    store: Store,
    max_wait: Duration,
    /// Wakes a waiting call when the task's channel has news (the pod's `pod_started`
    /// or `pod_stopped`), so the answer does not wait for the next poll.
    hub: Hub,
}

impl PodWaits {
    pub fn new(store: Store, max_wait: Duration, hub: Hub) -> Self {
        Self {
            store,
            max_wait,
            hub,
        }
    }

    /// Waits until `until` holds or the limit passes; either way returns normally.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn wait(
        &self,
        id: TaskId,
        until: Until,
        metadata: &MetadataMap,
    ) -> Result<(), Error> {
        let limit = client_deadline(metadata).map_or(self.max_wait, |d| {
            d.saturating_sub(MARGIN).min(self.max_wait)
        });
        let started = tokio::time::Instant::now();
        // Follow before the first read: news committed in between still wakes us.
        let mut follow = self.hub.follow(channels::task(id));
        loop {
            let state = self.store.state(id).await?;
            let done = match until {
                Until::RunningAfter(epoch) => {
                    state.status != Status::Active
                        || (state.pod_state == PodState::Running && state.pod_epoch > epoch)
                }
                Until::Stopped => {
                    state.pod_state == PodState::None || state.status == Status::Active
                }
            };
            let left = limit.saturating_sub(started.elapsed());
            if done || left.is_zero() {
                return Ok(());
            }
            tokio::select! {
                _ = follow.news.changed() => {}
                () = tokio::time::sleep(POLL.min(left)) => {}
            }
        }
    }
}

/// The client's deadline from the `grpc-timeout` header (`<digits><unit>`).
pub fn client_deadline(metadata: &MetadataMap) -> Option<Duration> {
    let raw = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = raw.split_at(raw.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        let mut m = MetadataMap::new();
        assert_eq!(client_deadline(&m), None);
        m.insert("grpc-timeout", "1500m".parse().unwrap());
        assert_eq!(client_deadline(&m), Some(Duration::from_millis(1500)));
        m.insert("grpc-timeout", "2S".parse().unwrap());
        assert_eq!(client_deadline(&m), Some(Duration::from_secs(2)));
        m.insert("grpc-timeout", "x".parse().unwrap());
        assert_eq!(client_deadline(&m), None);
    }
}
