//! What is compared: the paths a connection can take (how it is captured and carried), and
//! the routes between lab pods each path is measured on.

use anyhow::Result;
use std::net::{Ipv4Addr, SocketAddrV4};
use ztunnel_lab::{Lab, PodServer};

/// How traffic between pods is carried. A new way is one variant here plus its lab bring-up
/// in `bring_up`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Path {
    /// No mesh: the pod network alone, the physical limit.
    Direct,
    /// eBPF capture into the node proxies; HBONE (mTLS HTTP/2 CONNECT) between nodes.
    Mesh,
    /// `Mesh` run by another build's `ztunnel` and `ztunnel-cni`, the ones in this directory
    /// (`--baseline DIR`); the load tools are this build's. Only measured when asked for.
    MeshBaseline(&'static std::path::Path),
    /// The same proxies, capture by iptables REDIRECT in the pod netns instead of eBPF.
    Iptables,
    /// No mesh; the clients connect to a plain relay in their own pod, which copies to a relay
    /// in the server's pod (same node: straight to the server). The reference the targets
    /// are calibrated on: the mesh's TCP legs, with no TLS and no HTTP/2.
    Relay,
}

impl Path {
    /// The paths each round measures, in order (the first is the one the others are compared
    /// with), with the mesh of the build in `baseline` right after this build's.
    pub fn all(baseline: Option<&'static std::path::Path>) -> Vec<Path> {
        let mut paths = vec![Path::Direct, Path::Mesh];
        paths.extend(baseline.map(Path::MeshBaseline));
        paths.extend([Path::Iptables, Path::Relay]);
        paths
    }

    /// A short name: progress lines, anomalies, results.json.
    pub fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Mesh => "mesh",
            Path::MeshBaseline(_) => "mesh-baseline",
            Path::Iptables => "iptables",
            Path::Relay => "relay",
        }
    }

    /// The name in the report's tables.
    pub fn label(self) -> String {
        match self {
            Path::MeshBaseline(dir) => format!("mesh (baseline: {})", dir.display()),
            _ => self.name().to_owned(),
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Path::Direct => "no mesh: the lab's pod network without ztunnel",
            Path::Mesh => {
                "eBPF capture, HBONE mTLS through both nodes' proxies (same node: one proxy, no TLS)"
            }
            Path::MeshBaseline(_) => {
                "`mesh` as another build runs it: the baseline build's `ztunnel` daemons and `ztunnel-cni` plugin (`--baseline DIR`), this build's load tools"
            }
            Path::Iptables => {
                "the mesh's proxies, capture by iptables REDIRECT rules in the pod netns instead of eBPF"
            }
            Path::Relay => {
                "no mesh: plain tokio relays (`load-tool relay`, no TLS, no HTTP/2), one in the client's pod and one in the server's (same node: one), the reference the targets were calibrated on"
            }
        }
    }

    /// Whether node proxies carry the traffic (so their memory is measured).
    pub fn has_proxy(self) -> bool {
        match self {
            Path::Direct | Path::Relay => false,
            Path::Mesh | Path::MeshBaseline(_) | Path::Iptables => true,
        }
    }

    /// A fresh lab for this path (any previous lab is torn down first).
    pub fn bring_up(self) -> Result<Lab> {
        Ok(match self {
            Path::Direct | Path::Relay => ztunnel_lab::up_without_ztunnel()?,
            Path::Mesh => ztunnel_lab::up_with(&measured())?,
            Path::MeshBaseline(dir) => ztunnel_lab::up_with(&ztunnel_lab::DaemonOptions {
                bin_dir: Some(dir.to_path_buf()),
                ..measured()
            })?,
            Path::Iptables => ztunnel_lab::up_with(&ztunnel_lab::DaemonOptions {
                iptables_capture: true,
                ..measured()
            })?,
        })
    }

    /// What a client on `route` connects to for a server listening on `port`.
    pub fn target(self, route: Route, server_ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
        match self {
            Path::Relay => SocketAddrV4::new(Ipv4Addr::LOCALHOST, relay_port(route, port)),
            Path::Direct | Path::Mesh | Path::MeshBaseline(_) | Path::Iptables => {
                SocketAddrV4::new(server_ip, port)
            }
        }
    }

    /// Starts what the path runs in the pods besides the servers (the relays, for `ports` on
    /// every route); they stop when the returned handles are dropped.
    pub fn start_relays(self, lab: &Lab, ports: &[u16]) -> Result<Vec<PodServer>> {
        if self != Path::Relay {
            return Ok(Vec::new());
        }
        let mut client_side = Vec::new();
        let mut relays = Vec::new();
        for route in Route::ALL {
            let server_ip = lab.pod(route.server())?.ip;
            let mut server_side = Vec::new();
            for &port in ports {
                let relayed = relay_port(route, port);
                let listen = SocketAddrV4::new(Ipv4Addr::LOCALHOST, relayed);
                match route {
                    Route::CrossNode => {
                        let across = SocketAddrV4::new(server_ip, relayed);
                        client_side.push((listen, across));
                        server_side.push((across, SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)));
                    }
                    Route::SameNode => {
                        client_side.push((listen, SocketAddrV4::new(server_ip, port)));
                    }
                }
            }
            if !server_side.is_empty() {
                relays.push(PodServer::start_relay(route.server(), &server_side)?);
            }
        }
        relays.push(PodServer::start_relay(
            Route::CrossNode.client(),
            &client_side,
        )?);
        Ok(relays)
    }
}

