//! An HTTP/2 stream as a byte stream (`AsyncRead` + `AsyncWrite`): what runs inside a CONNECT
//! stream when that stream carries another HBONE connection (double HBONE, through a network's
//! gateway): the inner connection's TLS and HTTP/2 read and write it like a socket. Reads hand
//! back flow-control credit as the bytes are consumed, and writes wait for credit, so memory
//! stays bounded by the windows, as on the relay path.

use crate::relay::h2::{io_error, poll_send_credit};
use bytes::Bytes;
use h2::{RecvStream, SendStream};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub(crate) struct StreamIo<Guard> {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received, not yet read.
    readable: Bytes,
    /// END_STREAM sent.
    ended: bool,
    /// Held as long as the stream (the client's slot on its pooled connection).
    _guard: Guard,
}

impl<Guard: Unpin> StreamIo<Guard> {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream, guard: Guard) -> Self {
        StreamIo {
            send,
            recv,
            readable: Bytes::new(),
            ended: false,
            _guard: guard,
        }
    }
}

impl<Guard: Unpin> AsyncRead for StreamIo<Guard> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.readable.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                Some(data) => this.readable = data.map_err(io_error)?,
                // END_STREAM: the byte stream's end.
                None => return Poll::Ready(Ok(())),
            }
        }
        let taken = this
            .readable
            .split_to(buf.remaining().min(this.readable.len()));
        buf.put_slice(&taken);
        this.recv
            .flow_control()
            .release_capacity(taken.len())
            .map_err(io_error)?;
        Poll::Ready(Ok(()))
    }
}

impl<Guard: Unpin> AsyncWrite for StreamIo<Guard> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let written = ready!(poll_send_credit(&mut this.send, buf.len(), cx))?;
        this.send
            .send_data(Bytes::copy_from_slice(&buf[..written]), false)
            .map_err(io_error)?;
        Poll::Ready(Ok(written))
    }

    /// h2 sends what it was given as the connection's task runs: nothing is held here.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// END_STREAM: the peer reads the end of the byte stream.
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !std::mem::replace(&mut this.ended, true) {
            this.send.reserve_capacity(0);
            this.send.send_data(Bytes::new(), true).map_err(io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests;
