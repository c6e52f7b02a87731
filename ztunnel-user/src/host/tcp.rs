//! The TCP options of every connection the daemon accepts or opens: no Nagle delay (the
//! relays write what they just read, and waiting for an ACK would only add latency), and
//! keepalive probes, so that a connection whose peer vanished without a FIN or RST is found
//! dead and closed instead of holding its descriptors for ever.
//!
//! They are set on each listener, not on each connection it accepts: Linux makes an accepted
//! connection a copy of its listener's socket, options included, which saves five
//! `setsockopt` calls on every connection (the connection-rate path). Connections the daemon
//! opens set them one by one, but for its deliveries to an app, which run over the pod's
//! loopback: see `configure_loopback`.

use socket2::{SockRef, TcpKeepalive};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Idle time before the first probe, the time between probes, and the probes unanswered
/// before the kernel gives up: a dead peer is found within about two minutes of silence.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 6;

/// Sets the options on `socket`: a connection, or a listener whose connections will have them.
pub(crate) fn configure<'s>(socket: impl Into<SockRef<'s>>) -> io::Result<()> {
    let socket = socket.into();
    socket.set_tcp_nodelay(true)?;
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    socket.set_tcp_keepalive(&keepalive)
}

/// Sets the options of a connection to an app in the same netns, over its loopback: no Nagle
/// delay, and no keepalive, which could find nothing there (four `setsockopt` calls fewer per
/// delivered connection). Such a peer cannot vanish without the kernel knowing: its end closes
/// when its process does, and the proxy's socket keeps the netns, and so the loopback, alive.
pub(crate) fn configure_loopback<'s>(socket: impl Into<SockRef<'s>>) -> io::Result<()> {
    socket.into().set_tcp_nodelay(true)
}

/// After a read of `read` bytes into room for `wanted`: a read that returned less than it had
/// room for emptied the receive queue, so `tcp` is marked not readable and its next read waits
/// for the next readiness event, instead of a `recv` that would only say EAGAIN (one system
/// call fewer per message, on every request/response turn). Nothing is lost: data or a FIN
/// that arrives later raises a new event (epoll is edge-triggered on every arrival), tokio
/// keeps readiness that came in since the read, and never clears a received FIN's. (TCP
/// urgent data also cuts a read short; a peer sending it only slows its own connection.)
pub(crate) fn read_to_the_end(tcp: &TcpStream, read: usize, wanted: usize) {
    if read > 0 && read < wanted {
        let nothing_more = || Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock));
        let _ = tcp.try_io(Interest::READABLE, nothing_more);
    }
}

/// A TCP stream read as `read_to_the_end` says: what TLS runs over, so the HBONE connections'
/// reads skip the EAGAIN `recv` too.
pub(crate) struct TcpTransport(TcpStream);

impl TcpTransport {
    pub(crate) fn new(tcp: TcpStream) -> Self {
        TcpTransport(tcp)
    }
}

impl AsyncRead for TcpTransport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let (before, wanted) = (buf.filled().len(), buf.remaining());
        ready!(Pin::new(&mut this.0).poll_read(cx, buf))?;
        read_to_the_end(&this.0, buf.filled().len() - before, wanted);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TcpTransport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_configured(socket: SockRef<'_>) {
        assert!(socket.tcp_nodelay().unwrap());
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
    }

    #[test]
    fn sets_nodelay_and_keepalive() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        configure(&stream).unwrap();
        assert_configured(SockRef::from(&stream));
    }

    /// A short read marks the stream drained: the next read waits for new bytes, gets them,
    /// and still sees a FIN that arrived before the read that drained the queue.
    #[tokio::test]
    async fn a_short_read_waits_for_more_and_never_loses_the_end() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let mut server = TcpTransport::new(listener.accept().await.unwrap().0);
        let mut buf = [0u8; 64];
        let wait = Duration::from_millis(200);

        client.write_all(b"first").await.unwrap();
        assert_eq!(server.read(&mut buf).await.unwrap(), 5);
        let idle = tokio::time::timeout(wait, server.read(&mut buf)).await;
        assert!(idle.is_err(), "a read after a short one waits for bytes");

        // The bytes and the FIN are both queued before the read that drains the bytes.
        client.write_all(b"second").await.unwrap();
        client.shutdown().await.unwrap();
        tokio::time::sleep(wait).await;
        assert_eq!(server.read(&mut buf).await.unwrap(), 6);
        assert_eq!(&buf[..6], b"second");
        let end = tokio::time::timeout(wait, server.read(&mut buf)).await;
        assert_eq!(end.expect("the FIN is not lost").unwrap(), 0);
    }

    /// What the listeners rely on: the accepted connection has every option of its listener.
    #[test]
    fn an_accepted_connection_inherits_the_listeners_options() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        configure(&listener).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert_configured(SockRef::from(&accepted));
    }
}
