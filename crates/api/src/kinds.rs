//! Kinds are a cluster contract: CreateTask refuses a kind no registered worker offers,
//! and an `exec` task whose program no worker is configured to run. The offer is read
//! from `nodes` and cached briefly, so a new worker's kinds are accepted within
//! [`REFRESH`].

use std::sync::Arc;
use std::time::Duration;

use taskpod_core::Error;
use taskpod_core::domain::NewTask;
use taskpod_core::store::Store;
use tokio::sync::Mutex;
use tokio::time::Instant;

pub const REFRESH: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct Offer {
    kinds: Vec<String>,
    programs: Vec<String>,
    read_at: Option<Instant>,
}

#[derive(Clone, Debug)]
pub struct KindCatalog {
    store: Store,
    offer: Arc<Mutex<Offer>>,
}

impl KindCatalog {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            offer: Arc::new(Mutex::new(Offer::default())),
        }
    }

    /// Checks every task of a request against the current offer.
    ///
    /// # Errors
    /// `InvalidArgument` on `kind` or `payload` (the first task at fault, as a batch
    /// item when `batch`); `StoreUnavailable`.
    pub async fn check(&self, tasks: &[NewTask], batch: bool) -> Result<(), Error> {
        let mut offer = self.offer.lock().await;
        if offer.read_at.is_none_or(|t| t.elapsed() >= REFRESH) {
            let nodes = self.store.nodes().await?;
            offer.kinds = nodes.iter().flat_map(|n| n.kinds.iter().cloned()).collect();
            offer.programs = nodes
                .iter()
                .flat_map(|n| n.programs.iter().cloned())
                .collect();
            offer.read_at = Some(Instant::now());
        }
        for (index, task) in tasks.iter().enumerate() {
            let err = if !offer.kinds.contains(&task.kind) {
                Some(Error::InvalidArgument {
                    field: "kind".into(),
                    reason: format!("no worker offers kind {:?}", task.kind),
                })
            } else if task.kind == "exec" {
                let program = task
                    .payload
                    .get("program")
                    .and_then(|p| p.as_str())
                    .unwrap_or_default();
                (!offer.programs.iter().any(|p| p == program)).then(|| Error::InvalidArgument {
                    field: "payload".into(),
                    reason: format!("no worker is configured to run program {program:?}"),
                })
            } else {
                None
            };
            if let Some(err) = err {
                return Err(if batch {
                    Error::InvalidBatchItem {
                        index,
                        source: Box::new(err),
                    }
                } else {
                    err
                });
            }
        }
        Ok(())
    }
}
