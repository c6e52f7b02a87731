//! Where this machine mounts cgroup v2: at `/sys/fs/cgroup` itself (the unified layout of every
//! current distribution and almost every Kubernetes node), at `/sys/fs/cgroup/unified`
//! (systemd's hybrid layout, cgroup v1 controllers beside it), or anywhere else. The daemon
//! looks for the kubelet's pod cgroups there, and the lab makes its pods' cgroups there.

use core::fmt;
use procfs::FromRead;
use procfs::process::MountInfos;
use std::borrow::ToOwned;
use std::path::{Path, PathBuf};
use std::string::{String, ToString};
use std::vec::Vec;

/// Where the unified and the hybrid layouts mount cgroup v2.
pub const UNIFIED_MOUNT: &str = "/sys/fs/cgroup";
pub const HYBRID_MOUNT: &str = "/sys/fs/cgroup/unified";

/// This machine's cgroup v2 hierarchy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup2 {
    pub mount: PathBuf,
    pub layout: CgroupLayout,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupLayout {
    /// cgroup v2 alone, at `/sys/fs/cgroup`.
    Unified,
    /// systemd's hybrid layout: cgroup v1 controllers at `/sys/fs/cgroup`, v2 at
    /// `/sys/fs/cgroup/unified`.
    Hybrid,
    /// cgroup v2 mounted elsewhere.
    Custom,
}

impl fmt::Display for Cgroup2 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let layout = match self.layout {
            CgroupLayout::Unified => "unified layout",
            CgroupLayout::Hybrid => "systemd's hybrid layout",
            CgroupLayout::Custom => "a custom mount",
        };
        write!(f, "{} ({layout})", self.mount.display())
    }
}

/// The mount table this process sees.
const MOUNTINFO: &str = "/proc/self/mountinfo";

/// Why no cgroup v2 hierarchy was found.
#[derive(Debug)]
pub enum Cgroup2Error {
    /// The mount table could not be read.
    MountTable(String),
    /// It lists none.
    NotMounted,
}

impl fmt::Display for Cgroup2Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cgroup2Error::MountTable(reason) => write!(f, "reading {MOUNTINFO}: {reason}"),
            Cgroup2Error::NotMounted => write!(
                f,
                "no cgroup v2 hierarchy is mounted (none in {MOUNTINFO}; cgroup v1 alone cannot \
                 carry the capture programs): boot with systemd.unified_cgroup_hierarchy=1, or \
                 mount one with `mount -t cgroup2 none {HYBRID_MOUNT}`"
            ),
        }
    }
}

impl std::error::Error for Cgroup2Error {}

/// Finds the cgroup v2 hierarchy in this process's mount table.
pub fn find() -> Result<Cgroup2, Cgroup2Error> {
    let table = MountInfos::from_file(MOUNTINFO)
        .map_err(|err| Cgroup2Error::MountTable(err.to_string()))?;
    cgroup2_in(&table).ok_or(Cgroup2Error::NotMounted)
}

/// The cgroup v2 mount of `table`: the unified layout's, else the hybrid layout's, else the
/// first (a machine may mount the hierarchy more than once).
fn cgroup2_in(table: &MountInfos) -> Option<Cgroup2> {
    let mounts: Vec<&Path> = table
        .0
        .iter()
        .filter(|mount| mount.fs_type == "cgroup2")
        .map(|mount| mount.mount_point.as_path())
        .collect();
    let layout_of = |mount: &Path| {
        if mount == Path::new(UNIFIED_MOUNT) {
            CgroupLayout::Unified
        } else if mount == Path::new(HYBRID_MOUNT) {
            CgroupLayout::Hybrid
        } else {
            CgroupLayout::Custom
        }
    };
    let mount = [UNIFIED_MOUNT, HYBRID_MOUNT]
        .iter()
        .map(Path::new)
        .find(|preferred| mounts.contains(preferred))
        .or_else(|| mounts.first().copied())?;
    Some(Cgroup2 {
        mount: mount.to_owned(),
        layout: layout_of(mount),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::format;

    /// A mount table line for `mount_point` of `fs_type`.
    fn line(id: u32, mount_point: &str, fs_type: &str) -> String {
        format!(
            "{id} 1 0:{id} / {mount_point} rw,nosuid,nodev,noexec,relatime shared:{id} - {fs_type} {fs_type} rw\n"
        )
    }

    fn table(mounts: &[(&str, &str)]) -> MountInfos {
        let text: String = mounts
            .iter()
            .enumerate()
            .map(|(i, (point, kind))| line(i as u32 + 20, point, kind))
            .collect();
        MountInfos::from_read(text.as_bytes()).unwrap()
    }

    #[test]
    fn finds_cgroup2_in_every_layout() {
        let unified = table(&[("/sys", "sysfs"), ("/sys/fs/cgroup", "cgroup2")]);
        assert_eq!(
            cgroup2_in(&unified),
            Some(Cgroup2 {
                mount: "/sys/fs/cgroup".into(),
                layout: CgroupLayout::Unified
            })
        );
        let hybrid = table(&[
            ("/sys/fs/cgroup", "tmpfs"),
            ("/sys/fs/cgroup/unified", "cgroup2"),
            ("/sys/fs/cgroup/cpu,cpuacct", "cgroup"),
        ]);
        let found = cgroup2_in(&hybrid).unwrap();
        assert_eq!(found.layout, CgroupLayout::Hybrid);
        assert_eq!(
            found.to_string(),
            "/sys/fs/cgroup/unified (systemd's hybrid layout)"
        );
        let custom = table(&[("/mnt/cg", "cgroup2"), ("/run/other", "cgroup2")]);
        assert_eq!(cgroup2_in(&custom).unwrap().mount, Path::new("/mnt/cg"));
        assert_eq!(cgroup2_in(&custom).unwrap().layout, CgroupLayout::Custom);
        // A second mount (a container's, a bind mount) does not hide the unified one.
        let both = table(&[("/run/x", "cgroup2"), ("/sys/fs/cgroup", "cgroup2")]);
        assert_eq!(cgroup2_in(&both).unwrap().layout, CgroupLayout::Unified);
        let v1_only = table(&[
            ("/sys/fs/cgroup", "tmpfs"),
            ("/sys/fs/cgroup/pids", "cgroup"),
        ]);
        assert_eq!(cgroup2_in(&v1_only), None);
    }
}
