//! The fixed shape of the lab: three nodes (in three zones of one region; node3 on another
//! network, behind an east-west gateway), seven pods, and where each of their pieces lives. Scripts and tests rely on these names, so they are constants
//! rather than configuration.

use crate::error::{LabError, Result};
use sha2::{Digest, Sha256};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use ztunnel_common::cgroup2::{self, Cgroup2, Cgroup2Error};

/// This machine's cgroup v2 hierarchy, wherever it is mounted (`/sys/fs/cgroup` in the unified
/// layout, `/sys/fs/cgroup/unified` in systemd's hybrid one).
static CGROUP2: LazyLock<std::result::Result<Cgroup2, String>> =
    LazyLock::new(|| cgroup2::find().map_err(|err: Cgroup2Error| err.to_string()));

/// The cgroup v2 hierarchy, or why there is none (the lab's preflight reports it).
pub fn cgroup2() -> Result<&'static Cgroup2> {
    CGROUP2
        .as_ref()
        .map_err(|reason| LabError::NotSetUp(reason.clone()))
}

/// The lab's subtree of the cgroup v2 hierarchy (under `/sys/fs/cgroup` when none is mounted,
/// which only a preflight that failed first can see).
pub fn cgroup_root() -> PathBuf {
    let mount = cgroup2().map_or(Path::new(cgroup2::UNIFIED_MOUNT), |found| &found.mount);
    mount.join(CGROUP_SUBTREE.trim_start_matches('/'))
}

/// Everything the lab writes outside the kernel's own trees lives here.
pub const STATE_DIR: &str = "/run/ztunnel-lab";
/// Prefix of every network namespace the lab creates (`/run/netns/ztlab-*`).
pub const NETNS_PREFIX: &str = "ztlab-";
/// Where `ip netns add` mounts named namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// The lab's subtree of the cgroup-v2 hierarchy, as `/proc/<pid>/cgroup` names it.
pub const CGROUP_SUBTREE: &str = "/ztunnel-lab";
/// bpffs, and the lab's directory in it that holds every daemon's pins.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";
pub const BPFFS_ROOT: &str = "/sys/fs/bpf/ztunnel-lab";
/// Namespaces the ztunnel-cni plugin is told to leave alone.
pub const EXCLUDED_NAMESPACES: [&str; 3] = ["kube-system", "legacy", "foreign"];
/// The interface every pod gets from the CNI chain.
pub const POD_IFNAME: &str = "eth0";
/// Name of the underlay veth at both ends (node1-node2, and node3's end of its link).
pub const UNDERLAY_IFNAME: &str = "ul0";
/// node1's end of the link to node3, the other network, and its address there.
pub const REMOTE_LINK_IFNAME: &str = "ul1";
pub const REMOTE_LINK_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 1, 1);
pub const REMOTE_LINK_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 1, 0, 0, 0, 0, 1);
/// The other network's east-west gateway: the one pod of node3 that node1 can reach.
pub const NETWORK_GATEWAY: &str = "g1";
/// Where Debian's containernetworking-plugins installs ptp, host-local, ...
pub const SYSTEM_CNI_DIR: &str = "/usr/lib/cni";
/// The mesh config every node's daemon runs from.
pub const MESH_CONFIG: &str = "/run/ztunnel-lab/mesh.yaml";
/// The built-in CA's directory, shared by the nodes so they trust one root.
pub const CA_DIR: &str = "/run/ztunnel-lab/ca";
pub const TRUST_DOMAIN: &str = "cluster.local";

#[derive(Debug)]
pub struct NodeSpec {
    pub name: &'static str,
    pub underlay_ip: Ipv4Addr,
    /// The node's IPv6 address on the underlay (a /64 shared by both ends).
    pub underlay_ip6: Ipv6Addr,
    /// The /24 the node's pods get their addresses from.
    pub pod_subnet: Ipv4Addr,
    /// The /64 the node's pods get their IPv6 addresses from (the lab is dual stack).
    pub pod_subnet6: Ipv6Addr,
    /// Where the node is, as Kubernetes' `topology.kubernetes.io/region` and `/zone` labels
    /// say: its pods' workloads carry it, for locality-aware load balancing.
    pub region: &'static str,
    pub zone: &'static str,
    /// Istio's network the node is on (empty: the default one). Its pods are reached from
    /// another network only through its `NETWORK_GATEWAY`.
    pub network: &'static str,
}

#[derive(Debug)]
pub struct PodSpec {
    pub name: &'static str,
    pub node: &'static NodeSpec,
    pub namespace: &'static str,
    pub uid: &'static str,
    pub service_account: &'static str,
    /// Listed as an HBONE workload in the mesh config. True for the captured pods, and for
    /// `w1` and `g1`, whose 15008 is served by the independent HBONE peer (standing in for a
    /// pod behind Istio's own ztunnel, or an east-west gateway) rather than by our daemon.
    pub hbone: bool,
}

