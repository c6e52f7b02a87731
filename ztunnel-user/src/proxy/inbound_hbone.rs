//! HBONE connections to a pod's 15008: the mTLS and HTTP/2 handshakes, then each CONNECT
//! stream checked, authorized as the client's TLS identity and delivered to the app from the
//! client's address; the 200 goes out only once the app accepted.

use super::carry::{self, Carriage, Connected};
use super::listeners::Accepted;
use super::{PodProxy, ProxyContext, ServingAs, describe};
use crate::api::Direction;
use crate::delivery::AppTunnel;
use crate::hbone::server::{Incoming, handshake, serve_connection};
use crate::host::tcp::TcpTransport;
use crate::identity::Identity;
use crate::mesh::authz::Subject;
use crate::telemetry::connections::ConnectionError;
use crate::telemetry::labels::{Observed, Reporter, TrafficLabels};
use crate::telemetry::refusals::Refusal;
use bytes::Bytes;
use h2::server::Connection;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// Where an HBONE connection came from and arrived.
#[derive(Clone, Debug)]
struct Peer {
    /// The TCP peer: the source pod's address, since the client connects from its netns.
    addr: SocketAddr,
    /// The local end: the destination pod's address and 15008.
    local: SocketAddr,
    /// The client's, from its certificate; shared with its streams' authorization subjects.
    identity: Arc<Identity>,
}

/// An mTLS connection on the pod's 15008, until the client closes it. Until its handshakes
/// are done it is one of the unauthenticated connections (capped per source address and
/// node-wide), and it has the handshake timeout to get them done.
pub(super) async fn handle(ctx: Arc<ProxyContext>, pod: Arc<PodProxy>, accepted: Accepted) {
    let Accepted {
        stream,
        client,
        admitted: _admitted,
        serving_as,
    } = accepted;
    let handshaking = match ctx.admission.begin_handshake(client.ip()) {
        Ok(handshaking) => handshaking,
        Err(refusal) => return ctx.refusals.refuse(refusal, &pod.label, client),
    };
    // Boxed: the handshakes' state is freed before the connection's long life begins.
    let handshakes = Box::pin(handshakes(&ctx, &pod, &serving_as, stream, client));
    let Ok(handshaken) = tokio::time::timeout(ctx.admission.handshake_timeout(), handshakes).await
    else {
        return ctx
            .refusals
            .refuse(Refusal::HandshakeTimeout, &pod.label, client);
    };
    drop(handshaking);
    let Some((connection, peer)) = handshaken else {
        return;
    };
    let (shutdown, counts) = (ctx.shutdown.clone(), ctx.hbone_server.clone());
    let identity = serving_as.identity.clone();
    let streams = Streams {
        ctx,
        pod,
        identity,
        peer,
    };
    let serve = |incoming| streams.serve(incoming);
    if let Err(err) = serve_connection(connection, shutdown, counts, serve).await {
        tracing::debug!(pod = %streams.pod.label, peer = %streams.peer.addr, %err, "HBONE connection ended");
    }
}

/// What the streams of one HBONE connection share.
struct Streams {
    ctx: Arc<ProxyContext>,
    pod: Arc<PodProxy>,
    /// Who the pod is on this connection.
    identity: Arc<Identity>,
    peer: Arc<Peer>,
}

impl Streams {
    /// One stream's whole life: its set-up, boxed, then the carrying.
    fn serve(&self, incoming: Incoming) -> impl Future<Output = ()> + Send + use<> {
        let set_up = set_up(
            self.ctx.clone(),
            self.pod.clone(),
            self.identity.clone(),
            self.peer.clone(),
            incoming,
        );
        carry::serve(Box::pin(set_up))
    }
}

/// The TLS and HTTP/2 handshakes of an HBONE connection; `None` (logged) if either failed.
async fn handshakes(
    ctx: &ProxyContext,
    pod: &PodProxy,
    serving_as: &ServingAs,
    stream: TcpStream,
    client: SocketAddr,
) -> Option<(Connection<TlsStream<TcpTransport>, Bytes>, Arc<Peer>)> {
    let local = match stream.local_addr() {
        Ok(local) => local,
        Err(err) => {
            tracing::warn!(pod = %pod.label, %client, %err, "cannot read the HBONE connection's address");
            return None;
        }
    };
    let accepted = ctx
        .tls
        .accept(&serving_as.hbone_acceptor, &serving_as.identity, stream);
    let (tls, identity) = match accepted.await {
        Ok(accepted) => accepted,
        Err(err) => {
            tracing::info!(pod = %pod.label, %client, %err, "HBONE TLS handshake refused");
            return None;
        }
    };
    match handshake(tls).await {
        Ok(connection) => Some((
            connection,
            Arc::new(Peer {
                addr: client,
                local,
                identity: Arc::new(identity),
            }),
        )),
        Err(err) => {
            tracing::info!(pod = %pod.label, peer = %client, %err, "HBONE HTTP/2 handshake failed");
            None
        }
    }
}

