//! Bearer-token authentication and the request context every change is recorded with.
//!
//! Tokens are configured as SHA-256 hashes; a request's token is hashed and looked up,
//! so the configuration never holds a usable secret. The principal a token maps to is
//! the caller: request ids are scoped to it, and it is the actor recorded on events
//! unless the request names another actor, which needs `act_on_behalf`.

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use taskpod_core::domain::RequestContext;
use taskpod_core::telemetry::context::traceparent_or;
use taskpod_proto::v1::RequestMeta;
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use crate::settings::AuthSettings;

/// Who is calling, put into each request's extensions by [`Authenticator::intercept`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// Authenticated by a token.
    Principal { name: String, act_on_behalf: bool },
    /// Authentication is off (local development): requests name their actor.
    Anonymous,
}

#[derive(Clone, Debug)]
struct Grant {
    principal: String,
    act_on_behalf: bool,
}

/// Checks bearer tokens against the configured hashes.
#[derive(Clone, Debug)]
pub struct Authenticator {
    enabled: bool,
    by_hash: HashMap<[u8; 32], Grant>,
}

impl Authenticator {
    /// Builds the lookup table; the settings were checked at load (64 hex characters).
    pub fn new(settings: &AuthSettings) -> Self {
        let by_hash = settings
            .tokens
            .iter()
            .filter_map(|t| {
                let hash = decode_hex32(&t.sha256)?;
                Some((
                    hash,
                    Grant {
                        principal: t.principal.clone(),
                        act_on_behalf: t.act_on_behalf,
                    },
                ))
            })
            .collect();
        Self {
            enabled: settings.enabled,
            by_hash,
        }
    }

    /// Identifies the caller from the `authorization: Bearer <token>` header.
    ///
    /// # Errors
    /// UNAUTHENTICATED when auth is on and the token is missing, malformed or unknown.
    pub fn caller(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        if !self.enabled {
            return Ok(Caller::Anonymous);
        }
        let header = metadata
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("missing bearer token"))?;
        let token = bearer(header.to_str().ok())
            .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <token>`"))?;
        let grant = self
            .grant(token)
            .ok_or_else(|| Status::unauthenticated("invalid token"))?;
        Ok(Caller::Principal {
            name: grant.principal.clone(),
            act_on_behalf: grant.act_on_behalf,
        })
    }

    /// The principal a request's bearer token names, when authentication is on and
    /// the token is valid; for admission, which runs before the interceptor.
    pub fn principal(&self, headers: &http::HeaderMap) -> Option<String> {
        if !self.enabled {
            return None;
        }
        let header = headers.get("authorization")?;
        let token = bearer(header.to_str().ok())?;
        self.grant(token).map(|g| g.principal.clone())
    }

    fn grant(&self, token: &str) -> Option<&Grant> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.by_hash.get(&hash)
    }

    /// A tonic interceptor: authenticates and stores the [`Caller`] in the request.
    ///
    /// # Errors
    /// As [`Authenticator::caller`].
    pub fn intercept(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.caller(request.metadata())?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// The token of an `authorization: Bearer <token>` value.
fn bearer(value: Option<&str>) -> Option<&str> {
    let v = value?;
    v.strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The context a change is recorded with: principal, actor, correlation, trace.
///
/// # Errors
/// PERMISSION_DENIED when the caller names another actor without `act_on_behalf`;
/// UNAUTHENTICATED when the interceptor did not run.
pub fn request_context(
    metadata: &MetadataMap,
    caller: Option<&Caller>,
    meta: Option<&RequestMeta>,
) -> Result<RequestContext, Status> {
    let caller = caller.ok_or_else(|| Status::unauthenticated("no caller"))?;
    let requested_actor = meta.map(|m| m.actor_id.trim()).filter(|a| !a.is_empty());
    let (principal, actor_id) = match caller {
        Caller::Anonymous => {
            // The domain refuses an empty actor with MISSING_ACTOR_ID.
            let actor = requested_actor.unwrap_or_default().to_owned();
            (actor.clone(), actor)
        }
        Caller::Principal {
            name,
            act_on_behalf,
        } => match requested_actor {
            Some(actor) if actor != name && !act_on_behalf => {
                return Err(Status::permission_denied(format!(
                    "principal {name:?} may not act on behalf of {actor:?}"
                )));
            }
            Some(actor) => (name.clone(), actor.to_owned()),
            None => (name.clone(), name.clone()),
        },
    };
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    Ok(RequestContext {
        principal,
        actor_id,
        correlation_id: meta.and_then(|m| non_empty(&m.correlation_id)),
        causation_id: None,
        // The server span's context, so the events (and the pods that act on them)
        // continue this call's trace; the caller's own when this process does not
        // trace.
        traceparent: traceparent_or(metadata.get("traceparent").and_then(|v| v.to_str().ok())),
        request_id: meta.and_then(|m| non_empty(&m.request_id)),
    })
}

fn decode_hex32(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// The hex SHA-256 of a token, as the configuration stores it.
pub fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::TokenSettings;

    fn auth() -> Authenticator {
        Authenticator::new(&AuthSettings {
            enabled: true,
            tokens: vec![
                TokenSettings {
                    principal: "ci".into(),
                    sha256: token_hash("s3cret"),
                    act_on_behalf: false,
                },
                TokenSettings {
                    principal: "gateway".into(),
                    sha256: token_hash("gw"),
                    act_on_behalf: true,
                },
            ],
        })
    }

    fn md(token: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(t) = token {
            m.insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        m
    }

    fn meta(actor: &str) -> RequestMeta {
        RequestMeta {
            actor_id: actor.into(),
            ..RequestMeta::default()
        }
    }

    #[test]
    fn tokens_map_to_principals() {
        let a = auth();
        assert_eq!(
            a.caller(&md(None)).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            a.caller(&md(Some("wrong"))).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let ci = a.caller(&md(Some("s3cret"))).unwrap();
        let ctx = request_context(&MetadataMap::new(), Some(&ci), None).unwrap();
        assert_eq!(
            (ctx.principal.as_str(), ctx.actor_id.as_str()),
            ("ci", "ci")
        );
    }

    #[test]
    fn acting_on_behalf_needs_the_right() {
        let a = auth();
        let ci = a.caller(&md(Some("s3cret"))).unwrap();
        let err = request_context(&MetadataMap::new(), Some(&ci), Some(&meta("bob"))).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(request_context(&MetadataMap::new(), Some(&ci), Some(&meta("ci"))).is_ok());
        let gw = a.caller(&md(Some("gw"))).unwrap();
        let ctx = request_context(&MetadataMap::new(), Some(&gw), Some(&meta("bob"))).unwrap();
        assert_eq!(
            (ctx.principal.as_str(), ctx.actor_id.as_str()),
            ("gateway", "bob")
        );
    }

    #[test]
    fn without_auth_the_actor_is_the_principal() {
        let ctx = request_context(
            &MetadataMap::new(),
            Some(&Caller::Anonymous),
            Some(&meta("dev")),
        )
        .unwrap();
        assert_eq!(
            (ctx.principal.as_str(), ctx.actor_id.as_str()),
            ("dev", "dev")
        );
        let ctx = request_context(&MetadataMap::new(), Some(&Caller::Anonymous), None).unwrap();
        assert!(ctx.actor_id.is_empty(), "left for the domain to refuse");
    }
}
