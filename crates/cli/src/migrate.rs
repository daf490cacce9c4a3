//! `taskpod migrate`: brings a database to the schema this binary was built with (the
//! work is `taskpod_local_cluster::migrate`'s, which `taskpod dev` runs too).

use taskpod_local_cluster::migrate::{self, MigrateError};

#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// The database to migrate, as a postgres:// URL.
    #[arg(long, env = "TASKPOD_STORE__URL", hide_env_values = true)]
    pub database_url: String,
}

/// Migrates and prints what changed.
///
/// # Errors
/// When the URL is invalid, Postgres is unreachable, or a migration fails.
pub async fn run(args: &MigrateArgs) -> Result<(), MigrateError> {
    let report = migrate::run(&args.database_url).await?;
    println!("{report}");
    Ok(())
}
