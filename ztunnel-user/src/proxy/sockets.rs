//! Sockets the proxy opens inside a pod's netns: its listeners and its upstream connections.
//! Every one carries a mark of the proxy: its own mark, which the capture programs skip, or, for
//! delivery sockets bound to a client's address, the delivery mark that routes replies back.

use super::{Capture, ProxyContext};
use crate::netns::{Netns, NetnsError};
use socket2::{Domain, Socket};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use tokio::net::{TcpListener, TcpStream};
use ztunnel_common::ports;

const LISTEN_BACKLOG: i32 = 1024;
/// How long a connection to a destination (or an HBONE peer) may take before it counts as
/// unreachable.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("listening on {addr} in {netns}: {source}")]
    Listen {
        addr: SocketAddr,
        netns: String,
        source: io::Error,
    },
}

fn domain_of(ip: IpAddr) -> Domain {
    if ip.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    }
}

fn listen(
    ctx: &ProxyContext,
    netns: &Netns,
    addr: SocketAddr,
) -> Result<TcpListener, ListenerError> {
    let err = |source| ListenerError::Listen {
        addr,
        netns: netns.path().display().to_string(),
        source,
    };
    let socket = netns.tcp_socket(&ctx.home, domain_of(addr.ip()))?;
    let setup = || -> io::Result<TcpListener> {
        socket.set_mark(ctx.mark)?;
        socket.set_reuse_address(true)?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.bind(&addr.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        TcpListener::from_std(socket.into())
    };
    setup().map_err(err)
}

/// Where `connect4/6` sends the pod's captured connections: `<pod ip>:15001`. (iptables'
/// REDIRECT sends them to the loopback address instead: then the wildcard.)
pub fn outbound_listener(
    ctx: &ProxyContext,
    netns: &Netns,
    pod_ip: IpAddr,
) -> Result<TcpListener, ListenerError> {
    let ip = match ctx.capture {
        Capture::Ebpf => pod_ip,
        Capture::Iptables => wildcard(pod_ip),
    };
    listen(ctx, netns, SocketAddr::new(ip, ports::OUTBOUND))
}

fn wildcard(like: IpAddr) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

/// Where other nodes' proxies open HBONE connections to the pod: `<pod ip>:15008`.
pub fn hbone_listener(
    ctx: &ProxyContext,
    netns: &Netns,
    pod_ip: IpAddr,
) -> Result<TcpListener, ListenerError> {
    listen(ctx, netns, SocketAddr::new(pod_ip, ports::HBONE))
}

/// Where `sk_lookup` assigns inbound connections. Bound to the wildcard address: the program
/// hands it connections for any local address and port, and the accepted socket's local
/// address is the original destination.
pub fn inbound_listener(
    ctx: &ProxyContext,
    netns: &Netns,
    pod_ip: IpAddr,
) -> Result<TcpListener, ListenerError> {
    listen(
        ctx,
        netns,
        SocketAddr::new(wildcard(pod_ip), ports::INBOUND_PLAINTEXT),
    )
}

/// Connects from inside `netns` to `dst`, optionally from a client's address `source`
/// (transparent bind, so the destination sees the original client). A `source` port of 0 lets
/// the kernel choose; a given port (the client's own) is used when it is free here, else the
/// kernel chooses. A given port is also the fast way: a bind to port 0 cannot know the
/// destination and scans for a port no socket of the address holds, TIME_WAIT included
/// (milliseconds per bind with 10,000 of them), where connect checks an explicitly bound
/// port against the whole four-tuple.
pub async fn connect_from(
    ctx: &ProxyContext,
    netns: &Netns,
    source: Option<SocketAddr>,
    dst: SocketAddr,
) -> io::Result<TcpStream> {
    if let Some(client) = source.filter(|source| source.port() != 0) {
        match connect_once(ctx, netns, Some(client), dst).await {
            Err(err) if port_taken(&err) => {
                tracing::debug!(%client, %dst, %err, "the client's port is taken here; the kernel chooses one");
            }
            connected => return connected,
        }
    }
    let any_port = source.map(|source| SocketAddr::new(source.ip(), 0));
    connect_once(ctx, netns, any_port, dst).await
}

/// Another socket holds the port: at bind (`EADDRINUSE`), or with the same four-tuple at
/// connect (`EADDRNOTAVAIL`).
fn port_taken(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::AddrInUse | io::ErrorKind::AddrNotAvailable
    )
}

async fn connect_once(
    ctx: &ProxyContext,
    netns: &Netns,
    source: Option<SocketAddr>,
    dst: SocketAddr,
) -> io::Result<TcpStream> {
    let socket: Socket = netns
        .tcp_socket(&ctx.home, domain_of(dst.ip()))
        .map_err(io::Error::other)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_mark(if source.is_some() {
        ports::DELIVERY_MARK
    } else {
        ctx.mark
    })?;
    let mut announced = None;
    if let Some(source) = source {
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
        ctx.datapath
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
        // A connect that failed before its SYN went out (the four-tuple is taken) left the
        // announcement, which would let a later connection from that address and port past
        // the proxy; after a SYN consumed it, this finds nothing.
        ctx.datapath.withdraw_delivery(bound);
    }
    connected
}
