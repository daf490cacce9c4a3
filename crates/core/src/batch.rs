//! Group commit: concurrent callers' requests share one flush.
//!
//! A caller hands its request to a [`Batcher`] and waits for its own answer. A few
//! flushers each take whatever has queued (up to a batch) and hand it to the flush
//! function, which answers every request in order; the store's batch operations
//! (`append_pods`, `create_each`) give each item the outcome it would have had alone.
//! A lone request goes out at once, so a quiet process adds no latency; under load,
//! requests that arrive while a flush is in flight share the next one. Postgres
//! already shares WAL flushes among concurrent commits: what a shared flush saves is
//! the round trips and the per-transaction work.
//!
//! A flush stuck on a silent store connection must not hold the requests queued behind
//! it: one that runs past [`Shape::stall`] is left to finish on its own (a few at a
//! time) while its flusher takes the next batch, and a flush whose callers have all
//! stopped waiting (each waits at most the store's call limit) is given up, which lets
//! go of its connection.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, Semaphore, mpsc, oneshot};
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, Span};

use crate::telemetry::context::{link, traceparent_of};

struct Item<T, R> {
    request: T,
    /// The caller's span: a batch of one runs in it; a larger batch runs in a child of
    /// the first caller's span, linked to the others.
    span: Span,
    reply: oneshot::Sender<R>,
}

/// Where callers send requests; cheap to clone. The flushers stop once every clone is
/// dropped and the queue is empty.
pub struct Batcher<T, R> {
    tx: mpsc::Sender<Item<T, R>>,
}

impl<T, R> Clone for Batcher<T, R> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<T, R> std::fmt::Debug for Batcher<T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").finish_non_exhaustive()
    }
}

/// How a batcher flushes.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// The most requests one flush takes.
    pub max_batch: usize,
    /// Flushes in flight at once: one can wait on a row lock while the next proceeds.
    pub flushers: usize,
    /// A flush running longer than this no longer holds its flusher: up to `flushers`
    /// such flushes finish on their own while the flushers go on.
    pub stall: Duration,
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// Starts the flushers on `tracker`. `flush` must answer every request of its
    /// batch, in order.
    pub fn start<F, Fut>(shape: Shape, tracker: &TaskTracker, flush: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Item<T, R>>(shape.max_batch * shape.flushers.max(1) * 4);
        let rx = Arc::new(Mutex::new(rx));
        let stalled = Arc::new(Semaphore::new(shape.flushers.max(1)));
        for _ in 0..shape.flushers.max(1) {
            tracker.spawn(run(
                rx.clone(),
                shape,
                stalled.clone(),
                tracker.clone(),
                flush.clone(),
            ));
        }
        Self { tx }
    }

    /// Sends `request` and waits for its answer, at most the store's call limit
    /// (`store::call_limit`) in all: a caller never waits on the flushes queued ahead of
    /// it (each with its own bound) one after the other. A request whose caller gave
    /// up before it was flushed is dropped; one already flushing may still take effect,
    /// as any call past its deadline may.
    ///
    /// # Errors
    /// [`NoAnswer`]: the flushers stopped, or no answer came in time.
    pub async fn call(&self, request: T) -> Result<R, NoAnswer> {
        let limit = crate::store::call_limit();
        let (reply, answer) = oneshot::channel();
        let item = Item {
            request,
            span: Span::current(),
            reply,
        };
        let sent = tokio::time::timeout(limit, async {
            self.tx.send(item).await.map_err(|_| NoAnswer::Stopped)?;
            answer.await.map_err(|_| NoAnswer::Stopped)
        });
        sent.await.unwrap_or(Err(NoAnswer::TimedOut(limit)))
    }
}

/// Why a [`Batcher::call`] got no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoAnswer {
    #[error("the flushers stopped")]
    Stopped,
    #[error("no answer from the store within {0:?}")]
    TimedOut(std::time::Duration),
}

