//! The API server's typed settings: defaults, then an optional TOML file, then
//! `TASKPOD_*` environment variables (`__` for nesting, e.g. `TASKPOD_STORE__URL`).
//! Unknown keys are rejected, and a setting that cannot work stops start-up with a
//! message naming it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use taskpod_core::bus::BusSettings;
pub use taskpod_core::config::SettingsError;
use taskpod_core::config::{self, invalid};
use taskpod_core::store::{Secret, StoreSettings};

/// The top-level keys, so `TASKPOD_*` variables meant for other programs are left alone.
const TOP_LEVEL_KEYS: &[&str] = &[
    "listen",
    "metrics_listen",
    "store",
    "auth",
    "page_tokens",
    "tls",
    "max_message_bytes",
    "shutdown_grace_ms",
    "watch",
    "idempotency_ttl_secs",
    "pod_wait_ms",
    "bus",
    "reflection",
    "max_page_bytes",
    "limits",
];

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSettings {
    /// Where to listen for gRPC; port 0 picks a free one (printed at start).
    pub listen: SocketAddr,
    /// Where to serve `GET /metrics` (OpenMetrics text with exemplars); unset serves
    /// none. Port 0 picks a free one (printed at start).
    pub metrics_listen: Option<SocketAddr>,
    pub store: StoreSettings,
    pub auth: AuthSettings,
    pub page_tokens: PageTokenSettings,
    /// Serve TLS (rustls) when set.
    pub tls: Option<TlsSettings>,
    /// Largest request or response message, in bytes.
    pub max_message_bytes: usize,
    /// A ListTasks or ListActivePods page ends before its tasks pass this many encoded
    /// bytes (its token continues after the last one); at most half of
    /// `max_message_bytes`, so a page always fits in a message.
    pub max_page_bytes: usize,
    /// How long in-flight calls get to finish after SIGTERM.
    pub shutdown_grace_ms: u64,
    pub watch: WatchSettings,
    /// Request ids older than this are forgotten: a later retry is a new request.
    pub idempotency_ttl_secs: u64,
    /// The longest StartPod/RestartPod wait for the pod to run, and StopPod for it to
    /// stop, when the client's deadline allows; 0 answers once the request is recorded.
    pub pod_wait_ms: u64,
    /// Redis: every committed change is announced there for workers and watchers.
    pub bus: BusSettings,
    /// Serve gRPC server reflection (v1 and v1alpha), which lets grpcurl, Postman and
    /// grpcio clients discover the API. Switch it off to not describe the API to anyone
    /// who can connect.
    pub reflection: bool,
    /// Transport, rate and in-flight limits (see `docs/api.md`, "Limits").
    pub limits: crate::admission::LimitSettings,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            metrics_listen: None,
            store: StoreSettings {
                application_name: "taskpod-api".into(),
                ..StoreSettings::default()
            },
            auth: AuthSettings::default(),
            page_tokens: PageTokenSettings::default(),
            tls: None,
            max_message_bytes: 4 * 1024 * 1024,
            max_page_bytes: 1024 * 1024,
            shutdown_grace_ms: 10_000,
            watch: WatchSettings::default(),
            idempotency_ttl_secs: 24 * 3600,
            pod_wait_ms: 10_000,
            bus: BusSettings::default(),
            reflection: true,
            limits: crate::admission::LimitSettings::default(),
        }
    }
}

/// Bearer tokens, stored as SHA-256 hashes so the configuration never holds a usable
/// secret.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// Off only for local development: then every request must name its actor_id, and
    /// that actor is also the principal request ids are scoped to.
    pub enabled: bool,
    pub tokens: Vec<TokenSettings>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            tokens: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenSettings {
    /// Who the token authenticates; recorded as the actor unless the request names
    /// another one (which needs `act_on_behalf`).
    pub principal: String,
    /// Lowercase hex SHA-256 of the token.
    pub sha256: String,
    /// May name another actor_id on requests (a gateway acting for its users).
    #[serde(default)]
    pub act_on_behalf: bool,
}

/// Keys that sign page and resume tokens. Every replica must share them, so any replica
/// accepts any token; `previous_key` keeps tokens valid across a rotation.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct PageTokenSettings {
    pub current_key: Secret,
    pub previous_key: Option<Secret>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct WatchSettings {
    /// How often a watch stream looks for changes in Postgres.
    pub poll_interval_ms: u64,
    /// How often an idle stream sends a heartbeat.
    pub heartbeat_interval_ms: u64,
    /// With a bus, how often the replica still reads the change feed once for all its
    /// watchers, to repair publishes Redis dropped.
    pub repair_interval_ms: u64,
    /// How long a WatchTasks resume token stays valid. Resuming rebuilds what the
    /// stream followed from the changes since the token's point, so this bounds that
    /// work; an older token is refused (FAILED_PRECONDITION) and the client starts over.
    pub resume_token_ttl_secs: u64,
}

