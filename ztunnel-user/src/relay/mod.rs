//! Moving a connection's bytes, the two ways the proxy does: TCP <-> TCP (`tcp`: copies, then
//! splices once a direction turns out to be bulk) and TCP <-> HTTP/2 stream (`h2`: HBONE's
//! CONNECT streams). Both carry half-close across and resolve to the bytes moved each way.
//! A leaf: it knows sockets and h2 streams, nothing of the mesh.
//!
//! The movers are hand-written futures rather than async fns: they live as long as the
//! connection, and polling readiness directly keeps their state to the sockets, the stream
//! handles and the bytes in flight (an async fn would also hold each await's future).

pub(crate) mod h2;
pub(crate) mod tcp;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

/// What moves a connection's bytes. Resolves to (client -> server, server -> client).
pub(crate) enum Carrier {
    /// TCP to TCP.
    Tcp(tcp::Relay),
    /// TCP to an HTTP/2 stream. `tcp_is_client`: the TCP side is the connection's client (an
    /// outbound connection) rather than its server (the app an HBONE stream is delivered to).
    H2 {
        bridge: h2::Bridge,
        tcp_is_client: bool,
    },
}

impl Future for Carrier {
    type Output = io::Result<(u64, u64)>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Carrier::Tcp(relay) => Pin::new(relay).poll(cx),
            Carrier::H2 {
                bridge,
                tcp_is_client,
            } => {
                let tcp_is_client = *tcp_is_client;
                Pin::new(bridge).poll(cx).map_ok(|(from_tcp, to_tcp)| {
                    if tcp_is_client {
                        (from_tcp, to_tcp)
                    } else {
                        (to_tcp, from_tcp)
                    }
                })
            }
        }
    }
}

/// Two directions of one relay as one: done when both are, failed as soon as either fails.
fn both_directions(
    forward: Poll<io::Result<()>>,
    backward: Poll<io::Result<()>>,
) -> Poll<io::Result<()>> {
    match (forward, backward) {
        (Poll::Ready(Err(err)), _) | (_, Poll::Ready(Err(err))) => Poll::Ready(Err(err)),
        (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => Poll::Ready(Ok(())),
        _ => Poll::Pending,
    }
}

/// A non-blocking call's result with "would block" as `None`: nothing moved, wait for
/// readiness again.
fn unless_would_block(result: io::Result<usize>) -> io::Result<Option<usize>> {
    match result {
        Ok(moved) => Ok(Some(moved)),
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(err) => Err(err),
    }
}
