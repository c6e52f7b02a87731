//! Connections a pod opened, captured by `connect4/6` into the 15001 listener.

use super::relay::relay;
use super::sockets::connect_from;
use super::{PodProxy, ProxyContext};
use crate::api::Direction;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;

pub(super) async fn handle(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodProxy>,
    stream: TcpStream,
    client: SocketAddr,
) {
    // Only connections the kernel captured have an original destination; anything else that
    // reached 15001 (a direct connection to the port) is refused.
    let Some(destination) = ctx.datapath.take_orig_dst(client) else {
        tracing::warn!(pod = %pod.label, %client, "connection to the outbound port without an original destination; closing");
        return;
    };
    let tracked = ctx
        .connections
        .record(Direction::Outbound, &pod.label, client, destination);
    match connect_upstream(&ctx, &pod, destination).await {
        Ok(upstream) => relay(stream, upstream, tracked).await,
        Err(err) => {
            tracing::info!(pod = %pod.label, %client, %destination, %err, "upstream connection failed");
            tracked.finish(0, 0, Some(err.to_string()));
        }
    }
}

/// How the proxy reaches a destination for a pod: a plain TCP connection from inside the
/// pod's netns, so it leaves with the pod's address.
async fn connect_upstream(
    ctx: &ProxyContext,
    pod: &PodProxy,
    destination: SocketAddr,
) -> std::io::Result<TcpStream> {
    connect_from(ctx, &pod.netns, None, destination).await
}
