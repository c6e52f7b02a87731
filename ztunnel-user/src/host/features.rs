//! Start-up check of what the datapath needs from the node (root, the kernel's version and BPF
//! program types, cgroup v2 and the kubelet's pod cgroups), every missing piece reported at
//! once, each naming what was found.

use super::mounts;
use aya::programs::ProgramType;
use aya::sys::is_program_supported;
use aya::util::KernelVersion;
use std::fmt;
use std::path::{Path, PathBuf};
use ztunnel_common::cgroup2::{self, Cgroup2};

/// The newest feature we need: `SO_NETNS_COOKIE` (5.14), the key pods have in the programs'
/// maps. It also covers bpf_link on cgroups (5.7) and sk_lookup (5.9).
const MIN_KERNEL: KernelVersion = KernelVersion::new(5, 14, 0);
/// From here `bpf_sk_lookup` has `ingress_ifindex`, which tells the pod's own traffic over
/// loopback apart; before, `sk_lookup` knows it by its addresses alone.
const INGRESS_IFINDEX_KERNEL: KernelVersion = KernelVersion::new(5, 17, 0);

/// What the kubelet calls the cgroup it puts pods under: the systemd driver's and the
/// cgroupfs driver's name.
const KUBEPODS: [&str; 2] = ["kubepods.slice", "kubepods"];

#[derive(Debug, thiserror::Error)]
#[error("this node cannot run ztunnel; missing:\n  - {}", .0.join("\n  - "))]
pub(crate) struct MissingFeatures(Vec<String>);

/// What the check found: the node the daemon runs on.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) kernel: KernelVersion,
    pub(crate) cgroup2: Cgroup2,
    /// Where the kubelet creates pod cgroups: `--cgroup-root`, else found below the cgroup v2
    /// mount.
    pub(crate) pod_cgroups: PathBuf,
}

impl Node {
    /// Whether `bpf_sk_lookup` has `ingress_ifindex` (Linux 5.17).
    pub(crate) fn has_ingress_ifindex(&self) -> bool {
        self.kernel >= INGRESS_IFINDEX_KERNEL
    }
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Linux {}, cgroup v2 at {}, pod cgroups under {}",
            self.kernel,
            self.cgroup2,
            self.pod_cgroups.display()
        )?;
        if !self.has_ingress_ifindex() {
            write!(
                f,
                "; before Linux {INGRESS_IFINDEX_KERNEL} sk_lookup has no ingress_ifindex, so a \
                 pod's connections to itself are known by their addresses alone (loopback or \
                 the same address)"
            )?;
        }
        Ok(())
    }
}

/// Checks the node; `cgroup_root` is `--cgroup-root`, if given.
pub(crate) fn check(cgroup_root: Option<&Path>) -> Result<Node, MissingFeatures> {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root privileges (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN): run as root or a privileged DaemonSet".to_owned());
    }
    let kernel = KernelVersion::current();
    match kernel {
        Ok(v) if v >= MIN_KERNEL => {}
        Ok(v) => missing.push(format!(
            "Linux {MIN_KERNEL} or newer (SO_NETNS_COOKIE, sk_lookup, bpf_link on cgroups); this kernel is {v}"
        )),
        Err(ref err) => missing.push(format!("a readable kernel version ({err})")),
    }
    for (kind, what) in [
        (
            ProgramType::CgroupSockAddr,
            "BPF cgroup/connect programs (CONFIG_CGROUP_BPF)",
        ),
        (ProgramType::SockOps, "BPF sock_ops programs"),
        (
            ProgramType::SkLookup,
            "BPF sk_lookup programs (CONFIG_BPF_SYSCALL, Linux 5.9+)",
        ),
    ] {
        match is_program_supported(kind) {
            Ok(true) => {}
            Ok(false) => missing.push(what.to_owned()),
            Err(err) => missing.push(format!("{what}: probing failed: {err}")),
        }
    }
    let cgroup2 = cgroup2::find();
    let pod_cgroups = match (&cgroup2, cgroup_root) {
        (Err(err), _) => {
            missing.push(format!("cgroup v2: {err}"));
            None
        }
        (Ok(_), Some(root)) => match mounts::check_cgroup2(root) {
            Ok(()) => Some(root.to_owned()),
            Err(err) => {
                missing.push(format!("cgroup v2: {err}"));
                None
            }
        },
        (Ok(cgroup2), None) => {
            let found = kubepods_below(&cgroup2.mount);
            if found.is_none() {
                missing.push(format!(
                    "the kubelet's pod cgroups: none below the cgroup v2 mount {cgroup2} (looked for {}); \
                     point --cgroup-root at the directory the kubelet creates pod cgroups in",
                    KUBEPODS.join(" and ")
                ));
            }
            found
        }
    };
    match (kernel, cgroup2, pod_cgroups) {
        (Ok(kernel), Ok(cgroup2), Some(pod_cgroups)) if missing.is_empty() => Ok(Node {
            kernel,
            cgroup2,
            pod_cgroups,
        }),
        _ => Err(MissingFeatures(missing)),
    }
}

/// The kubelet's pod cgroup directly below `mount`, under either driver's name.
fn kubepods_below(mount: &Path) -> Option<PathBuf> {
    KUBEPODS
        .iter()
        .map(|name| mount.join(name))
        .find(|dir| dir.is_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_pod_cgroups_of_either_cgroup_driver() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(kubepods_below(root.path()), None);
        std::fs::create_dir(root.path().join("kubepods")).unwrap();
        assert_eq!(
            kubepods_below(root.path()),
            Some(root.path().join("kubepods"))
        );
        std::fs::create_dir(root.path().join("kubepods.slice")).unwrap();
        assert_eq!(
            kubepods_below(root.path()),
            Some(root.path().join("kubepods.slice")),
            "the systemd driver's first"
        );
    }
}
