//! What is compared: the paths a connection can take (how it is captured and carried), and
//! the routes between lab pods each path is measured on.

use anyhow::Result;
use ztunnel_lab::Lab;

/// How traffic between pods is carried. A new way is one variant here plus its lab bring-up
/// in `bring_up`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Path {
    /// No mesh: the pod network alone, the physical limit.
    Direct,
    /// eBPF capture into the node proxies; HBONE (mTLS HTTP/2 CONNECT) between nodes.
    Mesh,
    /// The same proxies, capture by iptables REDIRECT in the pod netns instead of eBPF.
    Iptables,
}

impl Path {
    /// In the order each round measures them; the first is the baseline of the comparisons.
    pub const ALL: [Path; 3] = [Path::Direct, Path::Mesh, Path::Iptables];

    pub fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Mesh => "mesh",
            Path::Iptables => "iptables",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Path::Direct => "no mesh: the lab's pod network without ztunnel",
            Path::Mesh => {
                "eBPF capture, HBONE mTLS through both nodes' proxies (same node: one proxy, no TLS)"
            }
            Path::Iptables => {
                "the mesh's proxies, capture by iptables REDIRECT rules in the pod netns instead of eBPF"
            }
        }
    }

    /// Whether node proxies carry the traffic (so their memory is measured).
    pub fn has_proxy(self) -> bool {
        match self {
            Path::Direct => false,
            Path::Mesh | Path::Iptables => true,
        }
    }

    /// A fresh lab for this path (any previous lab is torn down first).
    pub fn bring_up(self) -> Result<Lab> {
        Ok(match self {
            Path::Direct => ztunnel_lab::up_without_ztunnel()?,
            Path::Mesh => ztunnel_lab::up()?,
            Path::Iptables => ztunnel_lab::up_with(&ztunnel_lab::DaemonOptions {
                iptables_capture: true,
                ..ztunnel_lab::DaemonOptions::default()
            })?,
        })
    }
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
