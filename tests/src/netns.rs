//! Named network namespaces (`ip netns`), the stand-ins for nodes and pods.

use crate::command::{ip, ip_in};
use crate::error::{LabError, Result};
use crate::topology::{NETNS_DIR, NETNS_PREFIX};
use nix::sched::{CloneFlags, setns};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Creates the namespace with its loopback up, as a container runtime does.
pub fn create(name: &str) -> Result<()> {
    ip(&["netns", "add", name])?;
    ip_in(name, &["link", "set", "lo", "up"])
}

pub fn delete(name: &str) -> Result<()> {
    ip(&["netns", "del", name])
}

/// Names of every `ztlab-*` namespace mounted under /run/netns.
pub fn lab_namespaces() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with(NETNS_PREFIX))
        .collect();
    names.sort();
    names
}

pub fn path_of(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Identity of a namespace: its nsfs device and inode (what `/proc/<pid>/ns/net` resolves to).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetnsId {
    dev: u64,
    ino: u64,
}

impl NetnsId {
    pub fn of(path: &Path) -> Option<NetnsId> {
        let metadata = std::fs::metadata(path).ok()?;
        Some(NetnsId {
            dev: metadata.dev(),
            ino: metadata.ino(),
        })
    }
}

/// Sets a sysctl inside a namespace: new namespaces start from defaults, not the host's values.
/// A short-lived thread enters the namespace, so the caller's own namespace is untouched.
pub fn set_sysctl(netns: &Path, key: &str, value: &str) -> Result<()> {
    let netns = netns.to_owned();
    let proc_path = Path::new("/proc/sys").join(key.replace('.', "/"));
    let setting = value.to_owned();
    std::thread::spawn(move || -> Result<()> {
        let handle = File::open(&netns).map_err(|e| LabError::io("opening", &netns, e))?;
        setns(&handle, CloneFlags::CLONE_NEWNET)
            .map_err(|e| LabError::io("entering", &netns, e.into()))?;
        std::fs::write(&proc_path, setting).map_err(|e| LabError::io("writing", &proc_path, e))
    })
    .join()
    .unwrap_or_else(|_| {
        Err(LabError::Command {
            command: format!("sysctl {key}={value}"),
            detail: "the namespace thread panicked".to_owned(),
        })
    })
}
