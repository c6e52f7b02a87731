//! The traffic endpoints `lab-tool` runs inside pods: a server that hashes what it receives and
//! a client that streams deterministic bytes and checks the server saw exactly those; and the
//! reports `load-tool` (the benchmark's traffic) prints.

use crate::proxy_protocol::{ProxyHeader, read_header};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, connect, listen, setsockopt,
    socket, sockopt,
};
use nix::sys::time::TimeVal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

const CHUNK: usize = 256 * 1024;
/// A server connection that stays silent this long is given up.
pub const SERVER_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum TrafficError {
    #[error("{what}: {cause}")]
    Io { what: String, cause: std::io::Error },
    #[error("the server's reply {reply:?} is not a report: {cause}")]
    BadReply {
        reply: String,
        cause: serde_json::Error,
    },
    #[error(
        "the server received different data: sent {sent_bytes} bytes with sha256 {sent_sha256}, \
         the server got {} bytes with sha256 {}", server.bytes, server.sha256
    )]
    Mismatch {
        sent_bytes: u64,
        sent_sha256: String,
        server: Box<ServerReport>,
    },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TrafficError {
    let what = what.into();
    move |cause| TrafficError::Io { what, cause }
}

/// What the server saw on one connection; sent back to the client as one JSON line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerReport {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub bytes: u64,
    pub sha256: String,
    /// The PROXY header read first, by a server told to expect one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxyHeader>,
}

/// What the client prints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendReport {
    pub sent_bytes: u64,
    pub sent_sha256: String,
    pub local: SocketAddr,
    pub server: ServerReport,
}

/// A xorshift64 stream: the same bytes on every run, cheap enough for gigabytes.
pub struct PseudoRandom(u64);

impl Default for PseudoRandom {
    fn default() -> Self {
        PseudoRandom(0x9E37_79B9_7F4A_7C15)
    }
}

