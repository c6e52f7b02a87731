//! `up`: nodes, underlay, daemons and pods, in the order a cluster would come up.

use crate::cgroup;
use crate::cni;
use crate::command::ip_in;
use crate::daemon::{self, ControlPlane, DaemonOptions};
use crate::error::{LabError, Result};
use crate::istiod;
use crate::kube;
use crate::mesh;
use crate::netns;
use crate::state::{Lab, Node, Pod};
use crate::teardown::down;
use crate::topology::{BPFFS_MOUNT, NODES, NodeSpec, PODS, PodSpec, UNDERLAY_IFNAME, cgroup2};

/// Brings the whole lab up from scratch (tearing down leftovers first): two nodes, each with
/// its ztunnel daemon, and the four pods added through the CNI chain including ztunnel-cni.
/// On failure everything is torn down again.
pub fn up() -> Result<Lab> {
    up_with(&DaemonOptions::default())
}

/// `up` with daemons started with `options` (kept for daemons restarted later, too).
pub fn up_with(options: &DaemonOptions) -> Result<Lab> {
    bring_up(Some(options))
}

/// The same nodes and pods on a plain pod network: no daemons, no ztunnel-cni plugin. A
/// baseline for measurements, and a way to debug the wiring on its own.
pub fn up_without_ztunnel() -> Result<Lab> {
    bring_up(None)
}

fn bring_up(daemons: Option<&DaemonOptions>) -> Result<Lab> {
    down()?;
    preflight(daemons)?;
    match build(daemons) {
        Ok(lab) => Ok(lab),
        Err(error) => {
            println!("up: failed, tearing down what was built");
            if let Err(cleanup) = down() {
                println!("up: teardown after the failure failed too: {cleanup}");
            }
            Err(error)
        }
    }
}

fn preflight(daemons: Option<&DaemonOptions>) -> Result<()> {
    cgroup2()?;
    if let Some(options) = daemons {
        options.daemon_binary("ztunnel")?;
        options.daemon_binary("ztunnel-cni")?;
        if !is_bpffs_mounted() {
            return Err(LabError::NotSetUp(format!(
                "bpffs is not mounted at {BPFFS_MOUNT}"
            )));
        }
    }
    Ok(())
}

fn is_bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|mounts| {
        mounts.lines().any(|line| {
            let mut fields = line.split_whitespace().skip(1);
            fields.next() == Some(BPFFS_MOUNT) && fields.next() == Some("bpf")
        })
    })
}

fn build(daemons: Option<&DaemonOptions>) -> Result<Lab> {
    let with_ztunnel = daemons.is_some();
    for node in &NODES {
        create_node(node, with_ztunnel)?;
    }
    connect_underlay()?;
    if let Some(options) = daemons {
        mesh::write_mesh_config()?;
        options.save()?;
        if options.control_plane == ControlPlane::Istiod {
            let pid = istiod::start_istiod()?;
            println!(
                "up: istiod (fake-istiod, pid {pid}) serving the mesh file on {}",
                istiod::address()
            );
        }
    }
    let kubernetes = daemons.is_some_and(|options| options.kubernetes);
    if kubernetes {
        let pid = kube::start_kube_api()?;
        println!(
            "up: Kubernetes API (fake-kube-apiserver, pid {pid}) on {}, no namespace labelled {}=ambient",
            kube::address(),
            kube::DATAPLANE_MODE
        );
    }
    let mut nodes = Vec::new();
    for node in &NODES {
        let daemon_pid = if with_ztunnel {
            let pid = daemon::start_daemon(node.name)?;
            println!("up: node {}: ztunnel daemon ready (pid {pid})", node.name);
            Some(pid)
        } else {
            None
        };
        nodes.push(Node {
            name: node.name.to_owned(),
            netns: node.netns_path(),
            underlay_ip: node.underlay_ip,
            pod_subnet: node.subnet_cidr(),
            conflist: node.conflist_path(),
            api_socket: node.api_socket(),
            log: node.log_path(),
            bpffs: node.bpffs_dir(),
            cgroup_root: node.kubepods_cgroup(),
            daemon_pid,
        });
    }
    let mut pods = Vec::new();
    for pod in &PODS {
        pods.push(add_pod(pod, with_ztunnel, kubernetes)?);
    }
    let lab = Lab {
        with_ztunnel,
        nodes,
        pods,
    };
    lab.save()?;
    println!(
        "up: lab ready, state in {}",
        crate::state::state_path().display()
    );
    Ok(lab)
}

