//! Moving bytes both ways between two TCP connections until both sides are done, with TCP
//! half-close carried across. The bytes never enter userspace: each direction splices from
//! one socket into a pipe and from the pipe into the other socket. A direction makes its pipe
//! when its first byte arrives, so an idle connection holds no pipe and no buffer.
//!
//! The relay is a hand-written future: it lives as long as the connection, and polling
//! readiness directly keeps its state to the two sockets and each direction's pipe and
//! counters.

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

/// Relays until both directions reached EOF (each EOF is passed on as a write shutdown).
/// Resolves to (bytes `a` -> `b`, bytes `b` -> `a`); an error in either direction ends both.
pub fn relay(a: TcpStream, b: TcpStream) -> Relay {
    Relay {
        a,
        b,
        a_to_b: Pump::default(),
        b_to_a: Pump::default(),
    }
}

pub struct Relay {
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

/// Two directions of one relay as one: done when both are, failed as soon as either fails.
pub fn both_directions(
    forward: Poll<io::Result<()>>,
    backward: Poll<io::Result<()>>,
) -> Poll<io::Result<()>> {
    match (forward, backward) {
        (Poll::Ready(Err(err)), _) | (_, Poll::Ready(Err(err))) => Poll::Ready(Err(err)),
        (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => Poll::Ready(Ok(())),
        _ => Poll::Pending,
    }
}

/// One direction: `from` to `to`, until `from`'s EOF, which becomes `to`'s write shutdown.
#[derive(Default)]
struct Pump {
    pipe: Option<Pipe>,
    /// Spliced into the pipe, not yet out of it.
    in_pipe: usize,
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
            let pipe = match &mut self.pipe {
                Some(pipe) => pipe,
                None => {
                    ready!(from.poll_read_ready(cx))?;
                    self.pipe.insert(Pipe::new()?)
                }
            };
            // Empty the pipe into `to` before reading more: the pipe bounds what is in flight.
            if self.in_pipe > 0 {
                ready!(to.poll_write_ready(cx))?;
                match to.try_io(Interest::WRITABLE, || {
                    splice(pipe.read.as_raw_fd(), to.as_raw_fd(), self.in_pipe)
                }) {
                    Ok(written) => self.in_pipe -= written,
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    Err(err) => return Poll::Ready(Err(err)),
                }
                continue;
            }
            ready!(from.poll_read_ready(cx))?;
            match from.try_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pipe.write.as_raw_fd(), PIPE_SIZE)
            }) {
                Ok(0) => {
                    SockRef::from(to).shutdown(Shutdown::Write)?;
                    self.done = true;
                }
                Ok(read) => {
                    self.in_pipe = read;
                    self.total += read as u64;
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => return Poll::Ready(Err(err)),
            }
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
