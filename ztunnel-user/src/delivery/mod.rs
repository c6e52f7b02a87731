//! The proxy's connections out of a pod's netns: into the destination pod's app, from the
//! client's own address (transparent, announced to `sk_lookup` so it is not steered back to
//! the proxy, marked with the delivery mark whose `routing` brings the app's replies back),
//! and to upstreams outside the pod (the pod's own address, the proxy's mark, which capture
//! skips).

pub(crate) mod routing;

use crate::capture::Datapath;
use crate::host::netns::{Netns, domain_of};
use socket2::Socket;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;
use ztunnel_common::ports;

/// How long a connection to a destination (or an HBONE peer) may take before it counts as
/// unreachable.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens the proxy's connections from pods' netns.
pub(crate) struct Connector {
    /// The proxy's mark, on connections that do not take a client's address.
    mark: u32,
    /// Where deliveries are announced to `sk_lookup`.
    datapath: Arc<Datapath>,
}

impl Connector {
    pub(crate) fn new(mark: u32, datapath: Arc<Datapath>) -> Connector {
        Connector { mark, datapath }
    }

    /// Connects from inside `netns` to `dst`, optionally from a client's address `source`
    /// (transparent bind, so the destination sees the original client). A `source` port of 0
    /// lets the kernel choose; a given port (the client's own) is used when it is free here,
    /// else the kernel chooses. A given port is also the fast way: a bind to port 0 cannot
    /// know the destination and scans for a port no socket of the address holds, TIME_WAIT
    /// included (milliseconds per bind with 10,000 of them), where connect checks an
    /// explicitly bound port against the whole four-tuple.
    pub(crate) async fn connect_from(
        &self,
        netns: &Netns,
        source: Option<SocketAddr>,
        dst: SocketAddr,
    ) -> io::Result<TcpStream> {
        if let Some(client) = source.filter(|source| source.port() != 0) {
            match self.connect_once(netns, Some(client), dst).await {
                Err(err) if port_taken(&err) => {
                    tracing::debug!(%client, %dst, %err, "the client's port is taken here; the kernel chooses one");
                }
                connected => return connected,
            }
        }
        let any_port = source.map(|source| SocketAddr::new(source.ip(), 0));
        self.connect_once(netns, any_port, dst).await
    }

    async fn connect_once(
        &self,
        netns: &Netns,
        source: Option<SocketAddr>,
        dst: SocketAddr,
    ) -> io::Result<TcpStream> {
        let socket: Socket = netns
            .tcp_socket(domain_of(dst.ip()))
            .map_err(io::Error::other)?;
        socket.set_tcp_nodelay(true)?;
        socket.set_mark(if source.is_some() {
            ports::DELIVERY_MARK
        } else {
            self.mark
        })?;
        let mut announced = None;
        if let Some(source) = source {
            match source {
                SocketAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
                SocketAddr::V6(_) => socket.set_ip_transparent_v6(true)?,
            }
            // A port held only by connections to other destinations, or by their TIME_WAIT,
            // can be bound again: connect then checks the whole four-tuple.
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
                .announce_delivery(bound)
                .map_err(io::Error::other)?;
            announced = Some(bound);
        }
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        let connected = match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await {
            Ok(connected) => connected,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {dst} timed out"),
            )),
        };
        if let (Err(_), Some(bound)) = (&connected, announced) {
            // A connect that failed before its SYN went out (the four-tuple is taken) left
            // the announcement, which would let a later connection from that address and port
            // past the proxy; after a SYN consumed it, this finds nothing.
            self.datapath.withdraw_delivery(bound);
        }
        connected
    }
}

/// Another socket holds the port: at bind (`EADDRINUSE`), or with the same four-tuple at
/// connect (`EADDRNOTAVAIL`).
fn port_taken(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::AddrInUse | io::ErrorKind::AddrNotAvailable
    )
}
