//! Kinds are a cluster contract: CreateTask refuses a kind no registered worker offers,
//! and an `exec` task whose program no worker is configured to run. The offer is read
//! from `nodes` and cached briefly, so a new worker's kinds are accepted within
//! [`REFRESH`].
//!
//! No caller waits on another's read: one caller refreshes a stale offer while the
//! others check against the one they have (a replica cut from Postgres must answer
//! every create within its own bound, not queue them behind one slow read). Only
//! before the first read does a caller read the offer itself.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use taskpod_core::Error;
use taskpod_core::domain::NewTask;
use taskpod_core::store::Store;
use tokio::time::Instant;

pub const REFRESH: Duration = Duration::from_secs(1);
/// How long a request refreshing a stale offer waits for the read before it goes on
/// with the stale one.
const REFRESH_WAIT: Duration = Duration::from_millis(500);

#[derive(Clone, Debug, Default)]
struct Offer {
    kinds: Vec<String>,
    programs: Vec<String>,
    read_at: Option<Instant>,
}

#[derive(Clone, Debug)]
pub struct KindCatalog {
    store: Store,
    /// The last offer read; held only to copy it in or out, never across a read.
    offer: Arc<Mutex<Offer>>,
    /// Held by the one caller refreshing a stale offer.
    refreshing: Arc<tokio::sync::Mutex<()>>,
}

impl KindCatalog {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            offer: Arc::new(Mutex::new(Offer::default())),
            refreshing: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    fn cached(&self) -> Offer {
        self.offer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    async fn read(&self) -> Result<Offer, Error> {
        let nodes = self.store.nodes().await?;
        let offer = Offer {
            kinds: nodes.iter().flat_map(|n| n.kinds.iter().cloned()).collect(),
            programs: nodes
                .iter()
                .flat_map(|n| n.programs.iter().cloned())
                .collect(),
            read_at: Some(Instant::now()),
        };
        *self.offer.lock().unwrap_or_else(PoisonError::into_inner) = offer.clone();
        Ok(offer)
    }

    /// The offer to check against: the cached one while fresh; a stale one is
    /// refreshed by whoever gets there first, the others use it as it is.
    async fn offer(&self) -> Result<Offer, Error> {
        let cached = self.cached();
        match cached.read_at {
            Some(at) if at.elapsed() < REFRESH => Ok(cached),
            // The refresher waits a little only: a slow read (the store is cut off) must
            // not add to its request's own bound.
            Some(_) => match self.refreshing.try_lock() {
                Ok(_refreshing) => match tokio::time::timeout(REFRESH_WAIT, self.read()).await {
                    Ok(Ok(fresh)) => Ok(fresh),
                    Ok(Err(_)) | Err(_) => Ok(cached),
                },
                Err(_) => Ok(cached),
            },
            None => self.read().await,
        }
    }

    /// Checks every task of a request against the current offer.
    ///
    /// # Errors
    /// `InvalidArgument` on `kind` or `payload` (the first task at fault, as a batch
    /// item when `batch`); `StoreUnavailable`.
    pub async fn check(&self, tasks: &[NewTask], batch: bool) -> Result<(), Error> {
        let offer = self.offer().await?;
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
