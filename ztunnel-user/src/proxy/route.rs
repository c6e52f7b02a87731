//! How the proxy reaches a destination: the one place that resolves services to endpoints,
//! sends traffic through waypoints, and chooses between the same-node path, HBONE and plain
//! TCP.

use super::{PodProxy, ProxyContext};
use crate::identity::Identity;
use crate::mesh::config::{GatewayAddress, MeshConfig, Protocol, Unroutable};
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
    /// An HBONE stream to `peer` (a workload's 15008 or a waypoint), asking for `authority`;
    /// the peer must present one of `identities`.
    Hbone {
        peer: SocketAddr,
        authority: SocketAddr,
        identities: Vec<Identity>,
    },
    /// Outside the mesh: plain TCP.
    Passthrough { target: SocketAddr },
    /// Nothing can take the connection (a service without a healthy endpoint, a waypoint
    /// that resolves to nothing).
    Unavailable(Unroutable),
}

impl Route {
    /// Where the connection is sent: the workload (or VIP, through a waypoint) it reaches.
    pub(super) fn target(&self) -> Option<SocketAddr> {
        match self {
            Route::SameNode { target, .. } | Route::Passthrough { target } => Some(*target),
            Route::Hbone { authority, .. } => Some(*authority),
            Route::Unavailable(_) => None,
        }
    }

    /// Whether both ends are known by their mesh identities: over HBONE, or between two pods
    /// of this node.
    pub(super) fn carries_identities(&self) -> bool {
        matches!(self, Route::SameNode { .. } | Route::Hbone { .. })
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
                    return Route::Unavailable(Unroutable::NoHealthyEndpoint(
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
                Route::Hbone {
                    peer: SocketAddr::new(target.ip(), ports::HBONE),
                    authority: target,
                    identities,
                }
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

fn via_waypoint(
    config: &MeshConfig,
    waypoint: &GatewayAddress,
    source: IpAddr,
    authority: SocketAddr,
) -> Route {
    match config.resolve_waypoint(waypoint, config.workload_by_ip(source)) {
        Some(endpoint) => Route::Hbone {
            peer: endpoint.address,
            authority,
            identities: vec![endpoint.workload.identity()],
        },
        None => Route::Unavailable(Unroutable::NoWaypointInstance(waypoint.destination.clone())),
    }
}
