//! The output side of the command line every command shares: the format flag (`-o`)
//! and writing to stdout, where a reader that went away (`| head`) is not a failure.
//! How each command shapes its results lives with the command (the CLI's `output`).

use std::io::Write as _;

use crate::error::CliError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns
    #[default]
    Table,
    /// Aligned columns, with priority, creator, node, epoch and last error
    Wide,
    /// One pretty-printed JSON document
    Json,
    /// One compact JSON object per task or event, a line each
    Jsonl,
}

impl Format {
    pub fn is_json(self) -> bool {
        matches!(self, Format::Json | Format::Jsonl)
    }
}

/// Writes text to stdout. A reader that went away (`| head`) ends the command quietly
/// (see `CliError::is_broken_pipe`).
///
/// # Errors
/// [`CliError::Output`] when stdout cannot be written.
pub fn emit(text: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(CliError::Output)
}

/// `text` plus a newline.
///
/// # Errors
/// As [`emit`].
pub fn emit_line(text: &str) -> Result<(), CliError> {
    emit(&format!("{text}\n"))
}