impl PseudoRandom {
    fn next_word(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Fills `buffer`; the stream stays deterministic as long as only the last buffer is not
    /// a multiple of 8 bytes long.
    pub fn fill(&mut self, buffer: &mut [u8]) {
        for chunk in buffer.chunks_mut(8) {
            let word = self.next_word().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// How `serve` goes about it.
#[derive(Clone, Copy, Debug)]
pub struct ServeOptions {
    /// Return after the first connection.
    pub once: bool,
    /// The listen backlog (the accept queue holds one more).
    pub backlog: i32,
    /// How long to listen before accepting the first connection: an app whose accept queue
    /// fills up.
    pub accept_after: Duration,
    /// Read a PROXY protocol v2 header first (an app behind an application tunnel).
    pub proxy_protocol: bool,
}

impl Default for ServeOptions {
    fn default() -> ServeOptions {
        ServeOptions {
            once: false,
            // Deep enough for the tests' bursts of a thousand simultaneous connections.
            backlog: 4096,
            accept_after: Duration::ZERO,
            proxy_protocol: false,
        }
    }
}

/// Listens on 0.0.0.0:`port` and [::]:`port` and reports every connection (to the client and
/// to stdout); `on_ready` runs once the sockets listen.
pub fn serve(
    port: u16,
    options: ServeOptions,
    on_ready: impl FnOnce(),
) -> Result<(), TrafficError> {
    // Two sockets rather than one dual-stack socket, so that an IPv4 client is reported with
    // its IPv4 address, not a v4-mapped IPv6 one.
    let listeners = [
        listen_all(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port, options.backlog)?,
        listen_all(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port, options.backlog)?,
    ];
    on_ready();
    std::thread::sleep(options.accept_after);
    let (accepted, incoming) = std::sync::mpsc::channel();
    for listener in listeners {
        let accepted = accepted.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if accepted.send(stream).is_err() {
                    break;
                }
            }
        });
    }
    drop(accepted);
    for stream in incoming {
        let stream = stream.map_err(io_error("accepting"))?;
        if options.once {
            return answer(stream, options.proxy_protocol);
        }
        std::thread::spawn(move || {
            if let Err(error) = answer(stream, options.proxy_protocol) {
                eprintln!("lab-tool serve: {error}");
            }
        });
    }
    Ok(())
}

fn answer(mut stream: TcpStream, proxy_protocol: bool) -> Result<(), TrafficError> {
    let peer = stream
        .peer_addr()
        .map_err(io_error("reading the peer address"))?;
    let local = stream
        .local_addr()
        .map_err(io_error("reading the local address"))?;
    stream
        .set_read_timeout(Some(SERVER_IDLE_TIMEOUT))
        .map_err(io_error("setting the idle timeout"))?;
    stream
        .set_write_timeout(Some(SERVER_IDLE_TIMEOUT))
        .map_err(io_error("setting the idle timeout"))?;
    let proxy = match proxy_protocol {
        true => Some(read_header(&mut stream).map_err(io_error("reading the PROXY header"))?),
        false => None,
    };
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut buffer = vec![0u8; CHUNK];
    loop {
        let read = stream
            .read(&mut buffer)
            .map_err(io_error(format!("receiving from {peer}")))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        bytes += read as u64;
    }
    let report = ServerReport {
        peer,
        local,
        bytes,
        sha256: hex(&hasher.finalize()),
        proxy,
    };
    let line = serde_json::to_string(&report).unwrap_or_default();
    println!("{line}");
    stream
        .write_all(format!("{line}\n").as_bytes())
        .map_err(io_error(format!("replying to {peer}")))
}

/// How `send` goes about it.
#[derive(Clone, Copy, Debug)]
pub struct SendOptions {
    /// SO_MARK to set on the socket before connecting.
    pub mark: Option<u32>,
    /// The local address and port to bind to (with SO_REUSEADDR) before connecting, as a
    /// client that picks its own port does.
    pub bind: Option<SocketAddr>,
    /// A pause halfway through the bytes, with the connection held open (to have a
    /// connection open across an event, such as a proxy draining).
    pub pause: Duration,
    /// Bound on the connect and on every read or write.
    pub timeout: Duration,
}

/// Connects, streams `bytes` pseudo-random bytes, and checks the server's report against what
/// was sent.
pub fn send(to: SocketAddr, bytes: u64, options: SendOptions) -> Result<SendReport, TrafficError> {
    let stream = connect_with(to, &options)?;
    exchange(stream, to, bytes, options.pause)
}

/// Streams `bytes` pseudo-random bytes (pausing for `pause` halfway), half-closes, and checks
/// the server's report.
fn exchange(
    mut stream: TcpStream,
    to: SocketAddr,
    bytes: u64,
    pause: Duration,
) -> Result<SendReport, TrafficError> {
    let local = stream
        .local_addr()
        .map_err(io_error("reading the local address"))?;
    let mut hasher = Sha256::new();
    let mut generator = PseudoRandom::default();
    let mut buffer = vec![0u8; CHUNK.min(usize::try_from(bytes).unwrap_or(CHUNK)).max(1)];
    let mut remaining = bytes;
    let mut paused = pause.is_zero();
    while remaining > 0 {
        if !paused && remaining <= bytes / 2 {
            std::thread::sleep(pause);
            paused = true;
        }
        let size = usize::try_from(remaining).map_or(buffer.len(), |left| left.min(buffer.len()));
        let chunk = &mut buffer[..size];
        generator.fill(chunk);
        hasher.update(&*chunk);
        stream
            .write_all(chunk)
            .map_err(io_error(format!("sending to {to}")))?;
        remaining -= size as u64;
    }
    stream
        .shutdown(Shutdown::Write)
        .map_err(io_error("closing the sending side"))?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(io_error(format!("reading the report of {to}")))?;
    let server: ServerReport =
        serde_json::from_str(reply.trim()).map_err(|cause| TrafficError::BadReply {
            reply: reply.trim().to_owned(),
            cause,
        })?;
    let sent_sha256 = hex(&hasher.finalize());
    if server.bytes != bytes || server.sha256 != sent_sha256 {
        return Err(TrafficError::Mismatch {
            sent_bytes: bytes,
            sent_sha256,
            server: Box::new(server),
        });
    }
    Ok(SendReport {
        sent_bytes: bytes,
        sent_sha256,
        local,
        server,
    })
}

/// The socket family of `address`.
fn family(address: &SocketAddr) -> AddressFamily {
    match address {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    }
}

/// Listens on the wildcard `ip`:`port` with SO_REUSEADDR (a restarted server rebinds at once);
/// an IPv6 socket takes IPv6 only.
fn listen_all(ip: IpAddr, port: u16, backlog: i32) -> Result<TcpListener, TrafficError> {
    let address = SocketAddr::new(ip, port);
    let what = format!("listening on {address}");
    let nix_error = |cause: nix::errno::Errno| TrafficError::Io {
        what: what.clone(),
        cause: cause.into(),
    };
    let fd = socket(
        family(&address),
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(nix_error)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(nix_error)?;
    if address.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(nix_error)?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(address)).map_err(nix_error)?;
    listen(&fd, Backlog::new(backlog).map_err(nix_error)?).map_err(nix_error)?;
    Ok(TcpListener::from(fd))
}

/// std cannot set a socket option between socket() and connect(), so the socket is made here.
fn connect_with(to: SocketAddr, options: &SendOptions) -> Result<TcpStream, TrafficError> {
    let (mark, timeout) = (options.mark, options.timeout);
    let nix_error = |what: &str| {
        let what = what.to_owned();
        move |errno: nix::errno::Errno| TrafficError::Io {
            what,
            cause: errno.into(),
        }
    };
    let fd = socket(family(&to), SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(nix_error("creating a socket"))?;
    if let Some(mark) = mark {
        setsockopt(&fd, sockopt::Mark, &mark).map_err(nix_error("setting SO_MARK"))?;
    }
    if let Some(local) = options.bind {
        setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(nix_error("setting SO_REUSEADDR"))?;
        bind(fd.as_raw_fd(), &SockaddrStorage::from(local))
            .map_err(nix_error(&format!("binding {local}")))?;
    }
    // Linux bounds a blocking connect() by the send timeout.
    let limit = TimeVal::new(
        i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        i64::from(timeout.subsec_micros()),
    );
    setsockopt(&fd, sockopt::SendTimeout, &limit).map_err(nix_error("setting the timeout"))?;
    setsockopt(&fd, sockopt::ReceiveTimeout, &limit).map_err(nix_error("setting the timeout"))?;
    connect(fd.as_raw_fd(), &SockaddrStorage::from(to))
        .map_err(nix_error(&format!("connecting to {to}")))?;
    Ok(TcpStream::from(fd))
}

/// The outcome of `burst`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BurstReport {
    pub connections: usize,
    pub succeeded: usize,
    /// The first few failures, for the error message.
    pub failures: Vec<String>,
}

/// Opens `connections` connections to `to` at once (all are connected before any sends), then
/// runs `send`'s exchange of `bytes` on each, concurrently.
pub fn burst(to: SocketAddr, connections: usize, bytes: u64, timeout: Duration) -> BurstReport {
    let all_connected = std::sync::Arc::new(std::sync::Barrier::new(connections));
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            let all_connected = all_connected.clone();
            std::thread::spawn(move || {
                let options = SendOptions {
                    mark: None,
                    bind: None,
                    pause: Duration::ZERO,
                    timeout,
                };
                let stream = connect_with(to, &options);
                all_connected.wait();
                exchange(stream?, to, bytes, Duration::ZERO).map(|_| ())
            })
        })
        .collect();
    let mut report = BurstReport {
        connections,
        succeeded: 0,
        failures: Vec::new(),
    };
    for worker in workers {
        match worker.join() {
            Ok(Ok(())) => report.succeeded += 1,
            Ok(Err(error)) if report.failures.len() < 5 => report.failures.push(error.to_string()),
            Ok(Err(_)) => {}
            Err(_) => report.failures.push("a worker thread panicked".into()),
        }
    }
    report
}

/// `load-tool rr`: request/response latency on one warm connection, from an HDR histogram.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LatencyReport {
    pub round_trips: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// `load-tool connect-rate`: new connections, one small request each, by several workers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnectRateReport {
    pub workers: usize,
    /// Connections that completed connect, request, reply and close.
    pub succeeded: u64,
    pub failed: u64,
    pub seconds: f64,
    /// The first few failures, for the error message.
    pub failures: Vec<String>,
}

impl ConnectRateReport {
    pub fn per_second(&self) -> f64 {
        self.succeeded as f64 / self.seconds.max(f64::MIN_POSITIVE)
    }
}

/// `load-tool hold`: printed once every connection is open and has carried one round trip
/// (silent: once each was tried).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HoldReport {
    pub connections: usize,
    /// Silent connections that did not open.
    pub failed: usize,
    pub seconds_to_open: f64,
}
