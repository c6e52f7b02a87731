//! Connections to a pod: plaintext steered by `sk_lookup` into the 15006 listener, and HBONE
//! on 15008; both authorized, then delivered to the app from the client's own address.

use super::carry::{self, Carriage, Connected};
use super::outbound::open_hbone;
use super::relay::relay;
use super::route::Route;
use super::sockets::connect_from;
use super::{PodProxy, ProxyContext, describe};
use crate::api::Direction;
use crate::connections::Subject;
use crate::hbone::mtls::accept;
use crate::hbone::server::{Peer, handshake, serve_connection};
use crate::metrics::{Observed, Reporter, TrafficLabels};
use bytes::Bytes;
use h2::server::Connection;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use ztunnel_common::ports;

/// A plaintext connection's whole life (its set-up owns the arguments, as in
/// `outbound::handle`).
pub(super) fn handle(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodProxy>,
    stream: TcpStream,
    client: SocketAddr,
) -> impl Future<Output = ()> + Send {
    carry::serve(Box::pin(set_up(ctx, pod, stream, client)))
}

/// Finds the original destination, authorizes and connects to the app (or sends a client
/// that bypassed the pod's waypoint to it); `None` if the connection ended there.
async fn set_up(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodProxy>,
    stream: TcpStream,
    client: SocketAddr,
) -> Option<Carriage> {
    let (ctx, pod) = (&ctx, &pod);
    let destination = match ctx.inbound_destination(&stream) {
        Ok(addr) => addr,
        Err(err) => {
            tracing::warn!(pod = %pod.label, %client, %err, "cannot read the original destination");
            return None;
        }
    };
    if ports::is_proxy_port(destination.port()) {
        // A direct connection to 15006 itself: delivering it would loop back here.
        tracing::warn!(pod = %pod.label, %client, %destination, "refusing a connection to a proxy port");
        return None;
    }
    let config = ctx.mesh.current();
    let labels = TrafficLabels::new(&Observed {
        reporter: Reporter::Destination,
        source: describe(&config, client.ip(), None),
        source_identity: None,
        destination: describe(&config, destination.ip(), Some(pod)),
        destination_identity: Some(&pod.identity),
        service: None,
        mutual_tls: false,
    });
    let mut tracked =
        ctx.connections
            .record(Direction::Inbound, &pod.label, client, destination, labels);
    // A client that bypassed the pod's waypoint is sent to it; the waypoint's own
    // connections are not (`waypoint_of`).
    let connected = if let Some(Route::Hbone {
        peer,
        authority,
        identities,
    }) = Route::waypoint_of(&config, client.ip(), destination)
    {
        open_hbone(ctx, pod, client, peer, authority, identities)
            .await
            .map(|hbone| Connected::over_hbone(stream, hbone))
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
            tracked.denied(&denial);
            return None;
        }
        // The client's own connection ends here, in the proxy, and holds its four-tuple in
        // this netns: the delivery takes another port.
        let source = SocketAddr::new(client.ip(), 0);
        connect_from(ctx, &pod.netns, Some(source), destination)
            .await
            .map(|app| Connected::splice(relay(stream, app)))
    };
    Carriage::after(tracked, connected)
}

/// An mTLS connection on the pod's 15008: its CONNECT streams are served by the HBONE server.
pub(super) async fn handle_hbone(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodProxy>,
    stream: TcpStream,
    client: SocketAddr,
) {
    // Boxed: the handshakes' state is freed before the connection's long life begins.
    let Some((connection, peer)) = Box::pin(hbone_handshakes(&pod, stream, client)).await else {
        return;
    };
    serve_connection(connection, ctx, pod, peer).await;
}

/// The TLS and HTTP/2 handshakes of an HBONE connection; `None` (logged) if either failed.
async fn hbone_handshakes(
    pod: &PodProxy,
    stream: TcpStream,
    client: SocketAddr,
) -> Option<(Connection<TlsStream<TcpStream>, Bytes>, Arc<Peer>)> {
    let local = match stream.local_addr() {
        Ok(local) => local,
        Err(err) => {
            tracing::warn!(pod = %pod.label, %client, %err, "cannot read the HBONE connection's address");
            return None;
        }
    };
    let (tls, identity) = match accept(&pod.hbone_acceptor, stream).await {
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
