//! HBONE: TCP connections carried as HTTP/2 CONNECT streams over mutual TLS, wire-compatible
//! with Istio's ztunnel (port 15008).

pub mod bridge;
pub mod client;
pub mod mtls;
pub mod server;

use std::time::Duration;

/// HTTP/2 settings of the contract.
pub const INITIAL_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const INITIAL_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME_SIZE: u32 = 1024 * 1024;
pub const SERVER_MAX_CONCURRENT_STREAMS: u32 = 200;
/// The client opens another pooled connection once one carries this many streams.
pub const CLIENT_STREAMS_PER_CONNECTION: usize = 100;
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
pub const PING_TIMEOUT: Duration = Duration::from_secs(20);
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Keeps an HTTP/2 connection honest: a PING every `PING_INTERVAL`; no PONG within
/// `PING_TIMEOUT` means the peer is gone. Returns when the connection should be closed.
pub async fn keepalive(mut ping_pong: h2::PingPong) {
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
