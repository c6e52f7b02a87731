//! Whole-machine CPU time from /proc/stat. Both lab nodes, their proxies and the load tools
//! share this machine, so the machine's total is what a path costs; kernel time counts, since
//! eBPF programs, TCP and the veths run there.

use anyhow::{Context, Result};

/// Busy CPU seconds of the whole machine while `work` runs, with what it returned.
pub fn busy_seconds_during<T>(work: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let before = busy_ticks()?;
    let outcome = work()?;
    let after = busy_ticks()?;
    Ok((
        outcome,
        after.saturating_sub(before) as f64 / ticks_per_second(),
    ))
}

/// user + nice + system + irq + softirq of the `cpu` line (all CPUs), in clock ticks. Idle,
/// iowait and steal are not work done here; guest time is already inside user.
fn busy_ticks() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    parse_busy_ticks(&stat).context("no `cpu` line in /proc/stat")
}

fn parse_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|field| field.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq ...
    let [user, nice, system, _idle, _iowait, irq, softirq, ..] = fields[..] else {
        return None;
    };
    Some(user + nice + system + irq + softirq)
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

#[cfg(test)]
mod tests {
    use super::parse_busy_ticks;

    #[test]
    fn busy_is_user_nice_system_irq_softirq() {
        let stat = "cpu  100 5 40 9000 7 3 2 1 0 0\ncpu0 50 2 20 4500 3 1 1 0 0 0\n";
        assert_eq!(parse_busy_ticks(stat), Some(150));
        assert_eq!(parse_busy_ticks("intr 1 2 3\n"), None);
    }
}
