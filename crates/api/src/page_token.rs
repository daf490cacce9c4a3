//! Opaque, signed page and resume tokens (AIP-158).
//!
//! A token is `base64url(json) "." base64url(hmac)`: the payload (where the page ends)
//! plus a fingerprint of the query it belongs to, signed with HMAC-SHA256 under a key
//! every replica shares, so any replica accepts any token and a token cannot be forged
//! or reused with different parameters. Verification tries the current key, then the
//! previous one, so keys rotate without breaking scans in flight.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use taskpod_core::Error;

use crate::settings::PageTokenSettings;

type HmacSha256 = Hmac<Sha256>;

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    /// Which RPC's token this is, so a ListTasks token is not a ListTaskEvents token.
    k: String,
    /// Fingerprint of the query parameters the token continues.
    f: String,
    p: T,
}

/// Signs and verifies tokens with the configured keys.
#[derive(Clone)]
pub struct PageTokens {
    current: Vec<u8>,
    previous: Option<Vec<u8>>,
}

impl std::fmt::Debug for PageTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageTokens(***)")
    }
}

impl PageTokens {
    pub fn new(settings: &PageTokenSettings) -> Self {
        Self {
            current: settings.current_key.expose().as_bytes().to_vec(),
            previous: settings
                .previous_key
                .as_ref()
                .map(|k| k.expose().as_bytes().to_vec()),
        }
    }

    /// A token for `payload`, valid only for `kind` and the query `fingerprint`.
    pub fn sign<T: Serialize>(&self, kind: &str, fingerprint: &str, payload: &T) -> String {
        let envelope = Envelope {
            k: kind.to_owned(),
            f: fingerprint.to_owned(),
            p: payload,
        };
        // Serialising plain data structs cannot fail.
        let body = serde_json::to_vec(&envelope).unwrap_or_default();
        let sig = mac(&self.current, &body);
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&body),
            URL_SAFE_NO_PAD.encode(sig)
        )
    }

    /// The payload of a token signed by [`PageTokens::sign`] for the same kind and query.
    ///
    /// # Errors
    /// `InvalidArgument` on `field` when the token is malformed, forged, from another
    /// RPC, or reused with different parameters.
    pub fn verify<T: DeserializeOwned>(
        &self,
        field: &str,
        kind: &str,
        fingerprint: &str,
        token: &str,
    ) -> Result<T, Error> {
        let bad = |reason: &str| Error::InvalidArgument {
            field: field.to_owned(),
            reason: reason.to_owned(),
        };
        let (body, sig) = token
            .split_once('.')
            .ok_or_else(|| bad("malformed token"))?;
        let body = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| bad("malformed token"))?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| bad("malformed token"))?;
        let signed = std::iter::once(&self.current)
            .chain(self.previous.as_ref())
            .any(|key| verify_mac(key, &body, &sig));
        if !signed {
            return Err(bad(
                "token signature is not valid (forged, or signed with a retired key)",
            ));
        }
        let envelope: Envelope<T> =
            serde_json::from_slice(&body).map_err(|_| bad("malformed token"))?;
        if envelope.k != kind {
            return Err(bad("token belongs to another RPC"));
        }
        if envelope.f != fingerprint {
            return Err(bad("token was issued for different request parameters"));
        }
        Ok(envelope.p)
    }
}

/// A short, stable digest of a query's parameters.
pub fn fingerprint<T: Serialize>(params: &T) -> String {
    let bytes = serde_json::to_vec(params).unwrap_or_default();
    Sha256::digest(&bytes)[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn mac(key: &[u8], body: &[u8]) -> Vec<u8> {
    #[allow(clippy::expect_used)]
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length");
    m.update(body);
    m.finalize().into_bytes().to_vec()
}

fn verify_mac(key: &[u8], body: &[u8], sig: &[u8]) -> bool {
    match <HmacSha256 as Mac>::new_from_slice(key) {
        Ok(mut m) => {
            m.update(body);
            m.verify_slice(sig).is_ok()
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use taskpod_core::store::Secret;

    fn tokens(current: &str, previous: Option<&str>) -> PageTokens {
        PageTokens::new(&PageTokenSettings {
            current_key: Secret::new(current),
            previous_key: previous.map(Secret::new),
        })
    }

    #[test]
    fn a_token_round_trips_and_survives_rotation() {
        let old = tokens("key-one-0123456789", None);
        let t = old.sign("tasks", "fp", &42u64);
        assert_eq!(
            old.verify::<u64>("page_token", "tasks", "fp", &t).unwrap(),
            42
        );
        let rotated = tokens("key-two-0123456789", Some("key-one-0123456789"));
        assert_eq!(
            rotated
                .verify::<u64>("page_token", "tasks", "fp", &t)
                .unwrap(),
            42
        );
        let retired = tokens("key-three-0123456789", Some("key-two-0123456789"));
        assert!(
            retired
                .verify::<u64>("page_token", "tasks", "fp", &t)
                .is_err()
        );
    }

    #[test]
    fn tokens_are_bound_to_their_rpc_and_parameters() {
        let k = tokens("key-one-0123456789", None);
        let t = k.sign("tasks", "fp", &1u64);
        let err = k
            .verify::<u64>("page_token", "tasks", "other", &t)
            .unwrap_err();
        assert_eq!(err.field(), Some("page_token"));
        assert!(k.verify::<u64>("page_token", "events", "fp", &t).is_err());
    }

    proptest! {
        #[test]
        fn tampered_tokens_are_refused(flip in 0usize..200, junk in ".{0,40}") {
            let k = tokens("key-one-0123456789", None);
            let t = k.sign("tasks", "fp", &"cursor");
            let mut bytes = t.clone().into_bytes();
            let i = flip % bytes.len();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let tampered = String::from_utf8(bytes).unwrap();
            if tampered != t {
                prop_assert!(k.verify::<String>("page_token", "tasks", "fp", &tampered).is_err());
            }
            prop_assert!(k.verify::<String>("page_token", "tasks", "fp", &junk).is_err());
        }
    }
}
