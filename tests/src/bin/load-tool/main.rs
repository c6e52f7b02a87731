//! `load-tool`: the benchmark's traffic inside lab pods. A server (echo, and reply-then-close),
//! a plain relay (the reference path) and three clients: request/response latency on one warm
//! connection, the rate of new connections, and many idle connections held open. Every client
//! is bounded in time and in count, and prints one JSON report line.
//!
//! The clients use blocking sockets, so nothing but the kernel and the path under test sits
//! between a socket call and the clock; the server is asynchronous, since it must hold ten
//! thousand connections at once.

mod connect_rate;
mod hold;
mod latency;
mod relay;
mod server;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use std::io::Write;
use std::net::SocketAddrV4;
use std::time::Duration;

/// Size of every request and reply.
const REQUEST_BYTES: usize = 64;

#[derive(Parser)]
#[command(name = "load-tool", about = "Benchmark traffic for the ztunnel lab")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve both protocols the clients speak; prints `ready` once listening.
    Serve {
        /// Port that echoes everything back until the client closes (rr, hold).
        #[arg(long)]
        echo_port: u16,
        /// Port that reads one request, sends it back and closes first (connect-rate), so
        /// TIME_WAIT stays on the server and the client never runs out of ports.
        #[arg(long)]
        reply_port: u16,
    },
    /// Relay connections, copied both ways by tokio with no TLS: the reference the mesh is held
    /// against. Prints `ready` once listening.
    Relay {
        /// LISTEN=TO, both IP:PORT; repeat for more ports.
        #[arg(long = "forward", required = true)]
        forwards: Vec<relay::Forward>,
    },
    /// Round trips of one request on one warm connection to an echo port; latency percentiles.
    Rr {
        /// The echo port, as IP:PORT.
        #[arg(long)]
        to: SocketAddrV4,
        /// How long to measure (after the warm-up).
        #[arg(long, default_value_t = 5)]
        duration_secs: u64,
        /// Stop after this many round trips even if time remains.
        #[arg(long, default_value_t = 10_000_000)]
        max_round_trips: u64,
        /// Bound on connecting and on every read or write.
        #[arg(long, default_value_t = 10)]
        timeout_secs: u64,
    },
    /// New connections, each carrying one request and its reply, from several workers.
    ConnectRate {
        /// The reply port, as IP:PORT.
        #[arg(long)]
        to: SocketAddrV4,
        /// Concurrent workers, each one connection at a time.
        #[arg(long, default_value_t = 8)]
        workers: usize,
        /// How long to measure.
        #[arg(long, default_value_t = 5)]
        duration_secs: u64,
        /// Stop after this many connections even if time remains.
        #[arg(long, default_value_t = 1_000_000)]
        max_connections: u64,
        /// Bound on connecting and on every read or write.
        #[arg(long, default_value_t = 10)]
        timeout_secs: u64,
    },
    /// Open connections to an echo port (one round trip each, so each is proxied end to end,
    /// unless --silent), report, then hold them idle until stdin closes or --hold-secs pass.
    Hold {
        /// The echo port, as IP:PORT.
        #[arg(long)]
        to: SocketAddrV4,
        /// How many connections to hold open at the same time.
        #[arg(long)]
        connections: usize,
        /// The longest the connections are held after the report.
        #[arg(long, default_value_t = 120)]
        hold_secs: u64,
        /// Bound on opening all the connections, and on each connect, read and write.
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
        /// Send nothing, as a hostile client: each connection is only opened (within a
        /// second), and one that fails to open is counted instead of failing the run.
        #[arg(long)]
        silent: bool,
    },
}

fn main() -> Result<()> {
    raise_open_files_limit()?;
    let report = match Cli::parse().command {
        Command::Serve {
            echo_port,
            reply_port,
        } => return server::serve(echo_port, reply_port),
        Command::Relay { forwards } => return relay::relay(forwards),
        Command::Rr {
            to,
            duration_secs,
            max_round_trips,
            timeout_secs,
        } => serde_json::to_string(&latency::measure(
            to,
            Duration::from_secs(duration_secs),
            max_round_trips,
            Duration::from_secs(timeout_secs),
        )?)?,
        Command::ConnectRate {
            to,
            workers,
            duration_secs,
            max_connections,
            timeout_secs,
        } => serde_json::to_string(&connect_rate::measure(
            to,
            workers,
            Duration::from_secs(duration_secs),
            max_connections,
            Duration::from_secs(timeout_secs),
        )?)?,
        Command::Hold {
            to,
            connections,
            hold_secs,
            timeout_secs,
            silent,
        } => {
            return hold::hold(
                to,
                connections,
                Duration::from_secs(hold_secs),
                Duration::from_secs(timeout_secs),
                silent,
            );
        }
    };
    println!("{report}");
    Ok(())
}

/// Prints one line and flushes it at once: the driver waits for it.
fn announce(line: &str) {
    println!("{line}");
    let _ = std::io::stdout().flush();
}

/// Thousands of connections need as many file descriptors; the hard limit is what we may use.
fn raise_open_files_limit() -> Result<()> {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("reading RLIMIT_NOFILE")?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("raising RLIMIT_NOFILE")
}

/// A blocking connection with every operation bounded by `timeout`, and no Nagle delay.
fn connect(to: SocketAddrV4, timeout: Duration) -> Result<std::net::TcpStream> {
    let stream = std::net::TcpStream::connect_timeout(&to.into(), timeout)
        .with_context(|| format!("connecting to {to}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}
