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
use crate::topology::{
    self, BPFFS_MOUNT, NETWORK_GATEWAY, NODES, NodeSpec, PODS, PodSpec, REMOTE_LINK_IFNAME,
    REMOTE_LINK_IP, REMOTE_LINK_IP6, UNDERLAY_IFNAME, cgroup2,
};
use std::net::{Ipv4Addr, Ipv6Addr};

/// Brings the whole lab up from scratch (tearing down leftovers first): the nodes, each with
/// its ztunnel daemon, and their pods added through the CNI chain including ztunnel-cni.
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
        // No duplicate address detection on the bridge: see `add_pod`.
        ("net.ipv6.conf.default.accept_dad", "0"),
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

/// The underlay. node1 and node2 are one network: a veth pair, each routing to the other's pod
/// subnets. node3 is another network, linked to node1, which routes to nothing of it but its
/// east-west gateway's addresses (as to a load balancer's); node3 routes back to node1's pods
/// and to node1's underlay address, where istiod and the Kubernetes API listen.
fn connect_underlay() -> Result<()> {
    let [node1, node2, node3] = &NODES;
    let (one, two) = (LinkEnd::underlay(node1), LinkEnd::underlay(node2));
    link(&one, &two)?;
    route(node1, &node2.pod_subnets(), &two)?;
    route(node2, &node1.pod_subnets(), &one)?;

    let near = LinkEnd {
        node: node1,
        ifname: REMOTE_LINK_IFNAME,
        ip: REMOTE_LINK_IP,
        ip6: REMOTE_LINK_IP6,
    };
    let far = LinkEnd::underlay(node3);
    link(&near, &far)?;
    let gateway = topology::pod_spec(NETWORK_GATEWAY)?;
    let gateway_addresses = [
        format!("{}/32", gateway.expected_ip()),
        format!("{}/128", gateway.expected_ip6()),
    ];
    route(node1, &gateway_addresses, &far)?;
    let [pods, pods6] = node1.pod_subnets();
    let control_plane = format!("{}/32", node1.underlay_ip);
    route(node3, &[pods, pods6, control_plane], &near)
}

/// One end of a veth pair between two nodes.
struct LinkEnd {
    node: &'static NodeSpec,
    ifname: &'static str,
    ip: Ipv4Addr,
    ip6: Ipv6Addr,
}

impl LinkEnd {
    /// The node's end of the link that carries its underlay addresses.
    fn underlay(node: &'static NodeSpec) -> LinkEnd {
        LinkEnd {
            node,
            ifname: UNDERLAY_IFNAME,
            ip: node.underlay_ip,
            ip6: node.underlay_ip6,
        }
    }
}

/// A veth pair from `a` to `b`, each end with its addresses (a /24 and a /64) and up.
fn link(a: &LinkEnd, b: &LinkEnd) -> Result<()> {
    let b_netns = b.node.netns_name();
    let add = [
        "link", "add", a.ifname, "type", "veth", "peer", "name", b.ifname, "netns", &b_netns,
    ];
    ip_in(&a.node.netns_name(), &add)?;
    for end in [a, b] {
        let netns = end.node.netns_name();
        let address = format!("{}/24", end.ip);
        ip_in(&netns, &["addr", "add", &address, "dev", end.ifname])?;
        // No duplicate address detection: the link has two ends, both ours, and a tentative
        // address would hold the first packets back for a second or two.
        let address6 = format!("{}/64", end.ip6);
        ip_in(
            &netns,
            &["addr", "add", &address6, "dev", end.ifname, "nodad"],
        )?;
        ip_in(&netns, &["link", "set", end.ifname, "up"])?;
    }
    println!(
        "up: link {} {} {} {} <-> {} {} {} {}",
        a.node.name, a.ifname, a.ip, a.ip6, b.node.name, b.ifname, b.ip, b.ip6
    );
    Ok(())
}

/// Routes on `node` to each of `destinations` (IPv4 or IPv6 prefixes) through `via`.
fn route(node: &NodeSpec, destinations: &[String], via: &LinkEnd) -> Result<()> {
    for destination in destinations {
        let gateway = match destination.contains(':') {
            true => via.ip6.to_string(),
            false => via.ip.to_string(),
        };
        ip_in(
            &node.netns_name(),
            &["route", "add", destination, "via", &gateway],
        )?;
    }
    Ok(())
}

fn add_pod(pod: &PodSpec, with_ztunnel: bool, kubernetes: bool) -> Result<Pod> {
    netns::create(&pod.netns_name())?;
    // Every address is host-local's, so none can be a duplicate; with detection on, the bridge
    // plugin waits about two seconds per pod for its IPv6 address to leave the tentative state.
    netns::set_sysctl(&pod.netns_path(), "net.ipv6.conf.default.accept_dad", "0")?;
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
