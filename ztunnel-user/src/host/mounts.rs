//! Which filesystem a path lives on, by its `statfs` magic number.

use nix::sys::statfs::{BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC, FsType, statfs};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Filesystem {
    Cgroup2,
    Bpffs,
}

impl Filesystem {
    fn magic(self) -> FsType {
        match self {
            Filesystem::Cgroup2 => CGROUP2_SUPER_MAGIC,
            Filesystem::Bpffs => BPF_FS_MAGIC,
        }
    }
}

/// Whether `path` is on a `filesystem` mount.
pub(crate) fn is_on(path: &Path, filesystem: Filesystem) -> std::io::Result<bool> {
    Ok(statfs(path)?.filesystem_type() == filesystem.magic())
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum MountError {
    #[error(
        "{0} is not a cgroup v2 mount (point --cgroup-root at the kubepods cgroup of a cgroup2 hierarchy)"
    )]
    NotCgroup2(PathBuf),
    #[error("statfs {path}: {source}")]
    Statfs {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Ok when `root` is a directory of a cgroup v2 hierarchy.
pub(crate) fn check_cgroup2(root: &Path) -> Result<(), MountError> {
    let on_cgroup2 = is_on(root, Filesystem::Cgroup2).map_err(|source| MountError::Statfs {
        path: root.to_owned(),
        source,
    })?;
    if on_cgroup2 {
        Ok(())
    } else {
        Err(MountError::NotCgroup2(root.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_filesystems_apart() {
        let tmp = std::env::temp_dir();
        assert!(!is_on(&tmp, Filesystem::Bpffs).unwrap());
        assert!(matches!(
            check_cgroup2(&tmp),
            Err(MountError::NotCgroup2(_))
        ));
        assert!(matches!(
            check_cgroup2(Path::new("/nonexistent/ztunnel")),
            Err(MountError::Statfs { .. })
        ));
    }
}
