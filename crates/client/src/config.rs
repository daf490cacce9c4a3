//! The flags every client command shares, and where their values come from.
//!
//! Precedence, highest first: command-line flags, `TASKPOD_ADDRESS` / `TASKPOD_TOKEN`
//! / `TASKPOD_ACTOR`, the selected profile of the config file, built-in defaults. The
//! profile is the one `--profile` (or `TASKPOD_PROFILE`) names, else the file's
//! `default_profile`, else none. The layers are merged with figment:
//!
//! ```toml
//! default_profile = "local"
//!
//! [profiles.local]
//! address = "http://127.0.0.1:50051"
//! actor = "alice"
//!
//! [profiles.prod]
//! address = "https://taskpod.example.com"
//! token = "..."
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format as _, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::error::CliError;
use crate::output::Format;

/// Where the CLI looks for a server when nothing says otherwise.
pub const DEFAULT_ADDRESS: &str = "http://127.0.0.1:50051";
/// The deadline of one call when `--timeout` is not given.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Flags shared by every client command; accepted before or after the subcommand.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GlobalArgs {
    /// The API server, e.g. http://127.0.0.1:50051 [env: TASKPOD_ADDRESS]
    #[arg(long, global = true, value_name = "URL")]
    pub address: Option<String>,
    /// Bearer token sent with every call [env: TASKPOD_TOKEN]
    #[arg(long, global = true, value_name = "TOKEN")]
    pub token: Option<String>,
    /// Actor recorded on the changes you make (RequestMeta.actor_id); required when
    /// the server runs without authentication [env: TASKPOD_ACTOR]
    #[arg(long, global = true, value_name = "NAME")]
    pub actor: Option<String>,
    /// Profile of the config file to use [env: TASKPOD_PROFILE]
    #[arg(long, global = true, value_name = "NAME")]
    pub profile: Option<String>,
    /// Config file with profiles [default: $XDG_CONFIG_HOME/taskpod/config.toml or
    /// ~/.config/taskpod/config.toml]
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Output format
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    /// Deadline of each call (e.g. 10s, 2m) [default: 30s]; for `task wait`, how long
    /// to wait in all [default: no limit]
    #[arg(long, global = true, value_name = "DURATION", value_parser = crate::duration::parse)]
    pub timeout: Option<Duration>,
}

/// Where to connect and as whom, after every layer is merged.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Settings {
    pub address: String,
    pub token: Option<String>,
    pub actor: Option<String>,
    /// The profile that was applied, if any.
    #[serde(skip)]
    pub profile: Option<String>,
}

/// One layer: a profile, the environment or the flags. Unset fields leave the layers
/// below alone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Layer {
    #[serde(skip_serializing_if = "Option::is_none")]
    address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    actor: Option<String>,
}

/// The config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    default_profile: Option<String>,
    #[serde(default)]
    profiles: BTreeMap<String, Layer>,
}

/// `TASKPOD_ADDRESS`, `TASKPOD_TOKEN`, `TASKPOD_ACTOR`, `TASKPOD_PROFILE`, read as
/// plain strings (a token of digits must stay a string); empty means unset.
#[derive(Debug, Default)]
struct EnvLayer {
    address: Option<String>,
    token: Option<String>,
    actor: Option<String>,
    profile: Option<String>,
}

impl EnvLayer {
    fn read() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Self {
            address: var("TASKPOD_ADDRESS"),
            token: var("TASKPOD_TOKEN"),
            actor: var("TASKPOD_ACTOR"),
            profile: var("TASKPOD_PROFILE"),
        }
    }
}

/// The default config file: `$XDG_CONFIG_HOME/taskpod/config.toml`, else
/// `~/.config/taskpod/config.toml`.
pub fn default_config_path() -> Option<PathBuf> {
    let xdg = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    let base = xdg.or_else(|| {
        std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|h| PathBuf::from(h).join(".config"))
    })?;
    Some(base.join("taskpod").join("config.toml"))
}

