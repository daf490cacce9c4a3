//! The owner of the worker's background tasks: it notices when one dies and starts it
//! again, loudly.
//!
//! Every long-lived task the worker starts besides the pods (the maintenance services,
//! the crash recorder) is spawned here under a name with the function that makes it;
//! the control loop polls [`Supervisor::next_death`] in its `select!`, so a panic in a
//! chore is logged and the chore restarted after a short pause, never silently lost.

use std::collections::HashMap;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::task::{Id, JoinSet};

/// Makes a fresh instance of a task (the previous one died).
pub type Factory = Box<dyn FnMut() -> BoxFuture<'static, ()> + Send>;

/// How long a task that died waits before it starts again.
const RESTART_PAUSE: Duration = Duration::from_millis(500);

pub struct Supervisor {
    tasks: JoinSet<()>,
    names: HashMap<Id, &'static str>,
    factories: HashMap<&'static str, Factory>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("tasks", &self.names.values().collect::<Vec<_>>())
            .finish()
    }
}

/// A task that ended.
#[derive(Debug, PartialEq, Eq)]
pub struct Death {
    pub name: &'static str,
    pub panicked: bool,
}

impl Default for Supervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl Supervisor {
    pub fn new() -> Self {
        Self {
            tasks: JoinSet::new(),
            names: HashMap::new(),
            factories: HashMap::new(),
        }
    }

    /// Starts the task `name`, made by `factory` now and after every death.
    pub fn start(&mut self, name: &'static str, mut factory: Factory) {
        let handle = self.tasks.spawn(factory());
        self.names.insert(handle.id(), name);
        self.factories.insert(name, factory);
    }

    /// Waits for the next task to end (none ends while all are healthy: they run until
    /// shutdown), restarts it after a pause, and says which it was. Pending forever
    /// when nothing is supervised.
    pub async fn next_death(&mut self) -> Death {
        let Some(joined) = self.tasks.join_next_with_id().await else {
            return std::future::pending().await;
        };
        let (id, panicked) = match joined {
            Ok((id, ())) => (id, false),
            Err(e) => (e.id(), e.is_panic()),
        };
        let name = self.names.remove(&id).unwrap_or("unknown");
        tracing::error!(task = name, panicked, "background task died; restarting it");
        if let Some(factory) = self.factories.get_mut(name) {
            let fresh = factory();
            let handle = self.tasks.spawn(async move {
                tokio::time::sleep(RESTART_PAUSE).await;
                fresh.await;
            });
            self.names.insert(handle.id(), name);
        }
        Death { name, panicked }
    }

    /// Stops every task and waits for them.
    pub async fn shutdown(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_task_that_panics_is_restarted_and_reported() {
        let starts = Arc::new(AtomicU32::new(0));
        let mut s = Supervisor::new();
        s.start("flaky", {
            let starts = starts.clone();
            Box::new(move || {
                let n = starts.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move {
                    if n == 0 {
                        panic!("first run dies");
                    }
                    std::future::pending::<()>().await;
                })
            })
        });
        let death = s.next_death().await;
        assert_eq!(
            death,
            Death {
                name: "flaky",
                panicked: true
            }
        );
        tokio::time::sleep(RESTART_PAUSE * 2).await;
        assert_eq!(
            starts.load(Ordering::SeqCst),
            2,
            "made again after the death"
        );
        let waiting = tokio::time::timeout(Duration::from_secs(60), s.next_death()).await;
        assert!(waiting.is_err(), "the second run lives");
        s.shutdown().await;
    }
}
