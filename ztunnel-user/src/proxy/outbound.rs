//! Connections a pod opened, captured by `connect4/6` into the 15001 listener, carried the
//! way `Route` says.

use super::carry::{self, Carriage, Connected};
use super::listeners::Accepted;
use super::route::{Hop, Route};
use super::{PodProxy, ProxyContext, describe};
use crate::api::Direction;
use crate::delivery::AppTunnel;
use crate::hbone::client::{ConnectRequest, HboneStream, PoolKey};
use crate::host::tcp::TcpTransport;
use crate::identity::Identity;
use crate::mesh::authz::Subject;
use crate::mesh::config::MeshConfig;
use crate::telemetry::connections::ConnectionError;
use crate::telemetry::labels::{Observed, Reporter, TrafficLabels};
use crate::telemetry::refusals::Refusal;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use ztunnel_common::ports;

/// A connection's whole life: its set-up, boxed, then the carrying. The set-up owns the
/// arguments, so the task keeps none of them while the connection carries bytes.
pub(super) fn handle(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodProxy>,
    accepted: Accepted,
) -> impl Future<Output = ()> + Send {
    carry::serve(Box::pin(set_up(ctx, pod, accepted)))
}

/// Routes, authorizes (same node) and connects; `None` if the connection ended there (its
/// records say why).
async fn set_up(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodProxy>,
    accepted: Accepted,
) -> Option<Carriage> {
    let Accepted {
        stream,
        client,
        mut admitted,
        serving_as,
    } = accepted;
    let identity = &serving_as.identity;
    let (ctx, pod) = (&ctx, &pod);
    // Only the pod's own connections, sent here by capture, may go out as the pod: anything
    // else that reached 15001 (from another pod or node, or a direct connection to the port)
    // is refused.
    if !pod.ips.contains(&client.ip()) {
        ctx.refusals.refuse(Refusal::NotFromPod, &pod.label, client);
        return None;
    }
    let Some(destination) = ctx.capture.outbound_destination(&stream, client) else {
        ctx.refusals
            .refuse(Refusal::NoOriginalDestination, &pod.label, client);
        return None;
    };
    let config = ctx.mesh.current();
    let route = Route::outbound(ctx, &config, client.ip(), destination);
    if let Route::SameNode {
        pod: target,
        target: to,
    } = &route
        && ports::is_pod_port(to.port())
    {
        // The proxy's own listeners in another pod: the peer's HBONE server refuses the same
        // across nodes.
        ctx.refusals
            .refuse(Refusal::ToProxyPort, &target.label, client);
        return None;
    }
    if matches!(route, Route::SameNode { .. } | Route::Passthrough { .. })
        && let Err(refusal) = admitted.charge_upstream()
    {
        ctx.refusals.refuse(refusal, &pod.label, client);
        return None;
    }
    let labels = |reporter| {
        let source = (&**pod, &**identity);
        labels(ctx, &config, reporter, source, client, destination, &route)
    };
    let tracked = ctx.connections.record(
        Direction::Outbound,
        &pod.label,
        client,
        destination,
        labels(Reporter::Source),
    );
    let connected = match route {
        Route::SameNode {
            pod: ref target,
            target: to,
        } => {
            let from = pod.address_towards(client, to);
            let mut delivered = ctx.connections.record(
                Direction::Inbound,
                &target.label,
                from,
                to,
                labels(Reporter::Destination),
            );
            let subject = Subject {
                namespace: target.namespace.clone(),
                source: from.ip(),
                destination: to,
                identity: Some(identity.clone()),
            };
            let connected = match ctx.authorize(&config, target, &mut delivered, subject) {
                Ok(()) => {
                    let tunnel = AppTunnel::of(&config, to, from, identity);
                    ctx.connector
                        .deliver_to_app(&target.netns, from, to, tunnel)
                        .await
                        .map_err(ConnectionError::Io)
                }
                Err(denial) => Err(ConnectionError::Denied(denial)),
            };
            match connected {
                Ok(app) => Ok(Connected {
                    delivered: Some(Box::new(delivered)),
                    ..Connected::delivered(stream, app)
                }),
                Err(err) => {
                    delivered.failed(&err);
                    Err(err)
                }
            }
        }
        Route::Hbone(hop) => open_hbone(ctx, pod, identity, client, &hop)
            .await
            .map(|hbone| Connected::over_hbone(stream, hbone))
            .map_err(ConnectionError::Io),
        Route::DoubleHbone { gateway, inner } => {
            open_double_hbone(ctx, pod, identity, client, &gateway, &inner)
                .await
                .map(|hbone| Connected::over_hbone(stream, hbone))
                .map_err(ConnectionError::Io)
        }
        Route::Passthrough { target } => ctx
            .connector
            .connect(&pod.netns, target)
            .await
            .map(|upstream| Connected::tcp(stream, upstream))
            .map_err(ConnectionError::Io),
        Route::Unavailable(why) => Err(ConnectionError::Unroutable(why)),
    };
    Carriage::after(tracked, admitted, connected)
}

