//! Network namespaces: opening a pod's, and creating sockets inside it.
//!
//! A socket belongs to the netns of the thread that created it, for its whole life. So the
//! proxy moves the calling thread into the pod netns just for the `socket()` call and moves it
//! straight back; binding, connecting and all I/O then happen from any thread.

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

/// The namespace the daemon runs in, where every thread returns after a visit to a pod's.
static HOME: LazyLock<Result<Netns, Arc<NetnsError>>> =
    LazyLock::new(|| Netns::open(Path::new("/proc/self/ns/net")).map_err(Arc::new));

#[derive(Debug, thiserror::Error)]
pub(crate) enum NetnsError {
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
    #[error("the daemon's own network namespace: {0}")]
    Home(Arc<NetnsError>),
    #[error("reading the cookie of network namespace {path}: {source}")]
    Cookie {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An open network namespace.
#[derive(Debug)]
pub(crate) struct Netns {
    path: PathBuf,
    file: File,
}

impl Netns {
    pub(crate) fn open(path: &Path) -> Result<Netns, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?;
        Ok(Netns {
            path: path.to_owned(),
            file,
        })
    }

    /// The namespace the daemon runs in (where the proxy's own sockets live). Read once, at
    /// the first call: the daemon asks at start, before any thread visits a pod's namespace.
    pub(crate) fn home() -> Result<&'static Netns, NetnsError> {
        HOME.as_ref().map_err(|err| NetnsError::Home(err.clone()))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on this thread while it is inside this namespace, then returns home.
    ///
    /// `f` must not block or yield: the thread is a shared runtime worker.
    pub(crate) fn run_in<T>(&self, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        let home = Netns::home()?;
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
    pub(crate) fn tcp_socket(&self, domain: Domain) -> Result<Socket, NetnsError> {
        self.run_in(|| {
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
    pub(crate) fn cookie(&self) -> Result<u64, NetnsError> {
        let socket = self.tcp_socket(Domain::IPV4)?;
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

/// The socket domain of an address's family.
pub(crate) fn domain_of(ip: IpAddr) -> Domain {
    if ip.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    }
}

/// The unspecified (wildcard) address of `like`'s family.
pub(crate) fn unspecified(like: IpAddr) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

/// `SO_NETNS_COOKIE` (Linux 5.14+).
fn netns_cookie_of(socket: &Socket) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: SO_NETNS_COOKIE writes a u64 into the buffer we own, of the length we pass.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
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
