//! TCP <-> TCP, until both sides are done. A direction starts by copying each read through a
//! buffer on the stack (a request, a reply: one `recv` and one `send`). Once a read fills that
//! buffer, the direction is a bulk flow and its bytes stop entering userspace: it makes a pipe
//! and splices from one socket into the pipe and from the pipe into the other socket. An idle
//! connection holds no pipe and no buffer, and a short one never pays for a pipe.

use super::{both_directions, unless_would_block};
use crate::host::tcp::read_to_the_end;
use socket2::SockRef;
use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// How much one splice moves at most, and the pipe size asked for: few syscalls per megabyte.
const PIPE_SIZE: usize = 1024 * 1024;
/// The copy buffer; a read that fills it turns the direction to splicing.
const COPY_SIZE: usize = 16 * 1024;

/// Relays until both directions reached EOF (each EOF is passed on as a write shutdown).
/// Resolves to (bytes `a` -> `b`, bytes `b` -> `a`); an error in either direction ends both.
pub(crate) fn relay(a: TcpStream, b: TcpStream) -> Relay {
    Relay {
        a,
        b,
        a_to_b: Pump::default(),
        b_to_a: Pump::default(),
    }
}

pub(crate) struct Relay {
    a: TcpStream,
    b: TcpStream,
    a_to_b: Pump,
    b_to_a: Pump,
}

impl Future for Relay {
    type Output = io::Result<(u64, u64)>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        // Both directions are polled on every wake: each registers for what it waits on.
        let forward = this.a_to_b.poll(&this.a, &this.b, cx);
        let backward = this.b_to_a.poll(&this.b, &this.a, cx);
        ready!(both_directions(forward, backward))?;
        Poll::Ready(Ok((this.a_to_b.total, this.b_to_a.total)))
    }
}

/// One direction: `from` to `to`, until `from`'s EOF, which becomes `to`'s write shutdown.
#[derive(Default)]
struct Pump {
    /// Made once a read fills the copy buffer; from then on the direction splices.
    pipe: Option<Pipe>,
    /// Spliced into the pipe, not yet out of it.
    in_pipe: usize,
    /// Copied, not yet written (`to` took only part of a read): empty but for a full socket.
    unwritten: Vec<u8>,
    total: u64,
    done: bool,
}

impl Pump {
    fn poll(
        &mut self,
        from: &TcpStream,
        to: &TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while !self.done {
            // What was read must reach `to` before more is read: that bounds what is in flight.
            if !self.unwritten.is_empty() {
                ready!(to.poll_write_ready(cx))?;
                if let Some(written) = unless_would_block(to.try_write(&self.unwritten))? {
                    self.unwritten.drain(..written);
                    if self.unwritten.is_empty() {
                        self.unwritten = Vec::new();
                    }
                }
                continue;
            }
            let Some(pipe) = &mut self.pipe else {
                ready!(self.poll_copy(from, to, cx))?;
                continue;
            };
            if self.in_pipe > 0 {
                ready!(to.poll_write_ready(cx))?;
                let spliced = to.try_io(Interest::WRITABLE, || {
                    splice(pipe.read.as_raw_fd(), to.as_raw_fd(), self.in_pipe)
                });
                if let Some(written) = unless_would_block(spliced)? {
                    self.in_pipe -= written;
                }
                continue;
            }
            ready!(from.poll_read_ready(cx))?;
            let spliced = from.try_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pipe.write.as_raw_fd(), PIPE_SIZE)
            });
            match unless_would_block(spliced)? {
                Some(0) => self.pass_on_eof(to)?,
                Some(read) => {
                    // Never marked drained here: a splice also stops short when the pipe's
                    // slots are full (one per fragment of the socket's buffers), with bytes left
                    // in the socket, and then no new event would come if the sender waits on
                    // its window.
                    self.in_pipe = read;
                    self.total += read as u64;
                }
                None => {}
            }
        }
        Poll::Ready(Ok(()))
    }

    /// `from` reached EOF: so does `to`'s write side, and this direction is done.
    fn pass_on_eof(&mut self, to: &TcpStream) -> io::Result<()> {
        SockRef::from(to).shutdown(Shutdown::Write)?;
        self.done = true;
        Ok(())
    }

    /// One read through the copy buffer and as much of it written as `to` takes; ready once
    /// something happened (bytes moved, EOF passed on, or the direction turned to splicing).
    fn poll_copy(
        &mut self,
        from: &TcpStream,
        to: &TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        ready!(from.poll_read_ready(cx))?;
        let mut buffer = [0u8; COPY_SIZE];
        let read = match unless_would_block(from.try_read(&mut buffer))? {
            Some(0) => return Poll::Ready(self.pass_on_eof(to)),
            Some(read) => read,
            None => return Poll::Ready(Ok(())),
        };
        read_to_the_end(from, read, COPY_SIZE);
        self.total += read as u64;
        let written = unless_would_block(to.try_write(&buffer[..read]))?.unwrap_or(0);
        self.unwritten.extend_from_slice(&buffer[written..read]);
        if read == COPY_SIZE {
            self.pipe = Some(Pipe::new()?);
        }
        Poll::Ready(Ok(()))
    }
}