/// The metric labels of a connection from `pod`'s `client` to `destination` taking `route`,
/// as `reporter` reports it.
fn labels(
    ctx: &ProxyContext,
    config: &MeshConfig,
    reporter: Reporter,
    (pod, identity): (&PodProxy, &Identity),
    client: SocketAddr,
    destination: SocketAddr,
    route: &Route,
) -> TrafficLabels {
    let target = route.target();
    let target_identity = target.and_then(|t| ctx.identity_at(config, t.ip()));
    TrafficLabels::new(&Observed {
        reporter,
        source: describe(config, client.ip(), Some(pod)),
        source_identity: Some(identity),
        destination: target.and_then(|t| describe(config, t.ip(), None)),
        destination_identity: target_identity.as_ref(),
        service: config.service_at(destination).map(|s| &*s.service),
        mutual_tls: route.carries_identities(),
    })
}

/// A CONNECT stream over `hop`, its connection made from the pod's netns, as `identity`
/// (the pod's for this connection), for a connection from `client`.
pub(super) async fn open_hbone(
    ctx: &Arc<ProxyContext>,
    pod: &PodProxy,
    identity: &Arc<Identity>,
    client: SocketAddr,
    hop: &Hop,
) -> io::Result<HboneStream> {
    let (key, request) = stream_of(pod, identity, client, hop);
    let connect = || async {
        let tcp = ctx.connector.connect(&pod.netns, hop.peer).await?;
        let tcp = TcpTransport::new(tcp);
        ctx.tls
            .connect(&key.source_identity, &key.destination_identities, tcp)
            .await
    };
    ctx.pool.open(&key, &request, connect).await
}

/// A CONNECT stream over `inner`, whose connection is carried by a CONNECT stream over
/// `gateway` (double HBONE): the inner TLS, inside the outer, checks the workload's identity.
async fn open_double_hbone(
    ctx: &Arc<ProxyContext>,
    pod: &PodProxy,
    identity: &Arc<Identity>,
    client: SocketAddr,
    gateway: &Hop,
    inner: &Hop,
) -> io::Result<HboneStream> {
    let (key, request) = stream_of(pod, identity, client, inner);
    let connect = || async {
        let outer = open_hbone(ctx, pod, identity, client, gateway).await?;
        ctx.tls
            .connect(
                &key.source_identity,
                &key.destination_identities,
                outer.into_io(),
            )
            .await
    };
    ctx.pool.open(&key, &request, connect).await
}

/// The pool key of `hop`'s connection and the CONNECT request for it.
fn stream_of(
    pod: &PodProxy,
    identity: &Arc<Identity>,
    client: SocketAddr,
    hop: &Hop,
) -> (PoolKey, ConnectRequest) {
    let key = PoolKey {
        source_identity: identity.clone(),
        destination_identities: hop.identities.clone(),
        destination: hop.peer,
        source_ip: client.ip(),
    };
    let request = ConnectRequest {
        authority: hop.authority,
        client,
        baggage: pod.baggage(),
    };
    (key, request)
}
