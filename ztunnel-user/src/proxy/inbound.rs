//! Plaintext connections to a pod, steered by `sk_lookup` (or iptables) into its 15006
//! listener: authorized, then delivered to the app from the client's own address; or, for a
//! client that bypassed the pod's waypoint, sent to the waypoint.

use super::carry::{self, Carriage, Connected};
use super::listeners::Accepted;
use super::outbound::open_hbone;
use super::route::Route;
use super::{PodProxy, ProxyContext, describe};
use crate::api::Direction;
use crate::mesh::authz::Subject;
use crate::telemetry::connections::ConnectionError;
use crate::telemetry::labels::{Observed, Reporter, TrafficLabels};
use crate::telemetry::refusals::Refusal;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use ztunnel_common::ports;

/// A plaintext connection's whole life (its set-up owns the arguments, as in
/// `outbound::handle`).
pub(super) fn handle(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodProxy>,
    accepted: Accepted,
) -> impl Future<Output = ()> + Send {
    carry::serve(Box::pin(set_up(ctx, pod, accepted)))
}

/// Finds the original destination, authorizes and connects to the app (or sends a client
/// that bypassed the pod's waypoint to it); `None` if the connection ended there.
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
    let (ctx, pod) = (&ctx, &pod);
    let destination = match ctx.capture.inbound_destination(&stream) {
        Ok(addr) => addr,
        Err(err) => {
            tracing::warn!(pod = %pod.label, %client, %err, "cannot read the original destination");
            return None;
        }
    };
    if ports::is_pod_port(destination.port()) {
        // A direct connection to 15006 itself: delivering it would loop back here.
        ctx.refusals
            .refuse(Refusal::ToProxyPort, &pod.label, client);
        return None;
    }
    // The delivery's socket (or, for a client sent to the waypoint, its stream's share).
    if let Err(refusal) = admitted.charge_upstream() {
        ctx.refusals.refuse(refusal, &pod.label, client);
        return None;
    }
    let config = ctx.mesh.current();
    let labels = TrafficLabels::new(&Observed {
        reporter: Reporter::Destination,
        source: describe(&config, client.ip(), None),
        source_identity: None,
        destination: describe(&config, destination.ip(), Some(pod)),
        destination_identity: Some(&serving_as.identity),
        service: None,
        mutual_tls: false,
    });
    let mut tracked =
        ctx.connections
            .record(Direction::Inbound, &pod.label, client, destination, labels);
    // A client that bypassed the pod's waypoint is sent to it; the waypoint's own
    // connections are not (`waypoint_of`).
    let via_waypoint = Route::waypoint_of(&config, client.ip(), destination);
    let connected = if let Some(Route::Hbone(hop)) = via_waypoint {
        open_hbone(ctx, pod, &serving_as.identity, client, &hop)
            .await
            .map(|hbone| Connected::over_hbone(stream, hbone))
            .map_err(ConnectionError::Io)
    } else {
        let subject = Subject {
            namespace: pod.namespace.clone(),
            source: client.ip(),
            destination,
            identity: None,
        };
        if let Err(denial) = ctx.authorize(&config, pod, &mut tracked, subject) {
            // Dropping the stream closes the connection: all plaintext clients get from a
            // denial.
            tracked.failed(&ConnectionError::Denied(denial));
            return None;
        }
        // The client's own connection ends here, in the proxy, and holds its four-tuple in
        // this netns: the delivery takes another port.
        let source = SocketAddr::new(client.ip(), 0);
        ctx.connector
            .deliver(&pod.netns, source, destination)
            .await
            .map(|app| Connected::delivered(stream, app))
            .map_err(ConnectionError::Io)
    };
    Carriage::after(tracked, admitted, connected)
}
