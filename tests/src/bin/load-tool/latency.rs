//! Request/response latency on one warm connection, recorded in an HDR histogram.

use super::REQUEST_BYTES;
use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};
use ztunnel_lab::traffic::LatencyReport;

/// Round trips before measuring: the connection, the proxies' buffers and the caches warm up.
const WARM_UP_ROUND_TRIPS: u32 = 1000;

pub fn measure(
    to: SocketAddrV4,
    duration: Duration,
    max_round_trips: u64,
    timeout: Duration,
) -> Result<LatencyReport> {
    let mut stream = super::connect(to, timeout)?;
    let request = [0x5au8; REQUEST_BYTES];
    let mut reply = [0u8; REQUEST_BYTES];
    let mut round_trip = |stream: &mut TcpStream| -> Result<Duration> {
        let started = Instant::now();
        stream.write_all(&request).context("sending a request")?;
        stream.read_exact(&mut reply).context("reading a reply")?;
        Ok(started.elapsed())
    };
    for _ in 0..WARM_UP_ROUND_TRIPS {
        round_trip(&mut stream)?;
    }
    // Nanoseconds, from 1 ns to the timeout, at 3 significant digits (0.1% resolution).
    let highest = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX).max(2);
    let mut histogram = Histogram::<u64>::new_with_bounds(1, highest, 3)?;
    let deadline = Instant::now() + duration;
    while histogram.len() < max_round_trips && Instant::now() < deadline {
        let nanos = u64::try_from(round_trip(&mut stream)?.as_nanos()).unwrap_or(u64::MAX);
        histogram.saturating_record(nanos);
    }
    let micros = |nanos: u64| nanos as f64 / 1e3;
    Ok(LatencyReport {
        round_trips: histogram.len(),
        p50_us: micros(histogram.value_at_quantile(0.50)),
        p99_us: micros(histogram.value_at_quantile(0.99)),
        p999_us: micros(histogram.value_at_quantile(0.999)),
        max_us: micros(histogram.max()),
    })
}
