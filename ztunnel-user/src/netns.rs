//! Network namespaces: opening a pod's, and creating sockets inside it.
//!
//! A socket belongs to the netns of the thread that created it, for its whole life. So the
//! proxy moves the calling thread into the pod netns just for the `socket()` call and moves it
//! straight back; binding, connecting and all I/O then happen from any thread.

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {path}: {source}")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("creating a socket in network namespace {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading the cookie of network namespace {path}: {source}")]
    Cookie {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    file: File,
}

impl Netns {
    pub fn open(path: &Path) -> Result<Netns, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?;
        Ok(Netns {
            path: path.to_owned(),
            file,
        })
    }

    /// The namespace this process started in (where the proxy's own sockets live).
    pub fn current() -> Result<Netns, NetnsError> {
        Netns::open(Path::new("/proc/self/ns/net"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on this thread while it is inside this namespace, then returns to `home`.
    ///
    /// `f` must not block or yield: the thread is a shared runtime worker.
    pub fn run_in<T>(&self, home: &Netns, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
            path: self.path.clone(),
            source,
        })?;
        let result = f();
        if let Err(err) = setns(home.file.as_fd(), CloneFlags::CLONE_NEWNET) {
            // A worker thread stranded in a pod netns would create the proxy's next sockets
            // in the wrong place: stop rather than risk that.
            tracing::error!(%err, "cannot return to the proxy's network namespace; aborting");
            std::process::abort();
        }
        Ok(result)
    }

    /// A new TCP socket in this namespace, non-blocking, close-on-exec.
    pub fn tcp_socket(&self, home: &Netns, domain: Domain) -> Result<Socket, NetnsError> {
        self.run_in(home, || {
            Socket::new(
                domain,
                Type::STREAM.nonblocking().cloexec(),
                Some(Protocol::TCP),
            )
        })?
        .map_err(|source| NetnsError::Socket {
            path: self.path.clone(),
            source,
        })
    }

    /// The namespace's cookie, the key the eBPF programs see (`bpf_get_netns_cookie`).
    pub fn cookie(&self, home: &Netns) -> Result<u64, NetnsError> {
        let socket = self.tcp_socket(home, Domain::IPV4)?;
        netns_cookie_of(&socket).map_err(|source| NetnsError::Cookie {
            path: self.path.clone(),
            source,
        })
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// `SO_NETNS_COOKIE` (Linux 5.14+), not exported by every libc version.
const SO_NETNS_COOKIE: libc::c_int = 71;

fn netns_cookie_of(socket: &Socket) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: SO_NETNS_COOKIE writes a u64 into the buffer we own, of the length we pass.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(std::io::Error::last_os_error())
    }
}
