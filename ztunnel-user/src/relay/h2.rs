//! TCP <-> HTTP/2 stream: TCP EOF becomes END_STREAM and END_STREAM becomes a TCP write
//! shutdown. Nothing is held for a direction while it is idle: a read's buffer is allocated
//! once the socket is readable and handed to h2 as it is (no copy), and what h2 hands over is
//! written from its own buffers.

use super::{both_directions, unless_would_block};
use crate::host::tcp::read_to_the_end;
use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use socket2::SockRef;
use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::net::TcpStream;

/// Read sizes from TCP. Reads start small (a request, a handshake) and grow while they fill
/// their buffer (a bulk transfer): a small message costs a small buffer, a large flow few
/// syscalls. HTTP/2 frames are cut to the peer's max frame size by h2.
const MIN_READ: usize = 16 * 1024;
const MAX_READ: usize = 256 * 1024;

/// Relays both ways until both directions finished. Resolves to (bytes TCP -> stream, bytes
/// stream -> TCP); an error in either direction ends both.
pub(crate) fn bridge(tcp: TcpStream, send: SendStream<Bytes>, recv: RecvStream) -> Bridge {
    Bridge {
        tcp,
        upload: Upload {
            send,
            pending: Bytes::new(),
            read_size: MIN_READ,
            total: 0,
            done: false,
        },
        download: Download {
            recv,
            pending: Bytes::new(),
            unreleased: 0,
            total: 0,
            done: false,
        },
    }
}

pub(crate) struct Bridge {
    tcp: TcpStream,
    upload: Upload,
    download: Download,
}

/// TCP -> stream.
struct Upload {
    send: SendStream<Bytes>,
    /// Read from TCP, not yet given to h2 (waiting for flow-control credit).
    pending: Bytes,
    read_size: usize,
    total: u64,
    done: bool,
}

/// Stream -> TCP.
struct Download {
    recv: RecvStream,
    /// Received from h2, not yet written to TCP.
    pending: Bytes,
    /// Window to return to the peer once `pending` is written: backpressure end to end.
    unreleased: usize,
    total: u64,
    done: bool,
}

impl Future for Bridge {
    type Output = io::Result<(u64, u64)>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        // Both directions are polled on every wake: each registers for what it waits on.
        let upload = this.upload.poll(&this.tcp, cx);
        let download = this.download.poll(&this.tcp, cx);
        ready!(both_directions(upload, download))?;
        Poll::Ready(Ok((this.upload.total, this.download.total)))
    }
}

impl Upload {
    /// Ready once TCP reached EOF and END_STREAM was sent.
    fn poll(&mut self, tcp: &TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.done {
            if !self.pending.is_empty() {
                // Wait for credit so memory stays bounded by the peer's window.
                let granted = ready!(poll_send_credit(&mut self.send, self.pending.len(), cx))?;
                let chunk = self.pending.split_to(granted);
                self.send.send_data(chunk, false).map_err(io_error)?;
                continue;
            }
            ready!(tcp.poll_read_ready(cx))?;
            let mut buffer = BytesMut::with_capacity(self.read_size);
            let wanted = buffer.capacity();
            match unless_would_block(tcp.try_read_buf(&mut buffer))? {
                Some(0) => {
                    self.send.send_data(Bytes::new(), true).map_err(io_error)?;
                    self.done = true;
                }
                Some(read) => {
                    read_to_the_end(tcp, read, wanted);
                    self.total += read as u64;
                    self.read_size = next_read_size(self.read_size, read);
                    self.pending = buffer.freeze();
                }
                None => {}
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl Download {
    /// Ready once END_STREAM arrived and TCP's write side was shut down.
    fn poll(&mut self, tcp: &TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.done {
            if !self.pending.is_empty() {
                ready!(tcp.poll_write_ready(cx))?;
                if let Some(written) = unless_would_block(tcp.try_write(&self.pending))? {
                    let _ = self.pending.split_to(written);
                }
                continue;
            }
            if self.unreleased > 0 {
                self.recv
                    .flow_control()
                    .release_capacity(self.unreleased)
                    .map_err(io_error)?;
                self.unreleased = 0;
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(data) => {
                    let data = data.map_err(io_error)?;
                    self.total += data.len() as u64;
                    self.unreleased = data.len();
                    self.pending = data;
                }
                None => {
                    SockRef::from(tcp).shutdown(Shutdown::Write)?;
                    self.done = true;
                }
            }
        }
        Poll::Ready(Ok(()))
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

/// An h2 error as the `io::Error` every connection step reports.
/// Asks for `wanted` bytes of the peer's flow-control window and waits until some is granted:
/// what may be sent now (at most `wanted`). A stream the peer reset or closed is a broken pipe.
pub(crate) fn poll_send_credit(
    send: &mut SendStream<Bytes>,
    wanted: usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    send.reserve_capacity(wanted);
    match ready!(send.poll_capacity(cx)) {
        Some(granted) => Poll::Ready(granted.map(|granted| granted.min(wanted)).map_err(io_error)),
        None => Poll::Ready(Err(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "HBONE stream closed by the peer",
        ))),
    }
}

pub(crate) fn io_error(err: h2::Error) -> io::Error {
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
