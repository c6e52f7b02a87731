//! The TCP options of every connection the daemon accepts or opens: no Nagle delay (the
//! relays write what they just read, and waiting for an ACK would only add latency), and
//! keepalive probes, so that a connection whose peer vanished without a FIN or RST is found
//! dead and closed instead of holding its descriptors for ever.
//!
//! They are set on each listener, not on each connection it accepts: Linux makes an accepted
//! connection a copy of its listener's socket, options included, which saves five
//! `setsockopt` calls on every connection (the connection-rate path). Connections the daemon
//! opens set them one by one.

use socket2::{SockRef, TcpKeepalive};
use std::io;
use std::time::Duration;

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
