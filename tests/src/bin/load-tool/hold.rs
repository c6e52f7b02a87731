//! Many idle connections held open: for the proxies' memory per connection, or, silent, as a
//! hostile client's flood.

use anyhow::{Context, Result, bail};
use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};
use ztunnel_lab::traffic::HoldReport;

/// How long a silent connection may take to open: a server that stopped accepting is not
/// waited for.
const SILENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

pub fn hold(
    to: SocketAddrV4,
    connections: usize,
    hold: Duration,
    timeout: Duration,
    silent: bool,
) -> Result<()> {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut open: Vec<TcpStream> = Vec::with_capacity(connections);
    let mut failed = 0;
    while open.len() + failed < connections {
        if Instant::now() >= deadline {
            bail!(
                "opened only {} of {connections} connections within {timeout:?}",
                open.len()
            );
        }
        if silent {
            match TcpStream::connect_timeout(&to.into(), SILENT_CONNECT_TIMEOUT) {
                Ok(stream) => open.push(stream),
                Err(_) => failed += 1,
            }
            continue;
        }
        let mut stream = super::connect(to, timeout)
            .with_context(|| format!("connection {} of {connections}", open.len() + 1))?;
        // One round trip: the connection is proxied all the way to the server, not just
        // accepted by a listener.
        let mut byte = [0x42u8];
        stream.write_all(&byte).context("sending one byte")?;
        stream.read_exact(&mut byte).context("reading the echo")?;
        open.push(stream);
    }
    let report = HoldReport {
        connections: open.len(),
        failed,
        seconds_to_open: started.elapsed().as_secs_f64(),
    };
    super::announce(&serde_json::to_string(&report)?);
    // Held until the driver closes our stdin (or goes away), or `hold` passes.
    let (closed_tx, closed) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        let _ = closed_tx.send(());
    });
    let _ = closed.recv_timeout(hold);
    drop(open);
    Ok(())
}
