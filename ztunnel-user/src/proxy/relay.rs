//! Moving bytes both ways until both sides are done, with TCP half-close carried across.

use tokio::net::TcpStream;

/// Per-direction buffer: large enough for few syscalls per megabyte.
const BUFFER_SIZE: usize = 256 * 1024;

/// Relays until both directions reached EOF (each EOF is passed on as a write shutdown).
/// Returns (bytes downstream -> upstream, bytes upstream -> downstream).
pub async fn relay(
    mut downstream: TcpStream,
    mut upstream: TcpStream,
) -> std::io::Result<(u64, u64)> {
    tokio::io::copy_bidirectional_with_sizes(
        &mut downstream,
        &mut upstream,
        BUFFER_SIZE,
        BUFFER_SIZE,
    )
    .await
}
