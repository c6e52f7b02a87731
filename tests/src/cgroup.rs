//! The lab's cgroup-v2 subtree: node and pod cgroups, laid out as a kubelet would.

use crate::error::{LabError, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub fn create(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|e| LabError::io("creating cgroup", path, e))
}

/// The directory and every cgroup below it, parents before children.
pub fn tree(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        if !dir.is_dir() {
            continue;
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                    pending.push(entry.path());
                }
            }
        }
        found.push(dir);
    }
    found.sort_by_key(|dir| dir.components().count());
    found
}

/// SIGKILLs every process in the subtree (`cgroup.kill`) and waits, bounded, until it is empty.
pub fn kill_all(root: &Path, timeout: Duration) -> Result<()> {
    if !root.is_dir() {
        return Ok(());
    }
    let kill = root.join("cgroup.kill");
    std::fs::write(&kill, "1").map_err(|e| LabError::io("writing", &kill, e))?;
    let deadline = Instant::now() + timeout;
    while is_populated(root) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn is_populated(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .is_ok_and(|events| events.lines().any(|line| line == "populated 1"))
}

/// Removes the subtree deepest first. A cgroup whose last process just died can stay busy for
/// a moment, so each rmdir is retried until `timeout`.
pub fn remove_tree(root: &Path, timeout: Duration) -> Result<Vec<PathBuf>> {
    let deadline = Instant::now() + timeout;
    let mut removed = Vec::new();
    for dir in tree(root).into_iter().rev() {
        loop {
            match std::fs::remove_dir(&dir) {
                Ok(()) => {
                    removed.push(dir);
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() >= deadline => {
                    return Err(LabError::io("removing cgroup", dir, e));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    Ok(removed)
}
