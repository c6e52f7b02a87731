//! The userspace proxy: per enrolled pod, an outbound listener (15001) that receives the pod's
//! captured connections and an inbound listener (15006) that receives connections steered to
//! the pod, each relayed to its original destination.
//!
//! Today both legs are plain TCP; the cross-node leg is where the HBONE tunnel goes
//! (`outbound::connect_upstream` is the one place that chooses how to reach a destination).

mod inbound;
mod outbound;
mod relay;
mod sockets;

use crate::connections::ConnectionLog;
use crate::datapath::Datapath;
use crate::netns::Netns;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

pub use sockets::ListenerError;

/// What every connection handler needs.
pub struct ProxyContext {
    /// The netns the daemon started in; threads return here after creating pod sockets.
    pub home: Netns,
    pub datapath: Arc<Datapath>,
    pub connections: ConnectionLog,
    pub mark: u32,
}

/// One pod as the proxy sees it.
pub struct PodProxy {
    /// `namespace/name`, for records and logs.
    pub label: String,
    pub netns: Netns,
}

/// The listeners of one pod, open inside its netns.
pub struct PodListeners {
    pub outbound: Vec<TcpListener>,
    pub inbound: Vec<(IpAddr, TcpListener)>,
}

impl PodListeners {
    /// Opens the outbound listener on each pod address and one inbound listener per family.
    pub fn open(
        ctx: &ProxyContext,
        netns: &Netns,
        ips: &[IpAddr],
    ) -> Result<PodListeners, ListenerError> {
        let mut listeners = PodListeners {
            outbound: Vec::new(),
            inbound: Vec::new(),
        };
        for &ip in ips {
            listeners
                .outbound
                .push(sockets::outbound_listener(ctx, netns, ip)?);
            listeners
                .inbound
                .push((ip, sockets::inbound_listener(ctx, netns, ip)?));
        }
        Ok(listeners)
    }
}

/// Serves a pod's listeners until the returned set is dropped or aborted (at disenrollment).
pub fn serve(ctx: Arc<ProxyContext>, pod: Arc<PodProxy>, listeners: PodListeners) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    for listener in listeners.outbound {
        tasks.spawn(accept_loop(
            ctx.clone(),
            pod.clone(),
            listener,
            "outbound",
            outbound::handle,
        ));
    }
    for (_, listener) in listeners.inbound {
        tasks.spawn(accept_loop(
            ctx.clone(),
            pod.clone(),
            listener,
            "inbound",
            inbound::handle,
        ));
    }
    tasks
}

/// Accepts until aborted, handing each connection to `handle` on a task of its own.
async fn accept_loop<Handle, Handled>(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodProxy>,
    listener: TcpListener,
    kind: &'static str,
    handle: Handle,
) where
    Handle: Fn(Arc<ProxyContext>, Arc<PodProxy>, TcpStream, SocketAddr) -> Handled,
    Handled: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, client)) => {
                tokio::spawn(handle(ctx.clone(), pod.clone(), stream, client));
            }
            Err(err) => {
                // Usually transient (out of file descriptors, a connection reset while queued):
                // back off briefly so a persistent one cannot spin a core.
                tracing::warn!(pod = %pod.label, listener = kind, %err, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
