//! CPU idle states during the benchmark. On a VM an idle vCPU halts, which hands it back to
//! the host; the next wake-up then waits for the host to run it again (counted as steal). A
//! request/response round trip wakes a CPU at every hop, so with halts it measures the host's
//! scheduler more than the path. A CPU latency request of 0 us keeps idle CPUs polling
//! instead, as latency benchmarks on bare metal keep CPUs out of deep C-states (tuned's
//! latency-performance profile does the same). Idle polling is idle time in /proc/stat, so
//! the CPU figures still count only work done.

use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;

/// The kernel's PM QoS CPU latency interface: a request lasts while the file stays open.
const CPU_LATENCY_QOS: &str = "/dev/cpu_dma_latency";

/// While alive (if it holds a request), no CPU enters an idle state slower to leave than
/// 0 us: idle CPUs poll.
pub struct IdlePolicy {
    _request: Option<File>,
    /// For the report: what idle CPUs did during the run, and the machine's idle driver.
    pub description: String,
}

impl IdlePolicy {
    /// Holds idle CPUs in polling unless `allow_halts`; falls back to halts, with a warning,
    /// where the kernel offers no latency request.
    pub fn for_run(allow_halts: bool) -> IdlePolicy {
        let driver = cpuidle_driver();
        if allow_halts {
            return IdlePolicy {
                _request: None,
                description: format!("allowed to halt (--allow-cpu-idle); {driver}"),
            };
        }
        match hold_polling() {
            Ok(request) => IdlePolicy {
                _request: Some(request),
                description: format!(
                    "held in polling for the run (a 0 us CPU latency request on \
                     {CPU_LATENCY_QOS}); {driver}"
                ),
            },
            Err(err) => {
                println!("bench: WARNING: idle CPUs will halt: {err:#}");
                IdlePolicy {
                    _request: None,
                    description: format!("allowed to halt ({err:#}); {driver}"),
                }
            }
        }
    }
}

fn hold_polling() -> Result<File> {
    let mut request = OpenOptions::new()
        .write(true)
        .open(CPU_LATENCY_QOS)
        .with_context(|| format!("opening {CPU_LATENCY_QOS} (needs root)"))?;
    request
        .write_all(&0i32.to_ne_bytes())
        .with_context(|| format!("writing a 0 us request to {CPU_LATENCY_QOS}"))?;
    Ok(request)
}

/// E.g. "cpuidle driver haltpoll, governor haltpoll".
fn cpuidle_driver() -> String {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/sys/devices/system/cpu/cpuidle/{name}"))
            .map_or_else(|_| "none".to_owned(), |value| value.trim().to_owned())
    };
    format!(
        "cpuidle driver {}, governor {}",
        read("current_driver"),
        read("current_governor_ro")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// The effective request, which the kernel reports on a read.
    fn effective_latency_us() -> i32 {
        let mut value = [0u8; 4];
        File::open(CPU_LATENCY_QOS)
            .and_then(|mut file| file.read_exact(&mut value))
            .expect("reading /dev/cpu_dma_latency (the tests run as root)");
        i32::from_ne_bytes(value)
    }

    #[test]
    fn polling_is_held_while_the_policy_lives() {
        let policy = IdlePolicy::for_run(false);
        assert!(policy.description.starts_with("held in polling"));
        assert_eq!(effective_latency_us(), 0);
        drop(policy);
        // Gone with the file (no other process here asks for 0 us).
        assert_ne!(effective_latency_us(), 0);
        let allowed = IdlePolicy::for_run(true);
        assert!(allowed.description.starts_with("allowed to halt"));
        assert_ne!(effective_latency_us(), 0);
    }
}
