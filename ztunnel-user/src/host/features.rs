//! Start-up check of the kernel features the datapath needs, reported all at once.

use aya::programs::ProgramType;
use aya::sys::is_program_supported;
use aya::util::KernelVersion;
use std::path::Path;

/// The newest feature we rely on: `bpf_sk_lookup.ingress_ifindex` (5.17). It also covers
/// bpf_link on cgroups (5.7), sk_lookup (5.9) and `SO_NETNS_COOKIE` (5.14).
const MIN_KERNEL: KernelVersion = KernelVersion::new(5, 17, 0);

#[derive(Debug, thiserror::Error)]
#[error("this node cannot run ztunnel; missing:\n  - {}", .0.join("\n  - "))]
pub(crate) struct MissingFeatures(Vec<String>);

pub(crate) fn check(cgroup_root: &Path) -> Result<(), MissingFeatures> {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root privileges (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN): run as root or a privileged DaemonSet".to_owned());
    }
    match KernelVersion::current() {
        Ok(v) if v >= MIN_KERNEL => {}
        Ok(v) => missing.push(format!(
            "Linux {MIN_KERNEL} or newer (sk_lookup with ingress_ifindex, bpf_link on cgroups, SO_NETNS_COOKIE); this kernel is {v}"
        )),
        Err(err) => missing.push(format!("a readable kernel version ({err})")),
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
    if let Err(err) = super::mounts::check_cgroup2(cgroup_root) {
        missing.push(format!("cgroup v2: {err}"));
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(MissingFeatures(missing))
    }
}