/// A pipe's two ends.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds: [RawFd; 2] = [-1; 2];
        // SAFETY: pipe2 fills the two-element array we own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are open and now owned here alone.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A larger pipe moves more per splice; the default (64 KiB) still works if refused.
        // SAFETY: F_SETPIPE_SZ takes an int argument.
        unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_SIZE as libc::c_int,
            )
        };
        Ok(Pipe { read, write })
    }
}

/// Moves up to `len` bytes from `from` to `to` without blocking.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both fds are open for the duration of the call; null offsets mean "current
    // position", as sockets and pipes require.
    let moved = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if moved < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(moved as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair of sockets on loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn carries_both_ways_with_half_close_and_counts() {
        let (mut client, proxy_in) = pair().await;
        let (proxy_out, mut server) = pair().await;
        let relayed = tokio::spawn(relay(proxy_in, proxy_out));

        // More than a pipe holds, so the relay must wait for the reader.
        let upload: Vec<u8> = (0..5 * PIPE_SIZE).map(|i| (i % 251) as u8).collect();
        let expected = upload.clone();
        let server_side = tokio::spawn(async move {
            let mut received = Vec::new();
            server.read_to_end(&mut received).await.unwrap();
            assert!(received == expected, "upload arrived changed");
            server
                .write_all(b"reply after the client's EOF")
                .await
                .unwrap();
            server.shutdown().await.unwrap();
        });
        client.write_all(&upload).await.unwrap();
        client.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"reply after the client's EOF");
        server_side.await.unwrap();
        let (up, down) = relayed.await.unwrap().unwrap();
        assert_eq!((up, down), (upload.len() as u64, reply.len() as u64));
    }

    /// Runs one direction from `from` to `to` until `from`'s EOF is passed on.
    async fn pump_until_done(pump: &mut Pump, from: &TcpStream, to: &TcpStream) {
        let pumped = std::future::poll_fn(|cx| pump.poll(from, to, cx));
        tokio::time::timeout(std::time::Duration::from_secs(10), pumped)
            .await
            .expect("the direction finishes")
            .unwrap();
    }

    #[tokio::test]
    async fn a_short_message_is_copied_without_a_pipe() {
        let (mut client, proxy_in) = pair().await;
        let (proxy_out, mut server) = pair().await;
        client.write_all(&[7; 64]).await.unwrap();
        client.shutdown().await.unwrap();
        let mut pump = Pump::default();
        pump_until_done(&mut pump, &proxy_in, &proxy_out).await;
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, [7; 64]);
        assert_eq!(pump.total, 64);
        assert!(pump.pipe.is_none(), "a 64-byte message made a pipe");
    }

    #[tokio::test]
    async fn a_bulk_flow_turns_to_splicing_and_loses_nothing() {
        let (mut client, proxy_in) = pair().await;
        let (proxy_out, mut server) = pair().await;
        let upload: Vec<u8> = (0..PIPE_SIZE + COPY_SIZE / 3)
            .map(|i| (i % 253) as u8)
            .collect();
        let sent = upload.clone();
        let sender = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
        });
        let reader = tokio::spawn(async move {
            let mut received = Vec::new();
            server.read_to_end(&mut received).await.unwrap();
            received
        });
        let mut pump = Pump::default();
        pump_until_done(&mut pump, &proxy_in, &proxy_out).await;
        sender.await.unwrap();
        drop(proxy_out);
        assert!(
            reader.await.unwrap() == upload,
            "the upload arrived changed"
        );
        assert_eq!(pump.total, upload.len() as u64);
        assert!(pump.pipe.is_some(), "a bulk flow did not turn to splicing");
    }

    #[tokio::test]
    async fn a_reset_ends_the_relay_with_an_error() {
        let (client, proxy_in) = pair().await;
        let (proxy_out, server) = pair().await;
        let relayed = tokio::spawn(relay(proxy_in, proxy_out));
        // SO_LINGER 0: closing sends a RST instead of a FIN.
        SockRef::from(&server)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(server);
        let outcome = tokio::time::timeout(std::time::Duration::from_secs(5), relayed)
            .await
            .expect("the relay ends")
            .unwrap();
        assert!(outcome.is_err(), "{outcome:?}");
        drop(client);
    }
}
