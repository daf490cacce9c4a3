//! The environment layer every binary's settings share.
//!
//! `TASKPOD_*` variables configure several programs at once (the CLI reads
//! `TASKPOD_ADDRESS`, the servers `TASKPOD_STORE__URL`, ...), so each binary takes only
//! the variables whose first segment names one of its own top-level settings; the rest
//! belong to someone else and are ignored rather than refused. Keys inside a section it
//! owns are still checked strictly (`deny_unknown_fields`), as is every key of a file.

use figment::providers::Env;

/// `TASKPOD_*` variables for the settings whose top-level keys are `known`, with `__`
/// nesting (`TASKPOD_STORE__URL` -> `store.url`).
pub fn env_layer(known: &'static [&'static str]) -> Env {
    Env::prefixed("TASKPOD_")
        .filter(move |key| {
            let first = key.as_str().split("__").next().unwrap_or_default();
            known.iter().any(|k| k.eq_ignore_ascii_case(first))
        })
        .split("__")
}

/// Why a binary's settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("invalid configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("invalid setting {setting}: {reason}")]
    Invalid {
        setting: &'static str,
        reason: String,
    },
}

/// Layers `T::default()`, then the TOML `file` if given, then [`env_layer`]`(known)`.
///
/// # Errors
/// A file or variable that does not parse, or an unknown key.
pub fn load<T>(
    file: Option<&std::path::Path>,
    known: &'static [&'static str],
) -> Result<T, SettingsError>
where
    T: serde::Serialize + serde::de::DeserializeOwned + Default,
{
    use figment::Figment;
    use figment::providers::{Format, Serialized, Toml};
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(file) = file {
        figment = figment.merge(Toml::file_exact(file));
    }
    Ok(figment
        .merge(env_layer(known))
        .extract()
        .map_err(Box::new)?)
}

/// A refusal naming the setting at fault.
///
/// # Errors
/// Always: that is its purpose.
pub fn invalid<T>(setting: &'static str, reason: impl Into<String>) -> Result<T, SettingsError> {
    Err(SettingsError::Invalid {
        setting,
        reason: reason.into(),
    })
}
