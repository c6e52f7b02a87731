//! Hot reload of the mesh config file, watched with inotify: an idle daemon reads nothing,
//! whatever the file's size.
//!
//! inotify through nix, on the daemon's tokio runtime (`AsyncFd`): the daemon runs on Linux
//! only and already depends on nix, so the watch costs no thread and no crate, where `notify`
//! would bring its own event thread and portability layers the daemon has no use for.
//!
//! The file's directory is watched, not only the file: editors replace a file by rename, and
//! Kubernetes swaps a ConfigMap volume's `..data` symlink (the file is a symlink through it),
//! and neither changes the inode a watch on the file holds. An event naming the file or
//! `..data`, a write to the file's current target (which a symlink may put elsewhere), or a
//! lost event (the queue overflowed) makes the file be read once the events have stopped for
//! `SETTLE`: a burst of writes costs one read of the last content. The content is hashed, and
//! only one that differs from the last read is parsed and applied.
//!
//! A changed file that parses and validates is handed over whole (and applied as the changes
//! it makes to the model in force); a bad one is refused with a log line and the config in
//! force stays. A missing or unreadable file keeps the config in force too, the status says
//! why, and the file is read once it appears. A file that is missing or bad when the daemon
//! starts leaves it not ready until it is fixed. A content whose application failed (the
//! kernel maps refused it) is applied again after a growing delay, or at its next change.

use super::MeshFile;
use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use serde::Serialize;
use std::ffi::{OsStr, OsString};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

