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

/// The newest feature we rely on: `bpf_sk_lookup.ingress_ifindex` (5.17). It also covers
/// bpf_link on cgroups (5.7), sk_lookup (5.9) and `SO_NETNS_COOKIE` (5.14).
const MIN_KERNEL: KernelVersion = KernelVersion::new(5, 17, 0);

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

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Linux {}, cgroup v2 at {}, pod cgroups under {}",
            self.kernel,
            self.cgroup2,
            self.pod_cgroups.display()
        )
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
            "Linux {MIN_KERNEL} or newer (sk_lookup with ingress_ifindex, bpf_link on cgroups, SO_NETNS_COOKIE); this kernel is {v}"
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
            let found = KUBEPODS
                .iter()
                .map(|name| cgroup2.mount.join(name))
                .find(|dir| dir.is_dir());
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