/// The port a relay listens on for a server's `port`: one range per route, so one relay
/// process in the client's pod serves both routes.
fn relay_port(route: Route, port: u16) -> u16 {
    let offset = match route {
        Route::CrossNode => 10_000,
        Route::SameNode => 20_000,
    };
    port + offset
}

/// Between which lab pods a figure is measured.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Route {
    /// a1 on node1 to b1 on node2.
    CrossNode,
    /// a1 to a2, both on node1.
    SameNode,
}

impl Route {
    pub const ALL: [Route; 2] = [Route::CrossNode, Route::SameNode];

    pub fn client(self) -> &'static str {
        "a1"
    }

    pub fn server(self) -> &'static str {
        match self {
            Route::CrossNode => "b1",
            Route::SameNode => "a2",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Route::CrossNode => "cross node",
            Route::SameNode => "same node",
        }
    }

    /// E.g. "a1 (node1) -> b1 (node2)".
    pub fn pods(self) -> String {
        let node = |pod| ztunnel_lab::topology::pod_spec(pod).map_or("?", |spec| spec.node.name);
        format!(
            "{} ({}) -> {} ({})",
            self.client(),
            node(self.client()),
            self.server(),
            node(self.server())
        )
    }

    /// E.g. "cross node, a1 (node1) -> b1 (node2)".
    pub fn description(self) -> String {
        format!("{}, {}", self.name(), self.pods())
    }
}

/// The daemons as the benchmark runs them: its one client pod holds every idle connection,
/// which the per-pod share of the descriptor budget (not what is measured) would cap at half
/// of this machine's limit.
fn measured() -> ztunnel_lab::DaemonOptions {
    ztunnel_lab::DaemonOptions {
        env: vec![("ZTUNNEL_POD_SHARE_PERCENT".into(), "100".into())],
        ..ztunnel_lab::DaemonOptions::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_baseline_mesh_is_measured_only_when_asked_for_right_after_the_mesh() {
        let names = |paths: Vec<Path>| paths.into_iter().map(Path::name).collect::<Vec<_>>();
        assert_eq!(
            names(Path::all(None)),
            ["direct", "mesh", "iptables", "relay"]
        );
        let dir = std::path::Path::new("/opt/old-build");
        let paths = Path::all(Some(dir));
        assert_eq!(
            names(paths.clone()),
            ["direct", "mesh", "mesh-baseline", "iptables", "relay"]
        );
        assert_eq!(paths[2].label(), "mesh (baseline: /opt/old-build)");
        assert!(paths[2].has_proxy());
    }
}
