//! The daemons' open file descriptors and resident memory, from /proc, and whether they stayed
//! flat over the run.

use anyhow::{Context, Result};
use procfs::process::Process;
use std::fmt;

/// What the end may exceed the start by and still count as flat. The descriptors: a pooled
/// HBONE connection or two (each a socket), which the pool keeps for minutes once opened, and
/// the odd timer or listener in passing. The memory: allocator caches and arenas that a busy
/// minute leaves sized differently, a few hundred KiB either way on this machine.
pub const FD_TOLERANCE: usize = 8;
pub const RSS_TOLERANCE_KIB: u64 = 2048;
/// And the memory may also grow by this fraction of the start (a larger daemon keeps larger
/// caches).
pub const RSS_TOLERANCE_FRACTION: f64 = 0.10;

/// One reading of a daemon.
#[derive(Clone, Copy, Debug)]
pub struct Figures {
    pub pid: u32,
    pub fds: usize,
    pub rss_kib: u64,
    pub threads: u64,
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pid {} fds {} rss {:.1} MiB threads {}",
            self.pid,
            self.fds,
            self.rss_kib as f64 / 1024.0,
            self.threads
        )
    }
}

/// Reads the running daemon of `node`.
pub fn of_node(node: &str) -> Result<Figures> {
    let pid = ztunnel_lab::daemon_pid(node)
        .with_context(|| format!("the daemon of {node} is not running"))?;
    of_pid(pid)
}

pub fn of_pid(pid: u32) -> Result<Figures> {
    let process = i32::try_from(pid)
        .map_err(anyhow::Error::from)
        .and_then(|raw| Ok(Process::new(raw)?))
        .with_context(|| format!("opening /proc/{pid}"))?;
    let fds = process
        .fd_count()
        .with_context(|| format!("counting /proc/{pid}/fd"))?;
    let status = process
        .status()
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    Ok(Figures {
        pid,
        fds,
        rss_kib: status.vmrss.unwrap_or(0),
        threads: status.threads,
    })
}

/// Whether `end` stays within the tolerances of `start`, and the line that says so.
pub fn flat(node: &str, start: &Figures, end: &Figures) -> (bool, String) {
    let fd_growth = end.fds as i64 - start.fds as i64;
    let rss_growth = end.rss_kib as i64 - start.rss_kib as i64;
    let rss_allowed =
        RSS_TOLERANCE_KIB + (start.rss_kib as f64 * RSS_TOLERANCE_FRACTION).round() as u64;
    let fds_flat = end.fds <= start.fds + FD_TOLERANCE;
    let rss_flat = end.rss_kib <= start.rss_kib + rss_allowed;
    let line = format!(
        "{node} (pid {}): fds {} -> {} ({fd_growth:+}, allowed +{FD_TOLERANCE}), rss {} -> {} KiB \
         ({rss_growth:+} KiB, allowed +{rss_allowed} KiB), threads {} -> {}",
        end.pid, start.fds, end.fds, start.rss_kib, end.rss_kib, start.threads, end.threads
    );
    (fds_flat && rss_flat, line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_within_the_tolerances_only() {
        let start = Figures {
            pid: 1,
            fds: 40,
            rss_kib: 20_000,
            threads: 4,
        };
        let grown = |fds, rss_kib| Figures {
            fds,
            rss_kib,
            ..start
        };
        assert!(flat("n", &start, &grown(48, 24_048)).0);
        assert!(!flat("n", &start, &grown(49, 20_000)).0);
        assert!(!flat("n", &start, &grown(40, 24_049)).0);
        assert!(flat("n", &start, &grown(30, 10_000)).0);
    }

    #[test]
    fn reads_this_process() {
        let figures = of_pid(std::process::id()).unwrap();
        assert!(figures.fds >= 3 && figures.rss_kib > 0 && figures.threads >= 1);
    }
}
