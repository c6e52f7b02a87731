//! Hot reload of the mesh config file. The file is polled rather than watched with inotify:
//! editors replace files by rename and Kubernetes swaps ConfigMap symlinks, and a poll of the
//! content sees every one of those the same way. A changed file that parses and validates is
//! handed over whole (and applied as the changes it makes to the model in force); a bad one is refused with a log line and the config in force stays. A
//! file that is missing or bad when the daemon starts leaves it not ready until it is fixed.

use super::MeshFile;
use serde::Serialize;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the file is read.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// What the daemon reports about its config file.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ConfigStatus {
    pub path: Option<PathBuf>,
    /// A hash of the content in force (hex), so a user can tell which edit is applied.
    pub version: String,
    /// How many times a config was applied, the first load included.
    pub generation: u64,
    /// Why the newest content of the file was refused, while the file still has it.
    pub rejected: Option<String>,
}

/// What a version of the file took: reading, parsing and validating it; then making its changes
/// to the model and the kernel's maps.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Took {
    pub(crate) read: Duration,
    pub(crate) apply: Duration,
}

/// Tracks the file's content and the status the API reports.
pub(crate) struct ConfigFile {
    path: PathBuf,
    seen: Mutex<Option<u64>>,
    status: Mutex<ConfigStatus>,
}

impl ConfigFile {
    /// A file not read yet: `poll` reads it.
    pub(crate) fn new(path: PathBuf) -> ConfigFile {
        ConfigFile {
            status: Mutex::new(ConfigStatus {
                path: Some(path.clone()),
                ..ConfigStatus::default()
            }),
            path,
            seen: Mutex::new(None),
        }
    }

    pub(crate) fn path(&self) -> &std::path::Path {
        &self.path
    }

    pub(crate) fn status(&self) -> ConfigStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Polls forever, calling `apply` with each new valid file; what `apply` refuses
    /// (the kernel maps could not be written) is reported like a bad file, and tried again at
    /// the next poll: the content is fine, its application may not fail twice.
    pub(crate) async fn watch<E: std::fmt::Display>(
        self: Arc<Self>,
        mut apply: impl FnMut(MeshFile) -> Result<(), E> + Send,
    ) {
        let mut ticks = tokio::time::interval(POLL_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let reading = Instant::now();
            let Some((hash, file)) = self.poll() else {
                continue;
            };
            let summary = file.summary();
            let applying = Instant::now();
            match apply(file) {
                Ok(()) => {
                    let took = Took {
                        read: applying - reading,
                        apply: applying.elapsed(),
                    };
                    self.applied(hash, &summary, took);
                }
                Err(problem) => self.refuse(false, problem.to_string()),
            }
        }
    }

    /// The file's new valid content, with its hash, if it changed since the last poll; a bad
    /// or unreadable file is refused (logged, and reported in the status).
    pub(crate) fn poll(&self) -> Option<(u64, MeshFile)> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(err) => {
                // Mid-replacement or deleted: keep the config in force, say so once.
                let problem = format!("cannot read {}: {err}", self.path.display());
                self.refuse(false, problem);
                return None;
            }
        };
        let hash = content_hash(&text);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == Some(hash) {
            return None;
        }
        *seen = Some(hash);
        drop(seen);
        match MeshFile::parse(&self.path, &text) {
            Ok(file) => Some((hash, file)),
            Err(err) => {
                self.refuse(true, err.to_string());
                None
            }
        }
    }

    /// Records that the content with `hash` is in force, and what it took.
    pub(crate) fn applied(&self, hash: u64, summary: &str, took: Took) {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        status.version = version_text(hash);
        status.generation += 1;
        status.rejected = None;
        tracing::info!(path = %self.path.display(), version = %status.version,
            read_us = took.read.as_micros(), apply_us = took.apply.as_micros(), "mesh config applied: {summary}");
    }

    /// Reports `problem`; `refused_for_good`: the content itself is bad, and is not read
    /// again until it changes.
    fn refuse(&self, refused_for_good: bool, problem: String) {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if status.rejected.as_deref() != Some(problem.as_str()) {
            tracing::error!(%problem, version_in_force = %status.version, "mesh config refused; the config in force stays");
        }
        status.rejected = Some(problem);
        if !refused_for_good {
            // Read the file again next time, whatever it then holds.
            *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }
}

/// The `version` the status reports once a file with `text` is in force.
pub fn version_of(text: &str) -> String {
    version_text(content_hash(text))
}

fn version_text(hash: u64) -> String {
    format!("{hash:016x}")
}

fn content_hash(text: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn a_config_whose_application_failed_is_applied_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, "workloads: []\n").unwrap();
        let file = Arc::new(ConfigFile::new(path));
        let attempts = Arc::new(AtomicU32::new(0));
        let counted = attempts.clone();
        let watching = tokio::spawn(file.clone().watch(move |_config| {
            match counted.fetch_add(1, Ordering::Relaxed) {
                0 => Err("ZT_WORKLOADS is full"),
                _ => Ok(()),
            }
        }));
        tokio::time::sleep(POLL_INTERVAL * 3).await;
        watching.abort();
        let status = file.status();
        assert_eq!(attempts.load(Ordering::Relaxed), 2);
        assert_eq!((status.generation, status.rejected), (1, None));
    }

    #[test]
    fn a_bad_file_is_refused_until_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, "workloads: [").unwrap();
        let file = ConfigFile::new(path.clone());
        assert!(file.poll().is_none());
        assert!(file.status().rejected.is_some());
        assert!(file.poll().is_none());
        std::fs::write(&path, "workloads: []\n").unwrap();
        assert!(file.poll().is_some());
    }
}
