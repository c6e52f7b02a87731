//! Changes of a file, watched with inotify, for the files the daemon follows while it runs
//! (the mesh config, istiod's root certificate): an idle daemon reads nothing. The CNI
//! installer follows the network configs of a directory the same way.
//!
//! inotify through nix, on the daemon's tokio runtime (`AsyncFd`): the daemon runs on Linux
//! only and already depends on nix, so the watch costs no thread and no crate, where `notify`
//! would bring its own event thread and portability layers the daemon has no use for.
//!
//! The file's directory is watched, not only the file: editors replace a file by rename, and
//! Kubernetes swaps a ConfigMap volume's `..data` symlink (the file is a symlink through it),
//! and neither changes the inode a watch on the file holds. An event naming the file or
//! `..data`, a write to the file's current target (which a symlink may put elsewhere), or a
//! lost event (the queue overflowed) counts as a change, once the events have stopped for
//! `SETTLE`: a burst of writes is one change.

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// How long the events must have stopped before a change is reported: a burst of writes (or
/// an editor's save, or a ConfigMap swap) is one change, when it is done.
const SETTLE: Duration = Duration::from_millis(50);
/// The longest a change waits for events to stop, so a file written without pause is still
/// read.
pub(crate) const SETTLE_AT_MOST: Duration = Duration::from_millis(500);
/// How often a directory that cannot be watched (it does not exist yet) is tried again.
const WATCH_RETRY: Duration = Duration::from_secs(1);
/// The symlink a Kubernetes ConfigMap volume replaces (by rename) to publish a new version.
const CONFIGMAP_DATA: &str = "..data";

/// Calls `changed` at once, then after each change of the file at `path`, forever. When
/// `changed` asks for it (`Some(delay)`: what it did must be tried again), it is called again
/// after that delay even if nothing changed. A watch that cannot be set up is reported to
/// `unwatched` and tried again after `WATCH_RETRY`; one that fails is set up again.
pub(crate) async fn on_changes(
    path: &Path,
    unwatched: impl FnMut(&WatchError) + Send,
    changed: impl FnMut() -> Option<Duration> + Send,
) {
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    let followed = Followed::File {
        path: path.to_owned(),
        name: path.file_name().unwrap_or(path.as_os_str()).to_owned(),
    };
    follow(&dir, &followed, unwatched, changed).await;
}

/// `on_changes` for every entry of the directory `dir` whose name `wanted` accepts (created,
/// written, replaced or removed), such as the CNI network configs of a node.
pub(crate) async fn on_directory_changes(
    dir: &Path,
    wanted: fn(&OsStr) -> bool,
    unwatched: impl FnMut(&WatchError) + Send,
    changed: impl FnMut() -> Option<Duration> + Send,
) {
    follow(dir, &Followed::Names(wanted), unwatched, changed).await;
}

/// What a watch reports changes of.
enum Followed {
    /// One file of the directory, and what it leads to through symlinks.
    File { path: PathBuf, name: OsString },
    /// The directory's entries whose names pass the filter.
    Names(fn(&OsStr) -> bool),
}

async fn follow(
    dir: &Path,
    followed: &Followed,
    mut unwatched: impl FnMut(&WatchError) + Send,
    mut changed: impl FnMut() -> Option<Duration> + Send,
) {
    loop {
        let mut changes = match FileChanges::watch(dir, followed) {
            Ok(changes) => changes,
            Err(err) => {
                unwatched(&err);
                tokio::time::sleep(WATCH_RETRY).await;
                continue;
            }
        };
        loop {
            // Watched before it is read, so no change after the read goes unseen; the
            // first call also sees whatever changed while nothing watched.
            changes.follow_target();
            let settled = match changed() {
                Some(delay) => tokio::time::timeout(delay, changes.settled())
                    .await
                    .unwrap_or(Ok(())),
                None => changes.settled().await,
            };
            if let Err(err) = settled {
                tracing::warn!(%err, "watching again");
                break;
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum WatchError {
    #[error("cannot watch {dir} for changes of {path}: {source}")]
    Watch {
        dir: PathBuf,
        path: PathBuf,
        source: Errno,
    },
    #[error("cannot wait for changes of {path}: {source}")]
    Wait {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the directory {dir} of {path} was removed or moved")]
    DirectoryGone { dir: PathBuf, path: PathBuf },
}

/// The inotify watches that tell when what is followed may read differently: its directory,
/// and a followed file's current target.
struct FileChanges<'a> {
    inotify: AsyncFd<InotifyFd>,
    directory: WatchDescriptor,
    dir: PathBuf,
    followed: &'a Followed,
}

/// nix's `Inotify` for tokio, which wants the raw descriptor.
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl Followed {
    /// What errors name: the file, or the directory whose entries are followed.
    fn path<'a>(&'a self, dir: &'a Path) -> &'a Path {
        match self {
            Followed::File { path, .. } => path,
            Followed::Names(_) => dir,
        }
    }
}

impl<'a> FileChanges<'a> {
    fn watch(dir: &Path, followed: &'a Followed) -> Result<FileChanges<'a>, WatchError> {
        let path = followed.path(dir);
        let watch_error = |source| WatchError::Watch {
            dir: dir.to_owned(),
            path: path.to_owned(),
            source,
        };
        let inotify =
            Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(watch_error)?;
        let directory = inotify
            .add_watch(
                dir,
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
                .map_err(|err| WatchError::Wait {
                    path: path.to_owned(),
                    source: err.into(),
                })?;
        Ok(FileChanges {
            inotify,
            directory,
            dir: dir.to_owned(),
            followed,
        })
    }

    fn path(&self) -> &Path {
        self.followed.path(&self.dir)
    }

    /// Watches the file the path leads to now (through any symlinks) for writes in place:
    /// where a symlink leads out of the directory, its events would not name the file.
    fn follow_target(&self) {
        let Followed::File { path, .. } = self.followed else {
            return;
        };
        let watched = self.inotify.get_ref().0.add_watch(
            path,
            AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_ATTRIB,
        );
        match watched {
            // Missing: the directory's watch sees it appear.
            Ok(_) | Err(Errno::ENOENT) => {}
            Err(err) => {
                tracing::warn!(path = %path.display(), %err, "cannot watch the file's target for writes in place; its directory is still watched")
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
            let mut ready = self
                .inotify
                .readable()
                .await
                .map_err(|e| self.wait_error(e))?;
            // EAGAIN becomes WouldBlock, which clears the readiness and waits again.
            if let Ok(events) =
                ready.try_io(|fd| fd.get_ref().0.read_events().map_err(std::io::Error::from))
            {
                break events.map_err(|e| self.wait_error(e))?;
            }
        };
        let mut touched = false;
        for event in &events {
            if event.wd == self.directory && event.mask.intersects(DIRECTORY_GONE) {
                return Err(WatchError::DirectoryGone {
                    dir: self.dir.clone(),
                    path: self.path().to_owned(),
                });
            }
            touched |= self.touches_file(event);
        }
        Ok(touched)
    }

    fn wait_error(&self, source: std::io::Error) -> WatchError {
        WatchError::Wait {
            path: self.path().to_owned(),
            source,
        }
    }

    fn touches_file(&self, event: &InotifyEvent) -> bool {
        if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
            // Events were lost: any of them may have been the file's.
            return true;
        }
        if event.wd == self.directory {
            let Some(name) = event.name.as_deref() else {
                return false;
            };
            return match self.followed {
                Followed::File { name: file, .. } => {
                    name == file || name == OsStr::new(CONFIGMAP_DATA)
                }
                Followed::Names(wanted) => wanted(name),
            };
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

#[cfg(test)]
mod tests;
