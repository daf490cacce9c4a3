//! The client commands, one module per noun (`taskpod task ...`, `taskpod pod ...`,
//! `taskpod node ...`),
//! shaped like kubectl's and temporal's: noun, verb, arguments; plus `health`, the
//! probe containers and the Helm test run.
//!
//! Every command gets a [`Context`]: the client, the output format and the global
//! flags, and returns [`CliError`](taskpod_client::error::CliError).

pub mod completions;
pub mod health;
pub mod node;
pub mod pod;
pub mod task;

use crate::output::Format;
use taskpod_client::client::Client;
use taskpod_client::config::GlobalArgs;
use taskpod_client::error::CliError;

/// What every client command runs with.
#[derive(Debug)]
pub struct Context {
    pub client: Client,
    pub format: Format,
    pub global: GlobalArgs,
}

impl Context {
    /// Resolves the settings (flags, env, profile) and prepares the client.
    ///
    /// # Errors
    /// Bad configuration or a malformed address or token.
    pub fn new(global: GlobalArgs) -> Result<Self, CliError> {
        let settings = global.settings()?;
        tracing::debug!(address = %settings.address, profile = ?settings.profile, "settings");
        let client = Client::connect(&settings, global.call_timeout())?;
        Ok(Self {
            client,
            format: global.output,
            global,
        })
    }
}

/// The view a list or watch asks for: FULL with `--full`, else BASIC.
pub fn view(full: bool) -> i32 {
    if full {
        taskpod_proto::v1::TaskView::Full as i32
    } else {
        taskpod_proto::v1::TaskView::Basic as i32
    }
}