impl GlobalArgs {
    /// The per-call deadline.
    pub fn call_timeout(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_TIMEOUT)
    }

    /// Merges flags, environment, profile and defaults.
    ///
    /// # Errors
    /// A config file that does not parse, an explicit `--config` that does not exist,
    /// or a profile that the file does not define.
    pub fn settings(&self) -> Result<Settings, CliError> {
        resolve(self, default_config_path().as_deref())
    }
}

fn config_error(path: &Path, source: figment::Error) -> CliError {
    CliError::Config {
        path: path.display().to_string(),
        source: Box::new(source),
    }
}

/// [`GlobalArgs::settings`] with the default config path given, for tests.
fn resolve(flags: &GlobalArgs, default_path: Option<&Path>) -> Result<Settings, CliError> {
    let env = EnvLayer::read();
    let file = match (&flags.config, default_path) {
        (Some(path), _) => {
            if !path.is_file() {
                return Err(CliError::Usage(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            Some(path.as_path())
        }
        (None, Some(path)) if path.is_file() => Some(path),
        (None, _) => None,
    };
    let config: ConfigFile = match file {
        Some(path) => Figment::from(Toml::file_exact(path))
            .extract()
            .map_err(|e| config_error(path, e))?,
        None => ConfigFile::default(),
    };

    let profile_name = flags
        .profile
        .clone()
        .filter(|p| !p.is_empty())
        .or(env.profile.clone())
        .or(config.default_profile.clone());
    let profile = match &profile_name {
        Some(name) => Some(config.profiles.get(name).cloned().ok_or_else(|| {
            let known: Vec<&str> = config.profiles.keys().map(String::as_str).collect();
            let file = file.map_or_else(
                || "no config file was found".to_owned(),
                |p| format!("{} defines {known:?}", p.display()),
            );
            CliError::Usage(format!("profile {name:?} is not defined ({file})"))
        })?),
        None => None,
    };

    let defaults = Layer {
        address: Some(DEFAULT_ADDRESS.to_owned()),
        ..Layer::default()
    };
    let env_layer = Layer {
        address: env.address,
        token: env.token,
        actor: env.actor,
    };
    let flag_layer = Layer {
        address: flags.address.clone(),
        token: flags.token.clone(),
        actor: flags.actor.clone(),
    };
    let mut settings: Settings = Figment::from(Serialized::defaults(defaults))
        .merge(Serialized::defaults(profile.unwrap_or_default()))
        .merge(Serialized::defaults(env_layer))
        .merge(Serialized::defaults(flag_layer))
        .extract()
        .map_err(|e| config_error(file.unwrap_or(Path::new("the settings")), e))?;
    // An empty value in a file or flag means "none".
    settings.token = settings.token.filter(|t| !t.is_empty());
    settings.actor = settings.actor.filter(|a| !a.is_empty());
    if settings.address.is_empty() {
        settings.address = DEFAULT_ADDRESS.to_owned();
    }
    settings.profile = profile_name;
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::Jail;

    const FILE: &str = r#"
        default_profile = "local"

        [profiles.local]
        address = "http://127.0.0.1:7000"
        actor = "alice"

        [profiles.prod]
        address = "http://prod:443"
        token = "prod-token"
        actor = "bot"
    "#;

    // figment's Jail fixes the closure's error type.
    #[allow(clippy::result_large_err)]
    fn jailed(f: impl FnOnce(&mut Jail) -> Result<(), String>) {
        Jail::expect_with(|jail| {
            jail.clear_env();
            f(jail).map_err(figment::Error::from)
        });
    }

    fn run(flags: &GlobalArgs, path: Option<&Path>) -> Result<Settings, String> {
        resolve(flags, path).map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))
    }

    #[test]
    fn defaults_apply_without_file_env_or_flags() {
        jailed(|_| {
            let s = run(&GlobalArgs::default(), Some(Path::new("missing.toml")))?;
            assert_eq!(s.address, DEFAULT_ADDRESS);
            assert_eq!((s.token, s.actor, s.profile), (None, None, None));
            Ok(())
        });
    }

    #[test]
    fn the_default_profile_applies_when_none_is_named() {
        jailed(|jail| {
            jail.create_file("config.toml", FILE)
                .map_err(|e| e.to_string())?;
            let s = run(&GlobalArgs::default(), Some(Path::new("config.toml")))?;
            assert_eq!(s.address, "http://127.0.0.1:7000");
            assert_eq!(s.actor.as_deref(), Some("alice"));
            assert_eq!(s.profile.as_deref(), Some("local"));
            Ok(())
        });
    }

    #[test]
    fn flags_beat_env_beat_profile_beat_defaults() {
        jailed(|jail| {
            jail.create_file("c.toml", FILE)
                .map_err(|e| e.to_string())?;
            jail.set_env("TASKPOD_PROFILE", "prod");
            jail.set_env("TASKPOD_ACTOR", "env-actor");
            let flags = GlobalArgs {
                config: Some("c.toml".into()),
                token: Some("flag-token".into()),
                ..GlobalArgs::default()
            };
            let s = run(&flags, None)?;
            // address from the profile, actor from the env, token from the flag.
            assert_eq!(s.address, "http://prod:443");
            assert_eq!(s.actor.as_deref(), Some("env-actor"));
            assert_eq!(s.token.as_deref(), Some("flag-token"));
            assert_eq!(s.profile.as_deref(), Some("prod"));

            let flags = GlobalArgs {
                profile: Some("local".into()),
                actor: Some("flag-actor".into()),
                ..flags
            };
            let s = run(&flags, None)?;
            assert_eq!(s.address, "http://127.0.0.1:7000");
            assert_eq!(s.actor.as_deref(), Some("flag-actor"));
            Ok(())
        });
    }

    #[test]
    fn env_address_beats_the_profile_and_numeric_tokens_stay_strings() {
        jailed(|jail| {
            jail.create_file("c.toml", FILE)
                .map_err(|e| e.to_string())?;
            jail.set_env("TASKPOD_ADDRESS", "http://env:1");
            jail.set_env("TASKPOD_TOKEN", "12345");
            jail.set_env("TASKPOD_PROFILE", "");
            let s = run(&GlobalArgs::default(), Some(Path::new("c.toml")))?;
            assert_eq!(s.address, "http://env:1");
            assert_eq!(s.token.as_deref(), Some("12345"));
            assert_eq!(s.actor.as_deref(), Some("alice"));
            Ok(())
        });
    }

    #[test]
    fn an_unknown_profile_or_missing_config_is_a_usage_error() {
        jailed(|jail| {
            jail.create_file("c.toml", FILE)
                .map_err(|e| e.to_string())?;
            let flags = GlobalArgs {
                profile: Some("staging".into()),
                ..GlobalArgs::default()
            };
            let err = resolve(&flags, Some(Path::new("c.toml"))).unwrap_err();
            assert_eq!(err.exit_code(), 2);
            assert!(
                err.to_string().contains("\"staging\" is not defined"),
                "{err}"
            );

            let flags = GlobalArgs {
                config: Some("nope.toml".into()),
                ..GlobalArgs::default()
            };
            assert_eq!(resolve(&flags, None).unwrap_err().exit_code(), 2);
            Ok(())
        });
    }

    #[test]
    fn a_typo_in_a_profile_is_reported() {
        jailed(|jail| {
            jail.create_file("c.toml", "[profiles.x]\nadress = \"a\"\n")
                .map_err(|e| e.to_string())?;
            let flags = GlobalArgs {
                profile: Some("x".into()),
                ..GlobalArgs::default()
            };
            let err = resolve(&flags, Some(Path::new("c.toml"))).unwrap_err();
            assert!(matches!(err, CliError::Config { .. }), "{err}");
            Ok(())
        });
    }
}
