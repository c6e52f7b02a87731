//! The proxy process's own resource use, read from /proc (`procfs`) for the metrics.

use procfs::process::Process;
use std::time::{SystemTime, UNIX_EPOCH};

pub(crate) struct ProcessSample {
    pub(crate) resident_bytes: u64,
    pub(crate) virtual_bytes: u64,
    pub(crate) open_fds: u64,
    pub(crate) threads: u64,
    pub(crate) cpu_seconds: f64,
    pub(crate) start_time_seconds: u64,
}

/// The current figures, or None where /proc cannot be read (then there is nothing to report).
pub(crate) fn sample() -> Option<ProcessSample> {
    let process = Process::myself().ok()?;
    let stat = process.stat().ok()?;
    let ticks = procfs::ticks_per_second().max(1);
    // A boot time that cannot be read leaves the start time relative to boot.
    let boot = procfs::boot_time_secs().unwrap_or(0);
    Some(ProcessSample {
        resident_bytes: stat.rss * procfs::page_size(),
        virtual_bytes: stat.vsize,
        open_fds: process.fd_count().map_or(0, |count| count as u64),
        threads: u64::try_from(stat.num_threads).unwrap_or(0),
        cpu_seconds: (stat.utime + stat.stime) as f64 / ticks as f64,
        start_time_seconds: boot + stat.starttime / ticks,
    })
}

/// Seconds since the Unix epoch now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let sample = sample().expect("/proc/self is readable");
        assert!(sample.resident_bytes > 0);
        assert!(sample.virtual_bytes >= sample.resident_bytes);
        assert!(sample.open_fds >= 3, "stdin, stdout, stderr at least");
        assert!(sample.threads >= 1);
        let now = unix_now();
        assert!(
            sample.start_time_seconds <= now && sample.start_time_seconds + 3600 > now,
            "started {} s ago?",
            now.saturating_sub(sample.start_time_seconds)
        );
    }
}
