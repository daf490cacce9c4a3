//! `manual`: the pod holds the task while people move it with TransitionPhase; it only
//! waits to be stopped (completion and cancellation arrive as a status change).

use futures::future::BoxFuture;

use crate::handler::{Handler, HandlerError, PodContext};

#[derive(Debug)]
pub struct Manual;

impl Handler for Manual {
    fn run<'a>(&'a self, pod: &'a mut PodContext) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            pod.stopped().await;
            Err(HandlerError::Stopped)
        })
    }
}