pub const NODES: [NodeSpec; 3] = [
    NodeSpec {
        name: "node1",
        underlay_ip: Ipv4Addr::new(10, 99, 0, 1),
        underlay_ip6: Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1),
        pod_subnet: Ipv4Addr::new(10, 244, 1, 0),
        pod_subnet6: Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0),
        region: "lab",
        zone: "zone-a",
        network: "",
    },
    NodeSpec {
        name: "node2",
        underlay_ip: Ipv4Addr::new(10, 99, 0, 2),
        underlay_ip6: Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 2),
        pod_subnet: Ipv4Addr::new(10, 244, 2, 0),
        pod_subnet6: Ipv6Addr::new(0xfd00, 0x10, 0x244, 2, 0, 0, 0, 0),
        region: "lab",
        zone: "zone-b",
        network: "",
    },
    NodeSpec {
        name: "node3",
        underlay_ip: Ipv4Addr::new(10, 99, 1, 3),
        underlay_ip6: Ipv6Addr::new(0xfd00, 0x99, 1, 0, 0, 0, 0, 3),
        pod_subnet: Ipv4Addr::new(10, 244, 3, 0),
        pod_subnet6: Ipv6Addr::new(0xfd00, 0x10, 0x244, 3, 0, 0, 0, 0),
        region: "lab",
        zone: "zone-c",
        network: "net2",
    },
];

/// In the order they are added, which fixes their addresses (a1 .1.2, a2 .1.3, b1 .2.2,
/// u1 .2.3, w1 .2.4, c1 .3.2, g1 .3.3; the same last numbers in the nodes' IPv6 ranges).
pub const PODS: [PodSpec; 7] = [
    PodSpec {
        name: "a1",
        node: &NODES[0],
        namespace: "demo",
        uid: "00000000-0000-4000-8000-0000000000a1",
        hbone: true,
        service_account: "sa-a",
    },
    PodSpec {
        name: "a2",
        node: &NODES[0],
        namespace: "demo",
        uid: "00000000-0000-4000-8000-0000000000a2",
        hbone: true,
        service_account: "sa-a",
    },
    PodSpec {
        name: "b1",
        node: &NODES[1],
        namespace: "demo",
        uid: "00000000-0000-4000-8000-0000000000b1",
        hbone: true,
        service_account: "sa-b",
    },
    PodSpec {
        name: "u1",
        node: &NODES[1],
        namespace: "legacy",
        uid: "00000000-0000-4000-8000-0000000000c1",
        hbone: false,
        service_account: "default",
    },
    PodSpec {
        name: "w1",
        node: &NODES[1],
        namespace: "foreign",
        uid: "00000000-0000-4000-8000-0000000000d1",
        hbone: true,
        service_account: "default",
    },
    PodSpec {
        name: "c1",
        node: &NODES[2],
        namespace: "demo",
        uid: "00000000-0000-4000-8000-0000000000e1",
        hbone: true,
        service_account: "sa-c",
    },
    // Unenrolled like w1, so the independent HBONE peer can serve its 15008 as the gateway.
    PodSpec {
        name: "g1",
        node: &NODES[2],
        namespace: "foreign",
        uid: "00000000-0000-4000-8000-0000000000f1",
        hbone: true,
        service_account: "default",
    },
];

pub fn node_spec(name: &str) -> Result<&'static NodeSpec> {
    NODES
        .iter()
        .find(|node| node.name == name)
        .ok_or_else(|| LabError::UnknownName(name.to_owned()))
}

pub fn pod_spec(name: &str) -> Result<&'static PodSpec> {
    PODS.iter()
        .find(|pod| pod.name == name)
        .ok_or_else(|| LabError::UnknownName(name.to_owned()))
}

