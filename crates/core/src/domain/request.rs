//! Who is asking, and how to tie their request to its effects.

use serde::{Deserialize, Serialize};

/// Identity and correlation for one request, recorded on every event it causes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestContext {
    /// The authenticated caller; idempotency keys are scoped to it.
    pub principal: String,
    /// Who the change is attributed to on events: the principal, or a user it acts for.
    pub actor_id: String,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub traceparent: Option<String>,
    /// AIP-155 request id: a retry with the same id gets the first response.
    pub request_id: Option<String>,
}

impl RequestContext {
    /// A context where the principal acts as itself.
    pub fn new(actor: impl Into<String>) -> Self {
        let actor = actor.into();
        Self {
            principal: actor.clone(),
            actor_id: actor,
            ..Self::default()
        }
    }

    pub fn with_request_id(mut self, id: impl Into<String>) -> Self {
        self.request_id = Some(id.into());
        self
    }

    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }
}
