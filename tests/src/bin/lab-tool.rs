//! `lab-tool`: the traffic endpoints the tests and the demo run inside lab pods (the
//! benchmark's are in `load-tool`).

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;
use ztunnel_lab::traffic::{self, ServeOptions};

#[derive(Parser)]
#[command(name = "lab-tool", about = "Traffic endpoints for the ztunnel lab")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Accept connections, hash everything received, reply with one JSON report per connection.
    Serve {
        /// TCP port to listen on (all addresses).
        #[arg(long)]
        port: u16,
        /// Exit after the first connection.
        #[arg(long)]
        once: bool,
        /// The listen backlog.
        #[arg(long, default_value_t = ServeOptions::default().backlog)]
        backlog: i32,
        /// Listen this long before accepting anything (an app whose accept queue fills up).
        #[arg(long, default_value_t = 0)]
        accept_after_ms: u64,
        /// Read a PROXY protocol v2 header first and report it (an app behind an application
        /// tunnel).
        #[arg(long)]
        proxy_protocol: bool,
    },
    /// Stream deterministic pseudo-random bytes to a server and check its report.
    Send {
        /// The server, as IP:PORT or [IPV6]:PORT.
        #[arg(long)]
        to: SocketAddr,
        /// How many bytes to send.
        #[arg(long)]
        bytes: u64,
        /// SO_MARK to set on the socket before connecting.
        #[arg(long)]
        mark: Option<u32>,
        /// Bind to this address and port first (with SO_REUSEADDR).
        #[arg(long, value_name = "IP:PORT")]
        bind: Option<SocketAddr>,
        /// Pause this long halfway through, holding the connection open.
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
        /// Bound on connecting and on every read or write.
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
    /// Open many connections at once, then run `send`'s exchange on each concurrently.
    Burst {
        /// The server, as IP:PORT or [IPV6]:PORT.
        #[arg(long)]
        to: SocketAddr,
        /// How many connections to hold open at the same time.
        #[arg(long)]
        connections: usize,
        /// Bytes per connection.
        #[arg(long, default_value_t = 1024)]
        bytes: u64,
        /// Bound on connecting and on every read or write.
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Serve {
            port,
            once,
            backlog,
            accept_after_ms,
            proxy_protocol,
        } => {
            let options = ServeOptions {
                once,
                backlog,
                accept_after: Duration::from_millis(accept_after_ms),
                proxy_protocol,
            };
            traffic::serve(port, options, || {
                // The caller waits for this line before connecting.
                println!("ready");
                let _ = std::io::stdout().flush();
            })
            .context("lab-tool serve")
        }
        Command::Send {
            to,
            bytes,
            mark,
            bind,
            pause_ms,
            timeout_secs,
        } => {
            let options = traffic::SendOptions {
                mark,
                bind,
                pause: Duration::from_millis(pause_ms),
                timeout: Duration::from_secs(timeout_secs),
            };
            let report = traffic::send(to, bytes, options).context("lab-tool send")?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Command::Burst {
            to,
            connections,
            bytes,
            timeout_secs,
        } => {
            anyhow::ensure!(connections > 0, "--connections must be at least 1");
            let report = traffic::burst(to, connections, bytes, Duration::from_secs(timeout_secs));
            println!("{}", serde_json::to_string(&report)?);
            anyhow::ensure!(
                report.succeeded == connections,
                "{} of {connections} connections failed: {:?}",
                connections - report.succeeded,
                report.failures
            );
            Ok(())
        }
    }
}
