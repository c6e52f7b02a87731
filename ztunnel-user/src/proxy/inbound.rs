//! Connections to a pod: plaintext steered by `sk_lookup` into the 15006 listener, and HBONE
//! on 15008; both delivered to the app from the client's own address.

use super::relay::relay;
use super::sockets::connect_from;
use super::{PodProxy, ProxyContext};
use crate::api::Direction;
use crate::hbone::mtls::accept;
use crate::hbone::server::{Peer, serve_connection};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;
use ztunnel_common::ports;

pub(super) async fn handle(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodProxy>,
    stream: TcpStream,
    client: SocketAddr,
) {
    // sk_lookup keeps the original destination as the accepted socket's local address.
    let destination = match stream.local_addr() {
        Ok(addr) => addr,
        Err(err) => {
            tracing::warn!(pod = %pod.label, %client, %err, "cannot read the original destination");
            return;
        }
    };
    if ports::is_proxy_port(destination.port()) {
        // A direct connection to 15006 itself: delivering it would loop back here.
        tracing::warn!(pod = %pod.label, %client, %destination, "refusing a connection to a proxy port");
        return;
    }
    let tracked = ctx
        .connections
        .record(Direction::Inbound, &pod.label, client, destination);
    match connect_from(&ctx, &pod.netns, Some(client.ip()), destination).await {
        Ok(app) => tracked.finish_with(&relay(stream, app).await),
        Err(err) => {
            tracing::info!(pod = %pod.label, %client, %destination, %err, "delivery to the app failed");
            tracked.finish(0, 0, Some(err.to_string()));
        }
    }
}

/// An mTLS connection on the pod's 15008: its CONNECT streams are served by the HBONE server.
pub(super) async fn handle_hbone(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodProxy>,
    stream: TcpStream,
    client: SocketAddr,
) {
    let local = match stream.local_addr() {
        Ok(local) => local,
        Err(err) => {
            tracing::warn!(pod = %pod.label, %client, %err, "cannot read the HBONE connection's address");
            return;
        }
    };
    match accept(&pod.hbone_acceptor, stream).await {
        Ok((tls, identity)) => {
            let peer = Peer {
                addr: client,
                local,
                identity,
            };
            serve_connection(tls, ctx.clone(), pod, peer).await;
        }
        Err(err) => tracing::info!(pod = %pod.label, %client, %err, "HBONE TLS handshake refused"),
    }
}
