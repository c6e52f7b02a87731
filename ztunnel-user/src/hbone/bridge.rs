//! Relaying between a TCP connection and an HTTP/2 stream, with half-close carried across:
//! TCP EOF becomes END_STREAM and END_STREAM becomes a TCP write shutdown.

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Read size from TCP; HTTP/2 frames are cut to the peer's max frame size by h2.
const CHUNK: usize = 256 * 1024;

/// Relays both ways until both directions finished. Returns (bytes TCP -> stream, bytes
/// stream -> TCP).
pub async fn bridge<T>(tcp: T, send: SendStream<Bytes>, recv: RecvStream) -> io::Result<(u64, u64)>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (mut read_half, mut write_half) = tokio::io::split(tcp);
    let upload = tcp_to_stream(&mut read_half, send);
    let download = stream_to_tcp(recv, &mut write_half);
    let (sent, received) = tokio::try_join!(upload, download)?;
    Ok((sent, received))
}

async fn tcp_to_stream<R: AsyncRead + Unpin>(
    tcp: &mut R,
    mut send: SendStream<Bytes>,
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut buffer = vec![0u8; CHUNK];
    loop {
        let read = tcp.read(&mut buffer).await?;
        if read == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_error)?;
            return Ok(total);
        }
        let mut pending = Bytes::copy_from_slice(&buffer[..read]);
        while !pending.is_empty() {
            // Wait for flow-control credit so memory stays bounded by the peer's window.
            send.reserve_capacity(pending.len());
            let granted = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(granted) => granted.map_err(h2_error)?,
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "HBONE stream closed by the peer",
                    ));
                }
            };
            let chunk = pending.split_to(granted.min(pending.len()));
            send.send_data(chunk, false).map_err(h2_error)?;
        }
        total += read as u64;
    }
}

async fn stream_to_tcp<W: AsyncWrite + Unpin>(
    mut recv: RecvStream,
    tcp: &mut W,
) -> io::Result<u64> {
    let mut total = 0u64;
    while let Some(data) = recv.data().await {
        let data = data.map_err(h2_error)?;
        tcp.write_all(&data).await?;
        total += data.len() as u64;
        // Return the window only once the bytes left for the socket: backpressure end to end.
        recv.flow_control()
            .release_capacity(data.len())
            .map_err(h2_error)?;
    }
    tcp.shutdown().await?;
    Ok(total)
}

pub fn h2_error(err: h2::Error) -> io::Error {
    if err.is_io() {
        err.into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"))
    } else {
        io::Error::other(err)
    }
}
