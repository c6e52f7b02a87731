//! HBONE: TCP connections carried as HTTP/2 CONNECT streams over mutual TLS, wire-compatible
//! with Istio's ztunnel (port 15008). This module knows the wire only: the client's pool and
//! requests (`client`), the server's handshake, request checks and status codes (`server`,
//! which hands each accepted stream to a handler), the TLS handshakes (`mtls`), and a stream
//! as a byte stream for an HBONE connection inside another (`stream_io`). What a
//! stream carries and for whom is the proxy's business.

pub mod client;
pub(crate) mod mtls;
pub mod server;
pub(crate) mod stream_io;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// HTTP/2 settings of the contract.
pub(crate) const INITIAL_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub(crate) const INITIAL_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub(crate) const MAX_FRAME_SIZE: u32 = 1024 * 1024;
pub(crate) const SERVER_MAX_CONCURRENT_STREAMS: u32 = 200;
/// The client opens another pooled connection once one carries this many streams.
pub(crate) const CLIENT_STREAMS_PER_CONNECTION: usize = 100;
pub(crate) const PING_INTERVAL: Duration = Duration::from_secs(10);
pub(crate) const PING_TIMEOUT: Duration = Duration::from_secs(20);
pub(crate) const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Open HBONE connections and streams on one side (the client's pool, or the servers on
/// every pod's 15008), for the metrics; drain waits on the servers'.
#[derive(Debug, Default)]
pub(crate) struct OpenCounts {
    connections: AtomicUsize,
    streams: AtomicUsize,
}

impl OpenCounts {
    pub(crate) fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    pub(crate) fn streams(&self) -> usize {
        self.streams.load(Ordering::Acquire)
    }

    fn add(count: &AtomicUsize) {
        count.fetch_add(1, Ordering::AcqRel);
    }

    fn remove(count: &AtomicUsize) {
        count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Keeps an HTTP/2 connection honest: a PING every `PING_INTERVAL`; no PONG within
/// `PING_TIMEOUT` means the peer is gone. Returns when the connection should be closed.
pub(crate) async fn keepalive(mut ping_pong: h2::PingPong) {
    loop {
        tokio::time::sleep(PING_INTERVAL).await;
        match tokio::time::timeout(PING_TIMEOUT, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(err)) => {
                tracing::debug!(%err, "HBONE keepalive ended");
                return;
            }
            Err(_) => {
                tracing::warn!("HBONE peer did not answer a PING within {PING_TIMEOUT:?}; closing");
                return;
            }
        }
    }
}
