//! Store settings: part of each binary's typed settings tree.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A value that must not appear in logs or `Debug` output (a URL with a password).
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// How to reach Postgres and how long to wait for it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    /// `postgres://user:password@host:port/db`; `TASKPOD_STORE__URL` in the environment.
    pub url: Secret,
    pub max_connections: u32,
    /// How long a call waits for a connection (and so for Postgres to answer a connect)
    /// before it fails with StoreUnavailable.
    pub acquire_timeout_ms: u64,
    /// Postgres cancels any statement running longer (SQLSTATE 57014, StoreUnavailable).
    pub statement_timeout_ms: u64,
    /// How long a statement waits for a row lock before giving up.
    pub lock_timeout_ms: u64,
    pub application_name: String,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            url: Secret::new("postgres://postgres@127.0.0.1:5432/taskpod"),
            max_connections: 16,
            acquire_timeout_ms: 3_000,
            statement_timeout_ms: 5_000,
            lock_timeout_ms: 3_000,
            application_name: "taskpod".into(),
        }
    }
}

impl StoreSettings {
    pub fn with_url(url: impl Into<String>) -> Self {
        Self {
            url: Secret::new(url),
            ..Self::default()
        }
    }

    pub fn acquire_timeout(&self) -> Duration {
        Duration::from_millis(self.acquire_timeout_ms)
    }

    /// The client-side bound on one call: a connection, then a statement, each within
    /// its own setting, and a second of slack. Past it the call fails as unavailable
    /// even when the network is silent (where `statement_timeout` cannot fire).
    pub fn call_limit(&self) -> Duration {
        Duration::from_millis(self.acquire_timeout_ms + self.statement_timeout_ms + 1_000)
    }
}