impl NodeSpec {
    pub fn netns_name(&self) -> String {
        format!("{NETNS_PREFIX}{}", self.name)
    }

    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(self.netns_name())
    }

    pub fn subnet_cidr(&self) -> String {
        format!("{}/24", self.pod_subnet)
    }

    pub fn subnet6_cidr(&self) -> String {
        format!("{}/64", self.pod_subnet6)
    }

    /// Both pod subnets, IPv4 first.
    pub fn pod_subnets(&self) -> [String; 2] {
        [self.subnet_cidr(), self.subnet6_cidr()]
    }

    pub fn pods(&self) -> impl Iterator<Item = &'static PodSpec> + use<'_> {
        PODS.iter().filter(move |pod| pod.node.name == self.name)
    }

    pub fn dir(&self) -> PathBuf {
        Path::new(STATE_DIR).join(self.name)
    }

    pub fn conflist_path(&self) -> PathBuf {
        self.dir().join("10-ztlab.conflist")
    }

    pub fn network_name(&self) -> String {
        format!("ztlab-{}", self.name)
    }

    pub fn api_socket(&self) -> PathBuf {
        self.dir().join("ztunnel.sock")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir().join("ztunnel.log")
    }

    pub fn pid_file(&self) -> PathBuf {
        self.dir().join("ztunnel.pid")
    }

    pub fn ipam_dir(&self) -> PathBuf {
        self.dir().join("ipam")
    }

    pub fn cni_cache_dir(&self) -> PathBuf {
        self.dir().join("cni-results")
    }

    /// The node's own CNI bin dir, where `ztunnel install-cni` puts the plugin; searched
    /// first (it exists only once something installed there).
    pub fn cni_bin_dir(&self) -> PathBuf {
        self.dir().join("cni-bin")
    }

    /// The daemon's `--state-dir`: the records of its enrolled pods.
    pub fn daemon_state_dir(&self) -> PathBuf {
        self.dir().join("state")
    }

    pub fn bpffs_dir(&self) -> PathBuf {
        Path::new(BPFFS_ROOT).join(self.name)
    }

    pub fn cgroup_dir(&self) -> PathBuf {
        cgroup_root().join(self.name)
    }

    /// What the kubelet would call the node's pod cgroup root.
    pub fn kubepods_cgroup(&self) -> PathBuf {
        self.cgroup_dir().join("kubepods")
    }

    /// Where commands run "on the node" go, like systemd's system.slice on a real node.
    pub fn system_cgroup(&self) -> PathBuf {
        self.cgroup_dir().join("system")
    }

    /// The daemon's own cgroup, outside kubepods so capture never applies to it.
    pub fn daemon_cgroup(&self) -> PathBuf {
        self.cgroup_dir().join("ztunnel")
    }
}

impl PodSpec {
    /// The address host-local gives the pod in a fresh lab: pods are added in `PODS` order, and
    /// each node hands out its subnet from .2 upwards.
    pub fn expected_ip(&self) -> Ipv4Addr {
        let [a, b, c, _] = self.node.pod_subnet.octets();
        Ipv4Addr::new(a, b, c, 2 + self.index_on_node())
    }

    /// The IPv6 address host-local gives the pod in a fresh lab: the same order, from ::2 of
    /// the node's /64 upwards (a1 fd00:10:244:1::2, ..., w1 fd00:10:244:2::4).
    pub fn expected_ip6(&self) -> Ipv6Addr {
        let mut segments = self.node.pod_subnet6.segments();
        segments[7] = 2 + u16::from(self.index_on_node());
        Ipv6Addr::from(segments)
    }

    fn index_on_node(&self) -> u8 {
        let index = PODS
            .iter()
            .filter(|p| p.node.name == self.node.name)
            .position(|p| p.name == self.name)
            .unwrap_or(0);
        u8::try_from(index).unwrap_or(u8::MAX)
    }

    pub fn netns_name(&self) -> String {
        format!("{NETNS_PREFIX}{}", self.name)
    }

    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(self.netns_name())
    }

    /// kubelet's cgroupfs naming: `<kubepods>/pod<uid>`.
    pub fn cgroup_path(&self) -> PathBuf {
        self.node.kubepods_cgroup().join(format!("pod{}", self.uid))
    }

    /// A stable 64-hex-digit sandbox id, like a container runtime's, derived from the name.
    pub fn container_id(&self) -> String {
        let digest = Sha256::digest(format!("ztlab-sandbox-{}", self.name));
        digest.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// The ztunnel-cni plugin's config skips these namespaces, so the pod stays out of the mesh.
    pub fn excluded_from_capture(&self) -> bool {
        EXCLUDED_NAMESPACES.contains(&self.namespace)
    }
}

/// Where `ztunnel`, `ztunnel-cni`, `lab-tool` and `load-tool` are: `ZTUNNEL_BIN_DIR`, else the
/// `debug` directory of cargo's target dir (`CARGO_TARGET_DIR` or the workspace's `target`).
/// A lab's daemons and CNI plugin may come from another directory (`DaemonOptions::bin_dir`,
/// another build's, to compare it with this one); the traffic tools always come from here.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ZTUNNEL_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => std::path::absolute(&dir).unwrap_or_else(|_| PathBuf::from(dir)),
        None => workspace_root().join("target"),
    };
    target.join("debug")
}

/// The workspace this crate was built from.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// A binary of the project, which must already be built.
pub fn binary(name: &str) -> Result<PathBuf> {
    binary_in(&bin_dir(), name)
}

/// A binary of the project in `dir`, which must be there.
pub fn binary_in(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(LabError::MissingBinary { path })
    }
}
