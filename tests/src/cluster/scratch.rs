//! The cluster's scratch folder: Postgres's data, Redis's, every process's log and the
//! `exec` programs live under one directory, so one `remove_dir_all` cleans a test up
//! and one path names everything it left running.

use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Context as _;

/// Set to `1` to keep the folder (logs, data) after the test for inspection.
pub const KEEP_ENV: &str = "TASKPOD_CHAOS_KEEP";

#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    /// A new folder under the system temp dir, searchable by every user (Postgres runs
    /// as `postgres` when the tests run as root).
    ///
    /// # Errors
    /// When it cannot be created.
    pub fn new(label: &str) -> anyhow::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "taskpod-{label}-{}-{n}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
                .simple()
                .to_string()
                .get(..6)
                .unwrap_or("x")
        ));
        Self::mkdir(&path)?;
        Ok(Self { path })
    }

    /// Creates `path` (mode 0755) and returns it.
    ///
    /// # Errors
    /// When it cannot be created.
    pub fn mkdir(path: &Path) -> anyhow::Result<PathBuf> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(path)
            .with_context(|| format!("create {}", path.display()))?;
        Ok(path.to_path_buf())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os(KEEP_ENV).is_some_and(|v| v != "0") {
            eprintln!("{KEEP_ENV}: keeping {}", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