async fn run<T, R, F, Fut>(
    rx: Arc<Mutex<mpsc::Receiver<Item<T, R>>>>,
    shape: Shape,
    stalled: Arc<Semaphore>,
    tracker: TaskTracker,
    flush: F,
) where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(Vec<T>) -> Fut,
    Fut: Future<Output = Vec<R>> + Send + 'static,
{
    let max_batch = shape.max_batch.max(1);
    loop {
        let mut batch = Vec::with_capacity(max_batch);
        {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else {
                return;
            };
            batch.push(first);
            while batch.len() < max_batch {
                match rx.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            // Nobody waits for these any more (their callers' bound passed).
            batch.retain(|item| !item.reply.is_closed());
        }
        let span = match batch.as_slice() {
            [only] => only.span.clone(),
            [first, rest @ ..] => {
                let span = tracing::info_span!(
                    parent: &first.span,
                    "taskpod.batch",
                    taskpod.batch = batch.len(),
                );
                for other in rest {
                    link(&span, traceparent_of(&other.span).as_deref());
                }
                span
            }
            [] => continue,
        };
        let (requests, replies): (Vec<T>, Vec<oneshot::Sender<R>>) =
            batch.into_iter().map(|i| (i.request, i.reply)).unzip();
        let mut flight = tracker.spawn(answer(flush(requests), replies).instrument(span));
        if tokio::time::timeout(shape.stall, &mut flight).await.is_ok() {
            continue;
        }
        match stalled.clone().try_acquire_owned() {
            // Left to finish on its own, holding one of the stalled places meanwhile.
            Ok(place) => {
                tracker.spawn(async move {
                    let _ = flight.await;
                    drop(place);
                });
            }
            // Too many stalled already: this flusher waits too.
            Err(_) => {
                let _ = flight.await;
            }
        }
    }
}

/// Runs a flush and hands each caller its answer; gives the flush up (dropping
/// whatever store call it waits on) once none of its callers is waiting any more.
async fn answer<R>(flush: impl Future<Output = Vec<R>>, mut replies: Vec<oneshot::Sender<R>>) {
    let answers = tokio::select! {
        answers = flush => answers,
        () = all_gone(&mut replies) => return,
    };
    for (reply, answer) in replies.into_iter().zip(answers) {
        // A caller that stopped waiting no longer needs its answer.
        let _ = reply.send(answer);
    }
}

async fn all_gone<R>(replies: &mut [oneshot::Sender<R>]) {
    futures::future::join_all(replies.iter_mut().map(oneshot::Sender::closed)).await;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn each_caller_gets_its_own_answer_and_concurrent_calls_share_flushes() {
        let tracker = TaskTracker::new();
        let flushes = Arc::new(AtomicUsize::new(0));
        let counted = flushes.clone();
        let batcher = Batcher::start(
            Shape {
                max_batch: 64,
                flushers: 1,
                stall: Duration::from_secs(1),
            },
            &tracker,
            move |batch: Vec<u32>| {
                let counted = counted.clone();
                async move {
                    counted.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    batch.into_iter().map(|n| n * 2).collect::<Vec<_>>()
                }
            },
        );
        let calls: Vec<_> = (0..200u32)
            .map(|n| {
                let b = batcher.clone();
                tokio::spawn(async move { (n, b.call(n).await) })
            })
            .collect();
        for call in calls {
            let (n, answer) = call.await.unwrap();
            assert_eq!(answer, Ok(n * 2));
        }
        let flushes = flushes.load(Ordering::Relaxed);
        assert!(flushes < 200, "calls shared flushes: {flushes}");
        drop(batcher);
        tracker.close();
        tracker.wait().await;
    }

    struct SilentStore {
        tracker: TaskTracker,
        batcher: Batcher<u32, u32>,
        /// Every request a flush was given.
        flushed: Arc<std::sync::Mutex<Vec<u32>>>,
        /// Hanging flushes dropped before they ended.
        dropped: Arc<AtomicUsize>,
    }

    /// A flusher whose every flush hangs far past the call limit, as on a silent store,
    /// except for requests `fast` lets through.
    fn silent_store(stall: Duration, fast: fn(u32) -> bool) -> SilentStore {
        struct Dropped(Arc<AtomicUsize>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let tracker = TaskTracker::new();
        let flushed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let dropped = Arc::new(AtomicUsize::new(0));
        let batcher = Batcher::start(
            Shape {
                max_batch: 4,
                flushers: 1,
                stall,
            },
            &tracker,
            {
                let (flushed, dropped) = (flushed.clone(), dropped.clone());
                move |batch: Vec<u32>| {
                    let (flushed, dropped) = (flushed.clone(), dropped.clone());
                    async move {
                        if let Ok(mut f) = flushed.lock() {
                            f.extend(batch.iter().copied());
                        }
                        if !batch.iter().all(|n| fast(*n)) {
                            let guard = Dropped(dropped);
                            tokio::time::sleep(crate::store::call_limit() * 10).await;
                            std::mem::forget(guard);
                        }
                        batch
                    }
                }
            },
        );
        SilentStore {
            tracker,
            batcher,
            flushed,
            dropped,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_waits_at_most_the_call_limit_and_a_request_left_behind_is_not_flushed() {
        let SilentStore {
            tracker,
            batcher,
            flushed,
            dropped,
        } = silent_store(crate::store::call_limit() * 100, |_| false);
        let first = tokio::spawn({
            let b = batcher.clone();
            async move { b.call(1).await }
        });
        tokio::task::yield_now().await;
        // Queued behind the hanging flush: its caller gives up before the flusher is free.
        let second = tokio::time::timeout(crate::store::call_limit() / 2, batcher.call(2)).await;
        assert!(second.is_err());
        assert!(matches!(first.await, Ok(Err(NoAnswer::TimedOut(_)))));
        tokio::time::sleep(crate::store::call_limit() * 20).await;
        assert_eq!(
            flushed.lock().map(|f| f.clone()).unwrap_or_default(),
            vec![1],
            "the request whose caller gave up was never flushed"
        );
        assert_eq!(
            dropped.load(Ordering::Relaxed),
            1,
            "the flush nobody waited for any more was given up"
        );
        drop(batcher);
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_flush_does_not_hold_the_requests_behind_it() {
        let stall = Duration::from_secs(1);
        let SilentStore {
            tracker, batcher, ..
        } = silent_store(stall, |n| n != 1);
        let stuck = tokio::spawn({
            let b = batcher.clone();
            async move { b.call(1).await }
        });
        tokio::task::yield_now().await;
        let started = tokio::time::Instant::now();
        assert_eq!(batcher.call(2).await, Ok(2));
        assert!(
            started.elapsed() < crate::store::call_limit() / 2,
            "answered once the stuck flush stalled, not when it gave up"
        );
        assert_eq!(batcher.call(3).await, Ok(3));
        assert!(matches!(stuck.await, Ok(Err(NoAnswer::TimedOut(_)))));
        drop(batcher);
        tracker.close();
        tracker.wait().await;
    }
}
