//! `sleep`: waits a fixed delay in each phase, then moves on, until the task completes.
//! With a delay of zero nothing happens in a phase, so the pod walks them all and
//! completes the task in one write (the same events, durable together): what the e2e
//! benchmark runs, measuring what a task costs beyond its handler's own steps.

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
                if self.delay.is_zero() {
                    // Nothing happens in a phase: walk them in one write.
                    pod.complete_remaining().await?;
                    continue;
                }
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
