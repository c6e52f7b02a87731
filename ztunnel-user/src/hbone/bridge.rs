//! Relaying between a TCP connection and an HTTP/2 stream, with half-close carried across:
//! TCP EOF becomes END_STREAM and END_STREAM becomes a TCP write shutdown. Nothing is held
//! for a direction while it is idle: reads go through a per-thread buffer only once the
//! socket is readable, and what h2 hands over is written from its own buffers.

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use socket2::SockRef;
use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use tokio::net::TcpStream;

/// Read size from TCP; HTTP/2 frames are cut to the peer's max frame size by h2.
const CHUNK: usize = 256 * 1024;

thread_local! {
    /// Where reads land before their bytes are copied, at their exact size, for h2.
    static READ_BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0; CHUNK].into_boxed_slice());
}

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

fn read_once(tcp: &TcpStream) -> io::Result<Read> {
    READ_BUFFER.with_borrow_mut(|buffer| match tcp.try_read(buffer) {
        Ok(0) => Ok(Read::Eof),
        Ok(read) => Ok(Read::Data(Bytes::copy_from_slice(&buffer[..read]))),
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(Read::NotYet),
        Err(err) => Err(err),
    })
}

async fn tcp_to_stream(tcp: &TcpStream, mut send: SendStream<Bytes>) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        tcp.readable().await?;
        let mut pending = match read_once(tcp)? {
            Read::Data(data) => data,
            Read::Eof => {
                send.send_data(Bytes::new(), true).map_err(h2_error)?;
                return Ok(total);
            }
            Read::NotYet => continue,
        };
        total += pending.len() as u64;
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