/// Checks, authorizes and delivers one CONNECT request, answering it; `None` if it was
/// refused or could not be delivered.
async fn set_up(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodProxy>,
    identity: Arc<Identity>,
    peer: Arc<Peer>,
    incoming: Incoming,
) -> Option<Carriage> {
    let (ctx, pod, peer) = (&ctx, &pod, &peer);
    let admitted = match pod.share.admit() {
        Ok(admitted) => admitted,
        Err(refusal) => {
            ctx.refusals.refuse(refusal, &pod.label, peer.addr);
            incoming.fail();
            return None;
        }
    };
    let target = match incoming.target(peer.local) {
        Ok(target) => target,
        Err(refusal) => {
            tracing::info!(pod = %pod.label, peer = %peer.addr, identity = %peer.identity, %refusal, "HBONE request refused");
            incoming.refuse(&refusal);
            return None;
        }
    };
    let client = incoming.client(peer.addr);
    let config = ctx.mesh.current();
    let labels = TrafficLabels::new(&Observed {
        reporter: Reporter::Destination,
        source: describe(&config, peer.addr.ip(), None),
        source_identity: Some(&peer.identity),
        destination: describe(&config, target.ip(), Some(pod)),
        destination_identity: Some(&identity),
        service: None,
        mutual_tls: true,
    });
    let mut tracked =
        ctx.connections
            .record(Direction::Inbound, &pod.label, client, target, labels);
    let subject = Subject {
        namespace: pod.namespace.clone(),
        source: peer.addr.ip(),
        destination: target,
        identity: Some(peer.identity.clone()),
    };
    if let Err(denial) = ctx.authorize(&config, pod, &mut tracked, subject) {
        incoming.deny();
        tracked.failed(&ConnectionError::Denied(denial));
        return None;
    }
    // The 200 goes out only once the app accepted: the client learns of a refusal.
    let source = delivery_source(client, peer.addr);
    let tunnel = AppTunnel::of(&config, target, client, &peer.identity);
    let delivery = ctx
        .connector
        .deliver_to_app(&pod.netns, source, target, tunnel);
    let app = match delivery.await {
        Ok(app) => app,
        Err(err) => {
            tracing::info!(pod = %pod.label, %client, %target, %err, "delivery to the app failed");
            incoming.fail();
            tracked.failed(&ConnectionError::Io(err));
            return None;
        }
    };
    let delivered = incoming
        .accept()
        .map(|(send, recv)| Connected::to_app(app, send, recv))
        .map_err(ConnectionError::Io);
    Carriage::after(tracked, admitted, delivered)
}

/// Where the delivery to the app comes from: the peer's address, with the original client's
/// port when the peer says it is that client (a waypoint's or gateway's peer address is not
/// the client's, so the port says nothing there, and without a `forwarded` port there is none).
fn delivery_source(client: SocketAddr, peer: SocketAddr) -> SocketAddr {
    let port = if client != peer && client.ip() == peer.ip() {
        client.port()
    } else {
        0
    };
    SocketAddr::new(peer.ip(), port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_keeps_the_port_of_a_client_that_is_the_peer() {
        let peer: SocketAddr = "10.0.1.2:40000".parse().unwrap();
        let client: SocketAddr = "10.0.1.2:51234".parse().unwrap();
        assert_eq!(delivery_source(client, peer), client);
        // No `forwarded` port: the client is the peer's connection, whose port says nothing.
        assert_eq!(delivery_source(peer, peer), "10.0.1.2:0".parse().unwrap());
        // Through a waypoint: the delivery comes from the waypoint, on a port of its own.
        let elsewhere: SocketAddr = "10.0.9.9:51234".parse().unwrap();
        assert_eq!(
            delivery_source(elsewhere, peer),
            "10.0.1.2:0".parse().unwrap()
        );
    }
}
