//! Handler slots: how many handlers of a kind run at once. Waiting pods get slots by
//! priority, then age, not in arrival order (a plain semaphore is FIFO).

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, Utc};
use tokio::sync::oneshot;

/// A pool of slots for one kind.
#[derive(Clone, Debug)]
pub struct Slots {
    inner: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    free: usize,
    waiting: BinaryHeap<Waiter>,
    seq: u64,
}

#[derive(Debug)]
struct Waiter {
    priority: i32,
    created_at: DateTime<Utc>,
    seq: u64,
    grant: oneshot::Sender<Permit>,
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Waiter {}
impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Waiter {
    /// The heap's top is the highest priority, then the oldest task, then the first to
    /// ask.
    fn cmp(&self, other: &Self) -> Ordering {
        self.priority
            .cmp(&other.priority)
            .then_with(|| other.created_at.cmp(&self.created_at))
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

/// A held slot; dropping it passes the slot to the best waiter.
#[derive(Debug)]
pub struct Permit {
    slots: Option<Slots>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(slots) = self.slots.take() {
            slots.release();
        }
    }
}

impl Slots {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(State {
                free: capacity,
                waiting: BinaryHeap::new(),
                seq: 0,
            })),
        }
    }

    /// Waits for a slot. Cancel-safe: a dropped wait gives back a slot granted meanwhile.
    pub async fn acquire(&self, priority: i32, created_at: DateTime<Utc>) -> Permit {
        let rx = {
            let mut s = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            if s.free > 0 && s.waiting.is_empty() {
                s.free -= 1;
                return Permit {
                    slots: Some(self.clone()),
                };
            }
            let (tx, rx) = oneshot::channel();
            s.seq += 1;
            let seq = s.seq;
            s.waiting.push(Waiter {
                priority,
                created_at,
                seq,
                grant: tx,
            });
            rx
        };
        self.dispatch();
        match rx.await {
            Ok(permit) => permit,
            // The pool is never dropped while waiters exist (they hold a clone).
            Err(_) => Permit { slots: None },
        }
    }

    fn release(&self) {
        {
            let mut s = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            s.free += 1;
        }
        self.dispatch();
    }

    /// Hands free slots to the best waiters still listening.
    fn dispatch(&self) {
        loop {
            let waiter = {
                let mut s = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
                if s.free == 0 {
                    return;
                }
                let Some(w) = s.waiting.pop() else { return };
                s.free -= 1;
                w
            };
            let permit = Permit {
                slots: Some(self.clone()),
            };
            // A waiter that went away drops the permit it is handed, which frees the
            // slot again.
            let _ = waiter.grant.send(permit);
        }
    }

    pub fn waiting(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .waiting
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[tokio::test]
    async fn waiters_get_slots_by_priority_then_age() {
        let slots = Slots::new(1);
        let held = slots.acquire(0, Utc::now()).await;
        let t = |s| Utc.timestamp_opt(s, 0).single().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for (name, prio, created) in [
            ("low-old", 1, t(1)),
            ("high-new", 5, t(9)),
            ("high-old", 5, t(2)),
        ] {
            let slots = slots.clone();
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                let p = slots.acquire(prio, created).await;
                tx.send(name).unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                drop(p);
            }));
            tokio::task::yield_now().await;
        }
        while slots.waiting() < 3 {
            tokio::task::yield_now().await;
        }
        drop(held);
        let mut order = Vec::new();
        for _ in 0..3 {
            order.push(rx.recv().await.unwrap());
        }
        assert_eq!(order, ["high-old", "high-new", "low-old"]);
    }

    #[tokio::test]
    async fn a_cancelled_wait_does_not_leak_its_slot() {
        let slots = Slots::new(1);
        let held = slots.acquire(0, Utc::now()).await;
        let waiter = tokio::spawn({
            let slots = slots.clone();
            async move { slots.acquire(0, Utc::now()).await }
        });
        while slots.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        waiter.abort();
        let _ = waiter.await;
        drop(held);
        let again = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            slots.acquire(0, Utc::now()),
        )
        .await;
        assert!(again.is_ok(), "the slot came back");
    }
}
