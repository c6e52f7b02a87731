//! A pod's listeners, open inside its netns, and the accept loops that admit each connection
//! (`admission`) and hand it to its handler on a task of its own. Every listener carries the
//! proxy's mark.

use super::admission::Admitted;
use super::{PodProxy, ProxyContext, ServingAs, inbound, inbound_hbone, outbound};
use crate::host::netns::{Netns, NetnsError, domain_of, unspecified};
use pin_project_lite::pin_project;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::WaitForCancellationFutureOwned;
use ztunnel_common::ports;

const LISTEN_BACKLOG: i32 = 1024;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ListenerError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("listening on {addr} in {netns}: {source}")]
    Listen {
        addr: SocketAddr,
        netns: String,
        source: io::Error,
    },
}

/// The listeners of one pod.
pub(crate) struct PodListeners {
    outbound: Vec<TcpListener>,
    /// One per address: `sk_lookup` finds them by the pod's address.
    pub(crate) inbound: Vec<(IpAddr, TcpListener)>,
    hbone: Vec<TcpListener>,
}

impl PodListeners {
    /// Opens the outbound and HBONE listeners on each pod address and one inbound listener per
    /// address:
    /// - outbound: where capture sends the pod's connections (`<pod ip>:15001`);
    /// - HBONE: where other nodes' proxies connect (`<pod ip>:15008`);
    /// - inbound: where `sk_lookup` assigns connections to the pod. Bound to the wildcard
    ///   address: the program hands it connections for any local address and port, and the
    ///   accepted socket's local address is the original destination.
    pub(crate) fn open(
        ctx: &ProxyContext,
        netns: &Netns,
        ips: &[IpAddr],
    ) -> Result<PodListeners, ListenerError> {
        let mark = ctx.settings.mark;
        let mut listeners = PodListeners {
            outbound: Vec::new(),
            inbound: Vec::new(),
            hbone: Vec::new(),
        };
        for &ip in ips {
            let outbound = SocketAddr::new(ctx.capture.outbound_listener_ip(ip), ports::OUTBOUND);
            let inbound = SocketAddr::new(unspecified(ip), ports::INBOUND_PLAINTEXT);
            listeners.outbound.push(listen(netns, outbound, mark)?);
            listeners.inbound.push((ip, listen(netns, inbound, mark)?));
            let hbone = SocketAddr::new(ip, ports::HBONE);
            listeners.hbone.push(listen(netns, hbone, mark)?);
        }
        Ok(listeners)
    }

    /// Serves the listeners until the returned set is dropped or aborted (at disenrollment,
    /// and when the daemon drains).
    pub(crate) fn serve(self, ctx: Arc<ProxyContext>, pod: Arc<PodProxy>) -> JoinSet<()> {
        let mut tasks = JoinSet::new();
        for listener in self.outbound {
            let accepting = accept_loop(ctx.clone(), pod.clone(), listener, outbound::handle);
            tasks.spawn(accepting);
        }
        for listener in self.hbone {
            let accepting = accept_loop(ctx.clone(), pod.clone(), listener, inbound_hbone::handle);
            tasks.spawn(accepting);
        }
        for (_, listener) in self.inbound {
            let accepting = accept_loop(ctx.clone(), pod.clone(), listener, inbound::handle);
            tasks.spawn(accepting);
        }
        tasks
    }
}

fn listen(netns: &Netns, addr: SocketAddr, mark: u32) -> Result<TcpListener, ListenerError> {
    let err = |source| ListenerError::Listen {
        addr,
        netns: netns.path().display().to_string(),
        source,
    };
    let socket = netns.tcp_socket(domain_of(addr.ip()))?;
    let setup = || -> io::Result<TcpListener> {
        socket.set_mark(mark)?;
        socket.set_reuse_address(true)?;
        // Set once here: every connection accepted inherits them.
        crate::host::tcp::configure(&socket)?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.bind(&addr.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        TcpListener::from_std(socket.into())
    };
    setup().map_err(err)
}

/// A connection a pod's listener accepted and admitted.
pub(super) struct Accepted {
    pub(super) stream: TcpStream,
    pub(super) client: SocketAddr,
    /// Its charge on the pod's share of the budget, held as long as the connection.
    pub(super) admitted: Admitted,
    /// Who the pod is for this connection (it ends if the pod comes to serve as another).
    pub(super) serving_as: Arc<ServingAs>,
}

/// Accepts until aborted, handing each admitted connection to `handle` on a task of its own;
/// one over the budget is closed at once.
async fn accept_loop<Handle, Handled>(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodProxy>,
    listener: TcpListener,
    handle: Handle,
) where
    Handle: Fn(Arc<ProxyContext>, Arc<PodProxy>, Accepted) -> Handled,
    Handled: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, client)) => {
                let admitted = match pod.share.admit() {
                    Ok(admitted) => admitted,
                    Err(refusal) => {
                        ctx.refusals.refuse(refusal, &pod.label, client);
                        continue;
                    }
                };
                let serving_as = pod.serving_as();
                let released = serving_as.connections.clone().cancelled_owned();
                let accepted = Accepted {
                    stream,
                    client,
                    admitted,
                    serving_as,
                };
                let handled = handle(ctx.clone(), pod.clone(), accepted);
                tokio::spawn(UntilReleased { handled, released });
            }
            Err(err) => {
                // Usually transient (a connection reset while queued; the budget keeps the
                // descriptors from running out): back off briefly so a persistent one cannot
                // spin a core.
                tracing::warn!(pod = %pod.label, %err, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

pin_project! {
    /// A connection's handler, cut short when it must end (`ServingAs::connections`).
    /// Written out rather than as an async block, which would store the handler's future twice
    /// (as its capture and as the local it awaits) and so double every connection's task.
    struct UntilReleased<Handled> {
        #[pin]
        handled: Handled,
        #[pin]
        released: WaitForCancellationFutureOwned,
    }
}

impl<Handled: Future<Output = ()>> Future for UntilReleased<Handled> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.released.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        this.handled.poll(cx)
    }
}