fn create_node(node: &NodeSpec, with_ztunnel: bool) -> Result<()> {
    for dir in [node.dir(), node.ipam_dir()] {
        std::fs::create_dir_all(&dir).map_err(|e| LabError::io("creating", dir, e))?;
    }
    netns::create(&node.netns_name())?;
    // A new namespace starts from the kernel defaults, not the host's settings.
    for (key, value) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
        // The node routes its pods' IPv6 traffic too (dual stack).
        ("net.ipv6.conf.all.forwarding", "1"),
    ] {
        netns::set_sysctl(&node.netns_path(), key, value)?;
    }
    for dir in [
        node.kubepods_cgroup(),
        node.daemon_cgroup(),
        node.system_cgroup(),
    ] {
        cgroup::create(&dir)?;
    }
    cni::write_conflist(node, with_ztunnel)?;
    println!(
        "up: node {}: netns {}, pod subnets {} and {}, CNI config {}",
        node.name,
        node.netns_name(),
        node.subnet_cidr(),
        node.subnet6_cidr(),
        node.conflist_path().display()
    );
    Ok(())
}

/// One veth pair between the two nodes, and a route on each to the other's pod subnets (IPv4
/// and IPv6).
fn connect_underlay() -> Result<()> {
    let [first, second] = &NODES;
    ip_in(
        &first.netns_name(),
        &[
            "link",
            "add",
            UNDERLAY_IFNAME,
            "type",
            "veth",
            "peer",
            "name",
            UNDERLAY_IFNAME,
            "netns",
            &second.netns_name(),
        ],
    )?;
    for node in &NODES {
        let netns = node.netns_name();
        let address = format!("{}/24", node.underlay_ip);
        ip_in(&netns, &["addr", "add", &address, "dev", UNDERLAY_IFNAME])?;
        // No duplicate address detection: the link has two ends, both ours, and a tentative
        // address would hold the first packets back for a second or two.
        let address6 = format!("{}/64", node.underlay_ip6);
        let add6 = ["addr", "add", &address6, "dev", UNDERLAY_IFNAME, "nodad"];
        ip_in(&netns, &add6)?;
        ip_in(&netns, &["link", "set", UNDERLAY_IFNAME, "up"])?;
        let peer = node.peer();
        for (subnet, via) in [
            (peer.subnet_cidr(), peer.underlay_ip.to_string()),
            (peer.subnet6_cidr(), peer.underlay_ip6.to_string()),
        ] {
            ip_in(&netns, &["route", "add", &subnet, "via", &via])?;
        }
    }
    println!(
        "up: underlay {UNDERLAY_IFNAME}: {} {} {} <-> {} {} {}",
        first.name,
        first.underlay_ip,
        first.underlay_ip6,
        second.name,
        second.underlay_ip,
        second.underlay_ip6
    );
    Ok(())
}

fn add_pod(pod: &PodSpec, with_ztunnel: bool, kubernetes: bool) -> Result<Pod> {
    netns::create(&pod.netns_name())?;
    cgroup::create(&pod.cgroup_path())?;
    if kubernetes {
        kube::start_sandbox(pod)?;
    }
    let result = cni::cni_add(pod.name).map_err(|error| {
        if with_ztunnel {
            LabError::WithDaemonLog {
                error: Box::new(error),
                node: pod.node.name.to_owned(),
                tail: daemon::log_tail(pod.node),
            }
        } else {
            error
        }
    })?;
    let given = (result.ip, result.ip6);
    let expected = (pod.expected_ip(), Some(pod.expected_ip6()));
    if with_ztunnel && given != expected {
        // The mesh config was written with the expected addresses.
        return Err(LabError::Command {
            command: format!("CNI ADD of {}", pod.name),
            detail: format!(
                "host-local gave {given:?} instead of {expected:?}, which the mesh config lists"
            ),
        });
    }
    // By label, none is captured until its namespace is labelled.
    let captured = with_ztunnel && !kubernetes && !pod.excluded_from_capture();
    println!(
        "up: pod {} ({}/{} on {}): {} {}, {}",
        pod.name,
        pod.namespace,
        pod.name,
        pod.node.name,
        result.ip,
        result.ip6.map(|ip| ip.to_string()).unwrap_or_default(),
        if captured { "captured" } else { "not captured" }
    );
    Ok(Pod {
        name: pod.name.to_owned(),
        node: pod.node.name.to_owned(),
        namespace: pod.namespace.to_owned(),
        uid: pod.uid.to_owned(),
        container_id: pod.container_id(),
        service_account: pod.service_account.to_owned(),
        ip: result.ip,
        ip6: result.ip6,
        netns: pod.netns_path(),
        cgroup: pod.cgroup_path(),
        captured,
    })
}
