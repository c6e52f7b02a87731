//! The rate of new connections: each worker connects, sends one request, reads the reply and
//! the server's close, and starts over, until the time or the count runs out.

use super::REQUEST_BYTES;
use anyhow::{Context, Result, ensure};
use std::io::{Read, Write};
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use ztunnel_lab::traffic::ConnectRateReport;

/// How many failure messages the report keeps.
const FAILURES_KEPT: usize = 5;

#[derive(Default)]
struct Tally {
    /// Connections begun, so that all workers together stop at the count.
    started: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    failures: Mutex<Vec<String>>,
}

pub fn measure(
    to: SocketAddrV4,
    workers: usize,
    duration: Duration,
    max_connections: u64,
    timeout: Duration,
) -> Result<ConnectRateReport> {
    ensure!(workers > 0, "--workers must be at least 1");
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let deadline = started + duration;
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let tally = tally.clone();
            std::thread::spawn(move || {
                while Instant::now() < deadline
                    && tally.started.fetch_add(1, Ordering::Relaxed) < max_connections
                {
                    match one_connection(to, timeout) {
                        Ok(()) => tally.succeeded.fetch_add(1, Ordering::Relaxed),
                        Err(error) => {
                            let mut failures =
                                tally.failures.lock().unwrap_or_else(|p| p.into_inner());
                            if failures.len() < FAILURES_KEPT {
                                failures.push(format!("{error:#}"));
                            }
                            tally.failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
    let seconds = started.elapsed().as_secs_f64();
    let failures = std::mem::take(&mut *tally.failures.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(ConnectRateReport {
        workers,
        succeeded: tally.succeeded.load(Ordering::Relaxed),
        failed: tally.failed.load(Ordering::Relaxed),
        seconds,
        failures,
    })
}

fn one_connection(to: SocketAddrV4, timeout: Duration) -> Result<()> {
    let mut stream = super::connect(to, timeout)?;
    let request = [0xa5u8; REQUEST_BYTES];
    stream.write_all(&request).context("sending the request")?;
    let mut reply = [0u8; REQUEST_BYTES];
    stream.read_exact(&mut reply).context("reading the reply")?;
    // The server closes first; waiting for its FIN keeps TIME_WAIT on its side.
    let mut rest = [0u8; 1];
    let after = stream
        .read(&mut rest)
        .context("waiting for the server's close")?;
    ensure!(after == 0, "the server sent more than the reply");
    Ok(())
}
