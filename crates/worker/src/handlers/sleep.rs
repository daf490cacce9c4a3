//! `sleep`: waits a fixed delay in each phase, then moves on, until the task completes.
//! A delay of zero walks the phases as fast as the store allows (the e2e benchmark).

use std::time::Duration;

use futures::future::BoxFuture;

use crate::handler::{Handler, HandlerError, PodContext};

#[derive(Debug)]
pub struct Sleep {
    delay: Duration,
}

impl Sleep {
    pub fn new(phase_ms: u64) -> Self {
        Self {
            delay: Duration::from_millis(phase_ms),
        }
    }
}

impl Handler for Sleep {
    fn run<'a>(&'a self, pod: &'a mut PodContext) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            while !pod.phase().is_terminal() {
                tokio::select! {
                    () = tokio::time::sleep(self.delay) => {}
                    () = pod.stopped() => return Err(HandlerError::Stopped),
                }
                pod.advance().await?;
            }
            Ok(())
        })
    }
}
