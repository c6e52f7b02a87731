//! The proxy's connections out of a pod's netns: into the destination pod's app, from the
//! client's own address (transparent, its four-tuple announced to `sk_lookup` for the
//! connection's life so that its packets are not steered back to the proxy, marked with the
//! delivery mark whose `routing` brings the app's replies back),
//! and to upstreams outside the pod (the pod's own address, the proxy's mark, which capture
//! skips).

mod app_tunnel;
pub(crate) mod routing;

pub(crate) use app_tunnel::AppTunnel;

use crate::capture::Datapath;
use crate::host::netns::{Netns, domain_of};
use socket2::Socket;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use ztunnel_common::ports;

/// How long a connection to a destination (or an HBONE peer) may take before it counts as
/// unreachable.
pub(crate) const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens the proxy's connections from pods' netns.
pub(crate) struct Connector {
    /// The proxy's mark, on connections that do not take a client's address.
    mark: u32,
    /// Where deliveries are announced to `sk_lookup`.
    datapath: Arc<Datapath>,
}

/// A connection the proxy made into a pod's app from a client's address.
pub(crate) struct Delivery {
    pub(crate) app: TcpStream,
    /// Held as long as the connection: see `Announcement`.
    pub(crate) announcement: Announcement,
}

/// A delivery's four-tuple announced to `sk_lookup`, which lets its packets through to the
/// app instead of steering them to the proxy, withdrawn when dropped. It lives as long as the
/// connection, not just its connect: when the app's accept queue overflows, the kernel answers
/// with a SYN cookie and the handshake's last ACK (or a retransmitted SYN) goes through the
/// listener lookup again, seconds after the proxy's connect returned.
pub(crate) struct Announcement {
    datapath: Arc<Datapath>,
    source: SocketAddr,
    app: SocketAddr,
}

impl Drop for Announcement {
    fn drop(&mut self) {
        self.datapath.withdraw_delivery(self.source, self.app);
    }
}

impl Connector {
    pub(crate) fn new(mark: u32, datapath: Arc<Datapath>) -> Connector {
        Connector { mark, datapath }
    }

    /// Connects from inside `netns` to `dst` with the proxy's mark, from the pod's own
    /// address.
    pub(crate) async fn connect(&self, netns: &Netns, dst: SocketAddr) -> io::Result<TcpStream> {
        let socket = self.socket(netns, dst, self.mark)?;
        crate::host::tcp::configure(&socket)?;
        connect(socket, dst).await
    }

    /// Connects from inside `netns` to the app at `dst` from a client's address `source`
    /// (transparent bind, so the app sees the original client). A `source` port of 0 lets
    /// the kernel choose; a given port (the client's own) is used when it is free here, else
    /// the kernel chooses. A given port is also the fast way: a bind to port 0 cannot know the
    /// destination and scans for a port no socket of the address holds, TIME_WAIT included
    /// (milliseconds per bind with 10,000 of them), where connect checks an explicitly bound
    /// port against the whole four-tuple.
    pub(crate) async fn deliver(
        &self,
        netns: &Netns,
        source: SocketAddr,
        dst: SocketAddr,
    ) -> io::Result<Delivery> {
        if source.port() != 0 {
            match self.deliver_once(netns, source, dst).await {
                Err(err) if port_taken(&err) => {
                    tracing::debug!(client = %source, %dst, %err, "the client's port is taken here; the kernel chooses one");
                }
                delivered => return delivered,
            }
        }
        self.deliver_once(netns, SocketAddr::new(source.ip(), 0), dst)
            .await
    }

    /// `deliver`, to an app that may take tunnel information itself (`tunnel`): to the port
    /// it asks, with what it reads first (a PROXY header) written.
    pub(crate) async fn deliver_to_app(
        &self,
        netns: &Netns,
        source: SocketAddr,
        dst: SocketAddr,
        tunnel: Option<AppTunnel<'_>>,
    ) -> io::Result<Delivery> {
        let Some(tunnel) = tunnel else {
            return self.deliver(netns, source, dst).await;
        };
        let mut delivery = self.deliver(netns, source, tunnel.port(dst)).await?;
        if let Some(preamble) = tunnel.preamble(dst) {
            delivery.app.write_all(&preamble).await?;
        }
        Ok(delivery)
    }

    async fn deliver_once(
        &self,
        netns: &Netns,
        source: SocketAddr,
        dst: SocketAddr,
    ) -> io::Result<Delivery> {
        // The socket is of the app's family and binds the client's address: across families
        // that cannot work, and the kernel would only say ENOPROTOOPT (IPV6_TRANSPARENT on an
        // IPv4 socket). The caller must give the client's address of the app's family.
        if source.is_ipv4() != dst.is_ipv4() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot deliver from {source} to {dst}: the families differ"),
            ));
        }
        let socket = self.socket(netns, dst, ports::DELIVERY_MARK)?;
        crate::host::tcp::configure_loopback(&socket)?;
        match source {
            SocketAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
            SocketAddr::V6(_) => socket.set_ip_transparent_v6(true)?,
        }
        // A port held only by connections to other destinations, or by their TIME_WAIT, can
        // be bound again: connect then checks the whole four-tuple.
        socket.set_reuse_address(true)?;
        socket.bind(&source.into())?;
        let bound = match source.port() {
            0 => socket
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("bound to a non-IP address"))?,
            _ => source,
        };
        self.datapath
            .announce_delivery(bound, dst)
            .map_err(io::Error::other)?;
        let announcement = Announcement {
            datapath: self.datapath.clone(),
            source: bound,
            app: dst,
        };
        let app = connect(socket, dst).await?;
        Ok(Delivery { app, announcement })
    }

    fn socket(&self, netns: &Netns, dst: SocketAddr, mark: u32) -> io::Result<Socket> {
        let socket: Socket = netns
            .tcp_socket(domain_of(dst.ip()))
            .map_err(io::Error::other)?;
        socket.set_mark(mark)?;
        Ok(socket)
    }
}

/// Connects `socket` to `dst` within `CONNECT_TIMEOUT`.
async fn connect(socket: Socket, dst: SocketAddr) -> io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst))
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {dst} timed out"),
            ))
        })
}

/// Another socket holds the port: at bind (`EADDRINUSE`), or with the same four-tuple at
/// connect (`EADDRNOTAVAIL`).
fn port_taken(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::AddrInUse | io::ErrorKind::AddrNotAvailable
    )
}
