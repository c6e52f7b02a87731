//! Hot reload of the mesh config file, watched with inotify: an idle daemon reads nothing,
//! whatever the file's size.
//!
//! The watch is `host::file_watch`'s (the file's directory, ConfigMap swaps, writes in place):
//! a burst of writes costs one read of the last content. The content is hashed, and only one
//! that differs from the last read is parsed and applied.
//!
//! A changed file that parses and validates is handed over as the changes it makes to the
//! model in force (`FileIndex`: only its entries whose text changed are parsed); a bad one is refused with a log line and the config in
//! force stays. A missing or unreadable file keeps the config in force too, the status says
//! why, and the file is read once it appears. A file that is missing or bad when the daemon
//! starts leaves it not ready until it is fixed. A content whose application failed (the
//! kernel maps refused it) is applied again after a growing delay, or at its next change.

use super::{FileChanges, FileIndex, IndexUpdate, MeshConfig};
use crate::host::file_watch::{self, WatchError};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How soon a content whose application failed is applied again; the delay doubles at each
/// failure in a row, up to `RETRY_AT_MOST`.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_AT_MOST: Duration = Duration::from_secs(30);

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
    /// How many times the file was read: once per change (a burst counts once), not while
    /// nothing changes.
    #[serde(default)]
    pub reads: u64,
}

/// What a version of the file took: reading it, parsing and validating what changed; then
/// making its changes to the model and the kernel's maps.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Took {
    pub(crate) read: Duration,
    pub(crate) apply: Duration,
}

/// Tracks the file's content and the status the API reports.
pub(crate) struct ConfigFile {
    path: PathBuf,
    /// The hash of the content last read, if it need not be applied again.
    seen: std::sync::Mutex<Option<u64>>,
    /// What the version in force put in the model, for the next version's comparison.
    index: std::sync::Mutex<FileIndex>,
    reads: AtomicU64,
    status: watch::Sender<ConfigStatus>,
}

impl ConfigFile {
    /// A file not read yet: `read_if_changed` reads it.
    pub(crate) fn new(path: PathBuf) -> ConfigFile {
        ConfigFile {
            status: watch::Sender::new(ConfigStatus {
                path: Some(path.clone()),
                ..ConfigStatus::default()
            }),
            path,
            seen: std::sync::Mutex::new(None),
            index: Default::default(),
            reads: AtomicU64::new(0),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn status(&self) -> ConfigStatus {
        let mut status = self.status.borrow().clone();
        status.reads = self.reads.load(Ordering::Relaxed);
        status
    }

    /// Returns once a version of the file is in force.
    pub(crate) async fn in_force(&self) {
        // The sender is `self`'s, so the wait can only end with the condition met.
        let _ = self
            .status
            .subscribe()
            .wait_for(|status| status.generation > 0)
            .await;
    }

    /// Watches the file forever, calling `apply` with the changes of each new valid content to
    /// the model in force (`current`); what `apply` refuses (the kernel maps could not be
    /// written) is reported like a bad file, and tried again later: the content is fine, its
    /// application may not fail twice.
    pub(crate) async fn watch<E: std::fmt::Display>(
        self: Arc<Self>,
        current: impl Fn() -> Arc<MeshConfig> + Send + Sync,
        mut apply: impl FnMut(&FileChanges) -> Result<(), E> + Send,
    ) {
        let mut retry_in = None;
        let unwatched = |err: &WatchError| self.refuse(false, err.to_string());
        file_watch::on_changes(&self.path, unwatched, || {
            retry_in = match (self.reload(&current, &mut apply), retry_in) {
                (Reload::Done, _) => None,
                (Reload::ApplyFailed, None) => Some(RETRY_FIRST),
                (Reload::ApplyFailed, Some(delay)) => Some((delay * 2).min(RETRY_AT_MOST)),
            };
            retry_in
        })
        .await;
    }

    /// Reads the file and applies a new valid content.
    fn reload<E: std::fmt::Display>(
        &self,
        current: &impl Fn() -> Arc<MeshConfig>,
        apply: &mut impl FnMut(&FileChanges) -> Result<(), E>,
    ) -> Reload {
        let reading = Instant::now();
        let Some(version) = self.read_if_changed(&current()) else {
            return Reload::Done;
        };
        let applying = Instant::now();
        match apply(&version.changes) {
            Ok(()) => {
                let took = Took {
                    read: applying - reading,
                    apply: applying.elapsed(),
                };
                self.applied(version, took);
                Reload::Done
            }
            Err(problem) => {
                self.application_failed(problem.to_string());
                Reload::ApplyFailed
            }
        }
    }

    /// The file's new valid content, as the changes it makes to `current`, if it changed since
    /// the last read; a bad or unreadable file is refused (logged, and reported in the status).
    pub(crate) fn read_if_changed(&self, current: &MeshConfig) -> Option<NewVersion> {
        self.reads.fetch_add(1, Ordering::Relaxed);
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
        let index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        match index.read(&self.path, &text, current) {
            Ok((changes, index)) => Some(NewVersion {
                hash,
                changes,
                index,
            }),
            Err(err) => {
                drop(index);
                self.refuse(true, err.to_string());
                None
            }
        }
    }

    /// Records that `version` is in force, and what it took.
    pub(crate) fn applied(&self, version: NewVersion, took: Took) {
        let NewVersion {
            hash,
            changes,
            index,
        } = version;
        self.index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .commit(index);
        let version = version_text(hash);
        tracing::info!(path = %self.path.display(), %version,
            read_us = took.read.as_micros(), apply_us = took.apply.as_micros(),
            entries_parsed = changes.entries_parsed(), "mesh config applied: {}", changes.summary());
        self.status.send_modify(|status| {
            status.version = version;
            status.generation += 1;
            status.rejected = None;
        });
    }

    /// Reports that a valid content could not be applied: it is applied again when watched.
    pub(crate) fn application_failed(&self, problem: String) {
        self.refuse(false, problem);
    }

    /// Reports `problem`; `refused_for_good`: the content itself is bad, and is not applied
    /// until it changes.
    fn refuse(&self, refused_for_good: bool, problem: String) {
        self.status.send_if_modified(|status| {
            if status.rejected.as_deref() == Some(problem.as_str()) {
                return false;
            }
            tracing::error!(%problem, version_in_force = %status.version, "mesh config refused; the config in force stays");
            status.rejected = Some(problem);
            true
        });
        if !refused_for_good {
            // Apply the file's next content, whatever it is.
            *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }
}

/// A new valid content of the file: its hash, the changes it makes, and the index once they
/// are made.
pub(crate) struct NewVersion {
    hash: u64,
    pub(crate) changes: FileChanges,
    index: IndexUpdate,
}

/// What a read of the file came to.
enum Reload {
    /// Nothing new, a new content applied, or a bad one refused until it changes.
    Done,
    /// A valid content `apply` refused: to be applied again.
    ApplyFailed,
}

/// The `version` the status reports once a file with `text` is in force.
pub fn version_of(text: &str) -> String {
    version_text(content_hash(text))
}

fn version_text(hash: u64) -> String {
    format!("{hash:016x}")
}

/// xxh3: the whole file of 50,000 workloads (15 MB) in about a millisecond.
fn content_hash(text: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(text.as_bytes())
}

#[cfg(test)]
mod tests;
