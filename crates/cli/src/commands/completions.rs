//! `taskpod completions <shell>`: a completion script for bash, zsh, fish, elvish or
//! PowerShell, generated from the same definition as the parser.
//!
//! ```sh
//! taskpod completions bash > /etc/bash_completion.d/taskpod
//! taskpod completions zsh > "${fpath[1]}/_taskpod"
//! ```

use clap_complete::Shell;

use taskpod_client::error::CliError;

#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell to generate for
    #[arg(value_enum)]
    pub shell: Shell,
}

/// Writes the script for `shell` to stdout.
///
/// # Errors
/// When stdout cannot be written.
pub fn run(args: &CompletionsArgs, mut command: clap::Command) -> Result<(), CliError> {
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "taskpod", &mut script);
    crate::output::emit(&String::from_utf8_lossy(&script))
}
