//! How the proxy reaches a destination: the one place that resolves services to endpoints,
//! sends traffic through waypoints and through other networks' gateways, and chooses between
//! the same-node path, HBONE and plain TCP.

use super::{PodProxy, ProxyContext};
use crate::identity::Identity;
use crate::mesh::config::{GatewayAddress, MeshConfig, Protocol, Unroutable, Workload};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use ztunnel_common::ports;

pub(super) enum Route {
    /// The destination pod is enrolled on this node: deliver straight into its netns (no TLS,
    /// both identities are known here).
    SameNode {
        pod: Arc<PodProxy>,
        target: SocketAddr,
    },
    /// An HBONE stream to a workload's 15008 or a waypoint.
    Hbone(Hop),
    /// A workload on another network, through that network's gateway (double HBONE): an HBONE
    /// stream to the gateway carries the HBONE connection to the workload, each with its own
    /// TLS and identity check.
    DoubleHbone { gateway: Hop, inner: Hop },
    /// Outside the mesh: plain TCP.
    Passthrough { target: SocketAddr },
    /// Nothing can take the connection (a service without a healthy endpoint, a waypoint
    /// that resolves to nothing).
    Unavailable(Unroutable),
}

/// One HBONE hop: the connection to `peer`, which must present one of `identities`, and the
/// CONNECT for `authority` on it.
pub(super) struct Hop {
    pub(super) peer: SocketAddr,
    pub(super) identities: Vec<Identity>,
    pub(super) authority: SocketAddr,
}

impl Route {
    /// Where the connection is sent: the workload (or VIP, through a waypoint) it reaches.
    pub(super) fn target(&self) -> Option<SocketAddr> {
        match self {
            Route::SameNode { target, .. } | Route::Passthrough { target } => Some(*target),
            Route::Hbone(hop) | Route::DoubleHbone { inner: hop, .. } => Some(hop.authority),
            Route::Unavailable(_) => None,
        }
    }

    /// Whether both ends are known by their mesh identities: over HBONE, or between two pods
    /// of this node.
    pub(super) fn carries_identities(&self) -> bool {
        matches!(
            self,
            Route::SameNode { .. } | Route::Hbone(_) | Route::DoubleHbone { .. }
        )
    }

    /// The route of a connection from `source` (a pod of this node) to `destination`.
    pub(super) fn outbound(
        ctx: &ProxyContext,
        config: &MeshConfig,
        source: IpAddr,
        destination: SocketAddr,
    ) -> Route {
        let mut target = destination;
        let mut extra_identities = Vec::new();
        if let Some(service) = config.service_at(destination) {
            // A waypoint's own connections to the service are not sent to a waypoint again.
            let from_waypoint = || service.waypoints().any(|w| config.is_waypoint(w, source));
            if let Some(waypoint) = service.waypoint_for_connection()
                && !from_waypoint()
            {
                return via_waypoint(config, waypoint, source, destination);
            }
            if !service.passes_through() {
                let from = config.workload_by_ip(source);
                let Some(endpoint) = config.pick_endpoint(service, from, destination) else {
                    return Route::Unavailable(Unroutable::ServiceWithoutEndpoint(
                        service.key.to_string(),
                    ));
                };
                target = endpoint.address;
            }
            extra_identities = service.extra_identities();
        }
        if let Some(route) = Route::waypoint_of(config, source, target) {
            return route;
        }
        if let Some(pod) = ctx.local_pods.get(target.ip()) {
            return Route::SameNode { pod, target };
        }
        match config.workload_by_ip(target.ip()) {
            Some(workload) if workload.protocol == Protocol::Hbone => {
                let mut identities = vec![workload.identity()];
                identities.extend(extra_identities);
                let hop = Hop {
                    peer: SocketAddr::new(target.ip(), ports::HBONE),
                    identities,
                    authority: target,
                };
                let from = config.workload_by_ip(source);
                let here = from.map_or(&*ctx.settings.network, |w| &w.network);
                if *workload.network == *here {
                    return Route::Hbone(hop);
                }
                through_network_gateway(config, workload, from, hop)
            }
            _ => Route::Passthrough { target },
        }
    }

    /// The waypoint route for traffic to the workload at `target`, unless it has no
    /// waypoint or the traffic comes from that waypoint (it must not be sent back to it).
    pub(super) fn waypoint_of(
        config: &MeshConfig,
        source: IpAddr,
        target: SocketAddr,
    ) -> Option<Route> {
        let waypoint = config.workload_by_ip(target.ip())?.waypoint.as_deref()?;
        (!config.is_waypoint(waypoint, source))
            .then(|| via_waypoint(config, waypoint, source, target))
    }
}

/// The route to `inner`'s workload on another network: through the gateway it names.
fn through_network_gateway(
    config: &MeshConfig,
    workload: &Workload,
    source: Option<&Workload>,
    inner: Hop,
) -> Route {
    let unreachable = || {
        Route::Unavailable(Unroutable::NetworkWithoutGateway {
            workload: workload.label(),
            network: workload.network.to_string(),
        })
    };
    let Some(gateway) = workload.network_gateway.as_deref() else {
        return unreachable();
    };
    match config.resolve_gateway(gateway, source) {
        Some(endpoint) => Route::DoubleHbone {
            gateway: Hop {
                peer: endpoint.address,
                identities: vec![endpoint.workload.identity()],
                // The gateway connects this to the workload's HBONE port.
                authority: inner.peer,
            },
            inner,
        },
        None => unreachable(),
    }
}

fn via_waypoint(
    config: &MeshConfig,
    waypoint: &GatewayAddress,
    source: IpAddr,
    authority: SocketAddr,
) -> Route {
    match config.resolve_gateway(waypoint, config.workload_by_ip(source)) {
        Some(endpoint) => Route::Hbone(Hop {
            peer: endpoint.address,
            identities: vec![endpoint.workload.identity()],
            authority,
        }),
        None => Route::Unavailable(Unroutable::WaypointWithoutInstance(
            waypoint.destination.clone(),
        )),
    }
}