impl Default for WatchSettings {
    fn default() -> Self {
        Self {
            poll_interval_ms: 250,
            heartbeat_interval_ms: 10_000,
            repair_interval_ms: 1_000,
            resume_token_ttl_secs: 3_600,
        }
    }
}

impl ApiSettings {
    /// Loads defaults, then `file` if given, then the environment.
    ///
    /// # Errors
    /// A file or variable that does not parse, an unknown key, or a setting that
    /// cannot work (see [`ApiSettings::check`]).
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        let settings: Self = config::load(file, TOP_LEVEL_KEYS)?;
        settings.check()?;
        Ok(settings)
    }

    /// Refuses settings that would fail later, naming the setting.
    ///
    /// # Errors
    /// [`SettingsError::Invalid`].
    pub fn check(&self) -> Result<(), SettingsError> {
        if self.page_tokens.current_key.expose().len() < 16 {
            return invalid(
                "page_tokens.current_key",
                "must be set, at least 16 characters, and the same on every replica",
            );
        }
        if self.auth.enabled && self.auth.tokens.is_empty() {
            return invalid("auth.tokens", "auth is enabled but no token is configured");
        }
        for t in &self.auth.tokens {
            if t.sha256.len() != 64 || !t.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return invalid(
                    "auth.tokens.sha256",
                    "must be 64 hex characters (SHA-256 of the token)",
                );
            }
            if t.principal.trim().is_empty() {
                return invalid("auth.tokens.principal", "must not be empty");
            }
        }
        if self.max_message_bytes < 64 * 1024 {
            return invalid("max_message_bytes", "must be at least 65536");
        }
        if let Some(name) = self.limits.zero() {
            return invalid(name, "must be positive");
        }
        if self.max_page_bytes == 0 || self.max_page_bytes > self.max_message_bytes / 2 {
            return invalid(
                "max_page_bytes",
                "must be positive and at most half of max_message_bytes",
            );
        }
        if self.watch.poll_interval_ms == 0
            || self.watch.heartbeat_interval_ms == 0
            || self.watch.repair_interval_ms == 0
            || self.watch.resume_token_ttl_secs == 0
        {
            return invalid("watch", "intervals must be positive");
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;

    fn valid() -> ApiSettings {
        ApiSettings {
            page_tokens: PageTokenSettings {
                current_key: Secret::new("0123456789abcdef"),
                previous_key: None,
            },
            auth: AuthSettings {
                enabled: false,
                tokens: vec![],
            },
            ..ApiSettings::default()
        }
    }

    #[test]
    fn defaults_need_a_page_token_key() {
        let err = ApiSettings::default().check().unwrap_err();
        assert!(err.to_string().contains("page_tokens.current_key"), "{err}");
        valid().check().unwrap();
    }

    #[test]
    fn auth_without_tokens_is_refused() {
        let s = ApiSettings {
            auth: AuthSettings::default(),
            ..valid()
        };
        assert!(s.check().unwrap_err().to_string().contains("auth.tokens"));
    }

    #[test]
    fn files_and_environment_layer_over_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "api.toml",
                r#"
                listen = "127.0.0.1:7000"
                [page_tokens]
                current_key = "from-the-file-0123456789"
                [auth]
                enabled = false
                "#,
            )?;
            jail.set_env("TASKPOD_LISTEN", "127.0.0.1:7001");
            jail.set_env("TASKPOD_STORE__MAX_CONNECTIONS", "3");
            let s = ApiSettings::load(Some(Path::new("api.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(s.listen.port(), 7001, "the environment wins over the file");
            assert_eq!(s.store.max_connections, 3);
            assert_eq!(
                s.page_tokens.current_key.expose(),
                "from-the-file-0123456789"
            );
            Ok(())
        });
    }

    #[test]
    fn other_programs_variables_are_ignored() {
        figment::Jail::expect_with(|jail| {
            jail.set_env(
                "TASKPOD_PAGE_TOKENS__CURRENT_KEY",
                "from-the-env-0123456789",
            );
            jail.set_env("TASKPOD_AUTH__ENABLED", "false");
            jail.set_env("TASKPOD_ADDRESS", "http://127.0.0.1:1");
            jail.set_env("TASKPOD_CONFIG", "/nowhere");
            let s = ApiSettings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(
                s.page_tokens.current_key.expose(),
                "from-the-env-0123456789"
            );
            jail.set_env("TASKPOD_STORE__NOT_A_SETTING", "1");
            assert!(
                ApiSettings::load(None).is_err(),
                "keys inside owned sections stay strict"
            );
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("api.toml", "listne = \"127.0.0.1:1\"")?;
            let err = ApiSettings::load(Some(Path::new("api.toml"))).unwrap_err();
            assert!(err.to_string().contains("listne"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn every_top_level_setting_is_reachable_from_the_environment() {
        let value = serde_json::to_value(ApiSettings::default()).unwrap();
        let mut fields: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut keys = TOP_LEVEL_KEYS.to_vec();
        fields.sort_unstable();
        keys.sort_unstable();
        assert_eq!(fields, keys);
    }
}
