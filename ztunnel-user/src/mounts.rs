//! Which filesystem a path lives on (`statfs` magic numbers from linux/magic.h).

use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filesystem {
    Cgroup2,
    Bpffs,
}

impl Filesystem {
    fn magic(self) -> i64 {
        match self {
            Filesystem::Cgroup2 => 0x6367_7270,
            Filesystem::Bpffs => 0xcafe_4a11,
        }
    }
}

/// Whether `path` is on a `filesystem` mount.
pub fn is_on(path: &Path, filesystem: Filesystem) -> std::io::Result<bool> {
    let stat = nix::sys::statfs::statfs(path)?;
    Ok(stat.filesystem_type().0 as i64 == filesystem.magic())
}