/// How long the events must have stopped before the file is read: a burst of writes (or an
/// editor's save, or a ConfigMap swap) is read once, when it is done.
const SETTLE: Duration = Duration::from_millis(50);
/// The longest a read waits for events to stop, so a file written without pause is still
/// read.
const SETTLE_AT_MOST: Duration = Duration::from_millis(500);
/// How soon a content whose application failed is applied again; the delay doubles at each
/// failure in a row, up to `RETRY_AT_MOST`.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_AT_MOST: Duration = Duration::from_secs(30);
/// How often a directory that cannot be watched (it does not exist yet) is tried again.
const WATCH_RETRY: Duration = Duration::from_secs(1);
/// The symlink a Kubernetes ConfigMap volume replaces (by rename) to publish a new version.
const CONFIGMAP_DATA: &str = "..data";

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
    /// The hash of the content last read, if it need not be applied again.
    seen: std::sync::Mutex<Option<u64>>,
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

    /// Watches the file forever, calling `apply` with each new valid content; what `apply`
    /// refuses (the kernel maps could not be written) is reported like a bad file, and tried
    /// again later: the content is fine, its application may not fail twice.
    pub(crate) async fn watch<E: std::fmt::Display>(
        self: Arc<Self>,
        mut apply: impl FnMut(MeshFile) -> Result<(), E> + Send,
    ) {
        loop {
            let mut changes = match FileChanges::watch(&self.path) {
                Ok(changes) => changes,
                Err(err) => {
                    self.refuse(false, err.to_string());
                    tokio::time::sleep(WATCH_RETRY).await;
                    continue;
                }
            };
            let mut retry_in = None;
            loop {
                // Watched before it is read, so no change after the read goes unseen; the
                // first read also takes whatever changed while nothing watched.
                changes.follow_target();
                retry_in = match (self.reload(&mut apply), retry_in) {
                    (Reload::Done, _) => None,
                    (Reload::ApplyFailed, None) => Some(RETRY_FIRST),
                    (Reload::ApplyFailed, Some(delay)) => Some((delay * 2).min(RETRY_AT_MOST)),
                };
                let settled = match retry_in {
                    Some(delay) => tokio::time::timeout(delay, changes.settled())
                        .await
                        .unwrap_or(Ok(())),
                    None => changes.settled().await,
                };
                if let Err(err) = settled {
                    tracing::warn!(%err, "watching the mesh config again");
                    break;
                }
            }
        }
    }

    /// Reads the file and applies a new valid content.
    fn reload<E: std::fmt::Display>(
        &self,
        apply: &mut impl FnMut(MeshFile) -> Result<(), E>,
    ) -> Reload {
        let reading = Instant::now();
        let Some((hash, file)) = self.read_if_changed() else {
            return Reload::Done;
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
                Reload::Done
            }
            Err(problem) => {
                self.application_failed(problem.to_string());
                Reload::ApplyFailed
            }
        }
    }

    /// The file's new valid content, with its hash, if it changed since the last read; a bad
    /// or unreadable file is refused (logged, and reported in the status).
    pub(crate) fn read_if_changed(&self) -> Option<(u64, MeshFile)> {
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
        let version = version_text(hash);
        tracing::info!(path = %self.path.display(), %version,
            read_us = took.read.as_micros(), apply_us = took.apply.as_micros(), "mesh config applied: {summary}");
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

/// What a read of the file came to.
enum Reload {
    /// Nothing new, a new content applied, or a bad one refused until it changes.
    Done,
    /// A valid content `apply` refused: to be applied again.
    ApplyFailed,
}

#[derive(Debug, thiserror::Error)]
enum WatchError {
    #[error("cannot watch {dir} for changes of the mesh config: {source}")]
    Watch { dir: PathBuf, source: Errno },
    #[error("cannot wait for changes of the mesh config: {0}")]
    Wait(std::io::Error),
    #[error("the mesh config's directory {0} was removed or moved")]
    DirectoryGone(PathBuf),
}

/// The inotify watches that tell when the file may read differently: its directory, and its
/// current target.
struct FileChanges {
    inotify: AsyncFd<InotifyFd>,
    directory: WatchDescriptor,
    dir: PathBuf,
    path: PathBuf,
    name: OsString,
}

/// nix's `Inotify` for tokio, which wants the raw descriptor.
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl FileChanges {
    fn watch(path: &Path) -> Result<FileChanges, WatchError> {
        let dir = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
            _ => PathBuf::from("."),
        };
        let watch_error = |source| WatchError::Watch {
            dir: dir.clone(),
            source,
        };
        let inotify =
            Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(watch_error)?;
        let directory = inotify
            .add_watch(
                &dir,
                AddWatchFlags::IN_CREATE
                    | AddWatchFlags::IN_DELETE
                    | AddWatchFlags::IN_MOVED_FROM
                    | AddWatchFlags::IN_MOVED_TO
                    | AddWatchFlags::IN_MODIFY
                    | AddWatchFlags::IN_CLOSE_WRITE
                    | AddWatchFlags::IN_ATTRIB
                    | AddWatchFlags::IN_DELETE_SELF
                    | AddWatchFlags::IN_MOVE_SELF
                    | AddWatchFlags::IN_ONLYDIR,
            )
            .map_err(watch_error)?;
        // SAFETY: `InotifyFd` owns its descriptor and gives the same one for its whole life.
        let inotify =
            unsafe { AsyncFd::register_with_interest(InotifyFd(inotify), Interest::READABLE) }
                .map_err(|err| WatchError::Wait(err.into()))?;
        Ok(FileChanges {
            inotify,
            directory,
            name: path.file_name().unwrap_or(path.as_os_str()).to_owned(),
            path: path.to_owned(),
            dir,
        })
    }

    /// Watches the file the path leads to now (through any symlinks) for writes in place:
    /// where a symlink leads out of the directory, its events would not name the file.
    fn follow_target(&self) {
        let watched = self.inotify.get_ref().0.add_watch(
            &self.path,
            AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_ATTRIB,
        );
        match watched {
            // Missing: the directory's watch sees it appear.
            Ok(_) | Err(Errno::ENOENT) => {}
            Err(err) => {
                tracing::warn!(path = %self.path.display(), %err, "cannot watch the mesh config's target for writes in place; its directory is still watched")
            }
        }
    }

    /// Waits for an event that may change what the file reads, then until the events stop.
    async fn settled(&mut self) -> Result<(), WatchError> {
        while !self.next_events_touch_file().await? {}
        let deadline = tokio::time::Instant::now() + SETTLE_AT_MOST;
        loop {
            let quiet_until = (tokio::time::Instant::now() + SETTLE).min(deadline);
            match tokio::time::timeout_at(quiet_until, self.next_events_touch_file()).await {
                Err(_quiet) => return Ok(()),
                Ok(events) => {
                    events?;
                }
            }
        }
    }

    /// Waits for the next events; whether one of them may change what the file reads.
    async fn next_events_touch_file(&self) -> Result<bool, WatchError> {
        let events = loop {
            let mut ready = self.inotify.readable().await.map_err(WatchError::Wait)?;
            // EAGAIN becomes WouldBlock, which clears the readiness and waits again.
            if let Ok(events) =
                ready.try_io(|fd| fd.get_ref().0.read_events().map_err(std::io::Error::from))
            {
                break events.map_err(WatchError::Wait)?;
            }
        };
        let mut touched = false;
        for event in &events {
            if event.wd == self.directory && event.mask.intersects(DIRECTORY_GONE) {
                return Err(WatchError::DirectoryGone(self.dir.clone()));
            }
            touched |= self.touches_file(event);
        }
        Ok(touched)
    }

    fn touches_file(&self, event: &InotifyEvent) -> bool {
        if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
            // Events were lost: any of them may have been the file's.
            return true;
        }
        if event.wd == self.directory {
            return event
                .name
                .as_deref()
                .is_some_and(|name| name == self.name || name == OsStr::new(CONFIGMAP_DATA));
        }
        // The target's watch; its IN_IGNORED (the old target is gone) follows an event of the
        // directory's.
        event.mask.intersects(
            AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_ATTRIB,
        )
    }
}

/// The directory's own events after which its watch sees nothing more of the path.
const DIRECTORY_GONE: AddWatchFlags = AddWatchFlags::IN_IGNORED
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF)
    .union(AddWatchFlags::IN_UNMOUNT);

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
mod tests;
