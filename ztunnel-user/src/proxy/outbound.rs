//! Connections a pod opened, captured by `connect4/6` into the 15001 listener, and how each
//! reaches its destination (`Route`).

use super::relay::relay;
use super::sockets::connect_from;
use super::{PodProxy, ProxyContext};
use crate::api::Direction;
use crate::config::Protocol;
use crate::hbone::bridge::bridge;
use crate::hbone::client::{ConnectRequest, HboneStream, PoolKey};
use crate::identity::Identity;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;
use ztunnel_common::ports;

/// How the proxy reaches a destination for a pod.
pub enum Route {
    /// The destination pod is enrolled on this node: deliver straight into its netns (no TLS,
    /// both identities are known here).
    SameNode(Arc<PodProxy>),
    /// A mesh workload on another node: an HBONE stream to its 15008, which must present
    /// `identity`.
    Hbone { identity: Identity },
    /// Outside the mesh: plain TCP from the pod's netns.
    Passthrough,
}

impl Route {
    pub fn to(ctx: &ProxyContext, destination: SocketAddr) -> Route {
        if let Some(pod) = ctx.local_pod(destination.ip()) {
            return Route::SameNode(pod);
        }
        match ctx.config.workload_by_ip(destination.ip()) {
            Some(workload) if workload.protocol == Protocol::Hbone => Route::Hbone {
                identity: workload.identity(),
            },
            _ => Route::Passthrough,
        }
    }
}

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
    let outcome = match Route::to(&ctx, destination) {
        Route::SameNode(target) => {
            let delivered =
                ctx.connections
                    .record(Direction::Inbound, &target.label, client, destination);
            let outcome =
                match connect_from(&ctx, &target.netns, Some(client.ip()), destination).await {
                    Ok(app) => relay(stream, app).await,
                    Err(err) => Err(err),
                };
            delivered.finish_with(&outcome);
            outcome
        }
        Route::Hbone { identity } => {
            match open_hbone(&ctx, &pod, client, destination, identity).await {
                Ok(hbone) => bridge(stream, hbone.send, hbone.recv).await,
                Err(err) => Err(err),
            }
        }
        Route::Passthrough => match connect_from(&ctx, &pod.netns, None, destination).await {
            Ok(upstream) => relay(stream, upstream).await,
            Err(err) => Err(err),
        },
    };
    if let Err(err) = &outcome {
        tracing::info!(pod = %pod.label, %client, %destination, %err, "outbound connection failed");
    }
    tracked.finish_with(&outcome);
}

/// A CONNECT stream to the destination's node, from the source pod's netns and identity.
async fn open_hbone(
    ctx: &Arc<ProxyContext>,
    pod: &Arc<PodProxy>,
    client: SocketAddr,
    destination: SocketAddr,
    identity: Identity,
) -> io::Result<HboneStream> {
    let peer = SocketAddr::new(destination.ip(), ports::HBONE);
    let key = PoolKey {
        source_identity: pod.identity.clone(),
        destination_identities: vec![identity],
        destination: peer,
        source_ip: client.ip(),
    };
    let request = ConnectRequest {
        authority: destination,
        client,
        baggage: pod.baggage(),
    };
    let connect = || async {
        let tcp = connect_from(ctx, &pod.netns, None, peer).await?;
        ctx.tls
            .connect(&pod.identity, &key.destination_identities, tcp)
            .await
    };
    ctx.pool.open(&key, &request, connect).await
}
