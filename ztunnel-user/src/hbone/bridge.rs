//! Relaying between a TCP connection and an HTTP/2 stream, with half-close carried across:
//! TCP EOF becomes END_STREAM and END_STREAM becomes a TCP write shutdown. Nothing is held
//! for a direction while it is idle: a read's buffer is allocated once the socket is
//! readable and handed to h2 as it is (no copy), and what h2 hands over is written from its
//! own buffers.

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use socket2::SockRef;
use std::io;
use std::net::Shutdown;
use tokio::net::TcpStream;

/// Read sizes from TCP. Reads start small (a request, a handshake) and grow while they fill
/// their buffer (a bulk transfer): a small message costs a small buffer, a large flow few
/// syscalls. HTTP/2 frames are cut to the peer's max frame size by h2.
const MIN_READ: usize = 16 * 1024;
const MAX_READ: usize = 256 * 1024;

/// Relays both ways until both directions finished. Returns (bytes TCP -> stream, bytes
/// stream -> TCP).
pub async fn bridge(
    tcp: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
) -> io::Result<(u64, u64)> {
    tokio::try_join!(tcp_to_stream(&tcp, send), stream_to_tcp(recv, &tcp))
}

/// What one read of the socket gave.
enum Read {
    Data(Bytes),
    Eof,
    NotYet,
}

/// One read of up to `size` bytes, into a buffer of its own.
fn read_once(tcp: &TcpStream, size: usize) -> io::Result<Read> {
    let mut buffer = BytesMut::with_capacity(size);
    match tcp.try_read_buf(&mut buffer) {
        Ok(0) => Ok(Read::Eof),
        Ok(_) => Ok(Read::Data(buffer.freeze())),
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(Read::NotYet),
        Err(err) => Err(err),
    }
}

/// The next read size after a read of `read` bytes into `size`.
fn next_read_size(size: usize, read: usize) -> usize {
    if read == size {
        (size * 2).min(MAX_READ)
    } else if read < size / 4 {
        (size / 2).max(MIN_READ)
    } else {
        size
    }
}

async fn tcp_to_stream(tcp: &TcpStream, mut send: SendStream<Bytes>) -> io::Result<u64> {
    let mut total = 0u64;
    let mut size = MIN_READ;
    loop {
        tcp.readable().await?;
        let mut pending = match read_once(tcp, size)? {
            Read::Data(data) => data,
            Read::Eof => {
                send.send_data(Bytes::new(), true).map_err(h2_error)?;
                return Ok(total);
            }
            Read::NotYet => continue,
        };
        total += pending.len() as u64;
        size = next_read_size(size, pending.len());
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
    }
}

async fn stream_to_tcp(mut recv: RecvStream, tcp: &TcpStream) -> io::Result<u64> {
    let mut total = 0u64;
    while let Some(data) = recv.data().await {
        let data = data.map_err(h2_error)?;
        write_all(tcp, &data).await?;
        total += data.len() as u64;
        // Return the window only once the bytes left for the socket: backpressure end to end.
        recv.flow_control()
            .release_capacity(data.len())
            .map_err(h2_error)?;
    }
    SockRef::from(tcp).shutdown(Shutdown::Write)?;
    Ok(total)
}

async fn write_all(tcp: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        tcp.writable().await?;
        match tcp.try_write(data) {
            Ok(written) => data = &data[written..],
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

pub fn h2_error(err: h2::Error) -> io::Error {
    if err.is_io() {
        err.into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"))
    } else {
        io::Error::other(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_grow_while_full_and_shrink_when_small() {
        assert_eq!(next_read_size(MIN_READ, MIN_READ), 2 * MIN_READ);
        assert_eq!(next_read_size(MAX_READ, MAX_READ), MAX_READ);
        assert_eq!(next_read_size(4 * MIN_READ, 3 * MIN_READ), 4 * MIN_READ);
        assert_eq!(next_read_size(4 * MIN_READ, 64), 2 * MIN_READ);
        assert_eq!(next_read_size(MIN_READ, 1), MIN_READ);
    }
}
