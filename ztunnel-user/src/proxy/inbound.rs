//! Connections to a pod, steered by `sk_lookup` into the 15006 listener and delivered to the
//! app from the client's own address.

use super::relay::relay;
use super::sockets::connect_from;
use super::{PodProxy, ProxyContext};
use crate::api::Direction;
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
        Ok(app) => relay(stream, app, tracked).await,
        Err(err) => {
            tracing::info!(pod = %pod.label, %client, %destination, %err, "delivery to the app failed");
            tracked.finish(0, 0, Some(err.to_string()));
        }
    }
}
