//! Whole-machine CPU time from /proc/stat. Both lab nodes, their proxies and the load tools
//! share this machine, so the machine's total is what a path costs; kernel time counts, since
//! eBPF programs, TCP and the veths run there. The hypervisor's steal is kept apart: it is the
//! host's noise, not work done here, and it slows whatever measurement it falls on.

use anyhow::{Context, Result};
use procfs::{CurrentSI, KernelStats};

/// The machine's CPU time over one measurement.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuTime {
    /// Busy CPU seconds (user + nice + system + irq + softirq), all CPUs.
    pub busy_seconds: f64,
    /// Steal as a share of all the CPUs' time, in percent: time the host ran something else
    /// while this VM's vCPUs had work.
    pub steal_percent: f64,
}

/// The machine's CPU time while `work` runs, with what it returned.
pub fn during<T>(work: impl FnOnce() -> Result<T>) -> Result<(T, CpuTime)> {
    let before = ticks()?;
    let outcome = work()?;
    let after = ticks()?;
    Ok((outcome, after.since(before)))
}

/// Cumulative clock ticks of the `cpu` line (all CPUs).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Ticks {
    busy: u64,
    steal: u64,
    /// user through steal; guest time is already inside user.
    total: u64,
}

impl Ticks {
    fn since(self, before: Ticks) -> CpuTime {
        let total = self.total.saturating_sub(before.total);
        let steal = self.steal.saturating_sub(before.steal);
        CpuTime {
            busy_seconds: self.busy.saturating_sub(before.busy) as f64 / ticks_per_second(),
            steal_percent: if total == 0 {
                0.0
            } else {
                100.0 * steal as f64 / total as f64
            },
        }
    }
}

fn ticks() -> Result<Ticks> {
    let stats = KernelStats::current().context("reading /proc/stat")?;
    Ticks::of(&stats.total).context("/proc/stat's `cpu` line has no steal field")
}

impl Ticks {
    /// From the kernel's counters; None for a kernel too old to count steal (before 2.6.11),
    /// which is not one this benchmark reads.
    fn of(cpu: &procfs::CpuTime) -> Option<Ticks> {
        let (iowait, irq, softirq, steal) = (cpu.iowait?, cpu.irq?, cpu.softirq?, cpu.steal?);
        let busy = cpu.user + cpu.nice + cpu.system + irq + softirq;
        Some(Ticks {
            busy,
            steal,
            total: busy + cpu.idle + iowait + steal,
        })
    }
}

fn ticks_per_second() -> f64 {
    match procfs::ticks_per_second() {
        0 => 100.0,
        ticks => ticks as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use procfs::FromBufReadSI;

    /// The `cpu` line's ticks, through procfs's parser of the whole file.
    fn parse_ticks(stat: &str) -> Option<Ticks> {
        let system = procfs::ExplicitSystemInfo {
            boot_time_secs: 1_700_000_000,
            ticks_per_second: 100,
            page_size: 4096,
            is_little_endian: true,
        };
        let stats = KernelStats::from_buf_read(stat.as_bytes(), &system).ok()?;
        Ticks::of(&stats.total)
    }

    #[test]
    fn busy_is_user_nice_system_irq_softirq_and_steal_is_apart() {
        let rest = "intr 1 2 3\nctxt 4000\nbtime 1700000000\nprocesses 900\n\
                    procs_running 2\nprocs_blocked 0\nsoftirq 5 6 7\n";
        let stat =
            format!("cpu  100 5 40 9000 7 3 2 43 11 0\ncpu0 50 2 20 4500 3 1 1 20 5 0\n{rest}");
        let ticks = parse_ticks(&stat);
        assert_eq!(
            ticks,
            Some(Ticks {
                busy: 150,
                steal: 43,
                total: 9200
            })
        );
        // No `cpu` line: not /proc/stat.
        assert_eq!(parse_ticks(rest), None);
        // A kernel without a steal field is not one this benchmark reads.
        assert_eq!(
            parse_ticks(&format!("cpu  100 5 40 9000 7 3 2\n{rest}")),
            None
        );
    }

    #[test]
    fn this_kernel_counts_steal() {
        assert!(ticks().is_ok_and(|ticks| ticks.total > 0));
    }

    #[test]
    fn steal_is_a_share_of_the_interval() {
        let before = Ticks {
            busy: 1000,
            steal: 100,
            total: 5000,
        };
        let after = Ticks {
            busy: 1300,
            steal: 150,
            total: 5500,
        };
        let time = after.since(before);
        assert_eq!(time.steal_percent, 10.0);
        assert_eq!(time.busy_seconds, 300.0 / ticks_per_second());
        assert_eq!(before.since(before).steal_percent, 0.0);
    }
}
