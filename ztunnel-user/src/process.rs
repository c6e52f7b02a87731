//! The proxy process's own resource use, read from /proc for the metrics.

use std::time::{SystemTime, UNIX_EPOCH};

pub struct ProcessSample {
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    pub threads: u64,
    pub cpu_seconds: f64,
    pub start_time_seconds: u64,
}

/// The current figures, or None where /proc cannot be read (then there is nothing to report).
pub fn sample() -> Option<ProcessSample> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name is in parentheses and may hold spaces: fields start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // Field numbers as proc(5) counts them, minus the two before the command name's end.
    let field = |number: usize| fields.get(number - 3)?.parse::<u64>().ok();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    let cpu_ticks = field(14)? + field(15)?;
    let started_ticks = field(22)?;
    let boot = boot_time().unwrap_or(0);
    let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count() as u64);
    Some(ProcessSample {
        resident_bytes: field(24)? * page,
        virtual_bytes: field(23)?,
        open_fds,
        threads: field(20)?,
        cpu_seconds: cpu_ticks as f64 / ticks as f64,
        start_time_seconds: boot + started_ticks / ticks,
    })
}

/// System boot time (Unix seconds), the base of a process's start time.
fn boot_time() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse().ok())
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
