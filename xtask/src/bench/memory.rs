//! The node proxies' memory: resident set size idle, and with many idle proxied connections
//! held open, from /proc/<pid>/status of each node's daemon.

use super::path::Route;
use super::results::Daemon;
use anyhow::{Context, Result};
use procfs::process::{Process, Status};
use std::net::SocketAddrV4;
use std::time::Duration;
use ztunnel_lab::{HeldConnections, Lab, Opening};

/// Time for the daemons to finish what they were doing (enrollment, connection set-up)
/// before their RSS is read.
const SETTLE: Duration = Duration::from_secs(2);
/// The longest the connections stay open if we never let go of them.
const HOLD_LIMIT: Duration = Duration::from_secs(120);

pub struct DaemonMemory {
    pub pid: u32,
    /// The binary it runs (which build's).
    pub exe: std::path::PathBuf,
    pub idle_mib: f64,
    /// Of the idle RSS: heap and stacks, and pages of mapped files (the binary itself).
    pub idle_anon_mib: f64,
    pub idle_file_mib: f64,
    pub held_mib: f64,
    pub bytes_per_connection: f64,
    /// Once the connections are closed again: what the daemon keeps.
    pub closed_mib: f64,
}

pub struct Memory {
    pub seconds_to_open: f64,
    source: DaemonMemory,
    destination: DaemonMemory,
}

impl Memory {
    pub fn of(&self, daemon: Daemon) -> &DaemonMemory {
        match daemon {
            Daemon::Source => &self.source,
            Daemon::Destination => &self.destination,
        }
    }
}

/// Reads both daemons' RSS idle, opens `connections` connections from the route's client to
/// the echo server at `to` (each carrying one round trip, so it is proxied end to end), reads
/// the RSS again while they are held, closes them and reads it once more.
pub fn measure(lab: &Lab, route: Route, to: SocketAddrV4, connections: usize) -> Result<Memory> {
    let pid_of = |pod: &str| -> Result<u32> {
        let node = &lab.pod(pod)?.node;
        lab.node(node)?
            .daemon_pid
            .with_context(|| format!("the lab records no daemon on {node}"))
    };
    let pids = [pid_of(route.client())?, pid_of(route.server())?];
    let exes = [exe(pids[0])?, exe(pids[1])?];
    std::thread::sleep(SETTLE);
    let idle = [rss(pids[0])?, rss(pids[1])?];
    // Opening runs at well over 1,000 connections a second; allow a tenth of that.
    let open_within = Duration::from_secs(30) + Duration::from_millis(10) * connections as u32;
    let held = HeldConnections::open(
        route.client(),
        to,
        connections,
        Opening::RoundTrip,
        HOLD_LIMIT,
        open_within,
    )?;
    std::thread::sleep(SETTLE);
    let with = [rss(pids[0])?, rss(pids[1])?];
    let seconds_to_open = held.report.seconds_to_open;
    drop(held);
    std::thread::sleep(SETTLE);
    let closed = [rss(pids[0])?, rss(pids[1])?];
    let daemon = |i: usize| DaemonMemory {
        pid: pids[i],
        exe: exes[i].clone(),
        idle_mib: idle[i].total as f64 / MIB,
        idle_anon_mib: idle[i].anon as f64 / MIB,
        idle_file_mib: idle[i].file as f64 / MIB,
        held_mib: with[i].total as f64 / MIB,
        bytes_per_connection: (with[i].total as f64 - idle[i].total as f64) / connections as f64,
        closed_mib: closed[i].total as f64 / MIB,
    };
    Ok(Memory {
        seconds_to_open,
        source: daemon(0),
        destination: daemon(1),
    })
}

const MIB: f64 = 1024.0 * 1024.0;

/// Resident memory of a process, in bytes.
struct Rss {
    total: u64,
    anon: u64,
    file: u64,
}

/// The binary a process runs, from /proc/<pid>/exe.
fn exe(pid: u32) -> Result<std::path::PathBuf> {
    i32::try_from(pid)
        .map_err(anyhow::Error::from)
        .and_then(|pid| Ok(Process::new(pid)?.exe()?))
        .with_context(|| format!("reading /proc/{pid}/exe"))
}

fn rss(pid: u32) -> Result<Rss> {
    let status = i32::try_from(pid)
        .map_err(anyhow::Error::from)
        .and_then(|pid| Ok(Process::new(pid)?.status()?))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    Rss::of(&status).with_context(|| format!("no VmRSS, RssAnon and RssFile in /proc/{pid}/status"))
}

impl Rss {
    fn of(status: &Status) -> Option<Rss> {
        // procfs gives them in KiB, as the file does.
        Some(Rss {
            total: status.vmrss? * 1024,
            anon: status.rssanon? * 1024,
            file: status.rssfile? * 1024,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use procfs::FromBufRead;

    /// A daemon's /proc/<pid>/status, with `memory` for its memory lines.
    fn status(memory: &str) -> Option<Status> {
        let text = format!(
            "Name:\tztunnel\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\nNgid:\t0\n\
             Pid:\t4242\nPPid:\t1\nTracerPid:\t0\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n\
             FDSize:\t64\nGroups:\t \nVmPeak:\t  900000 kB\n{memory}Threads:\t3\n\
             SigQ:\t0/96367\nSigPnd:\t0000000000000000\nShdPnd:\t0000000000000000\n\
             SigBlk:\t0000000000000000\nSigIgn:\t0000000000001000\n\
             SigCgt:\t0000000100004440\nCapInh:\t0000000000000000\n\
             CapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\n\
             CapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n\
             voluntary_ctxt_switches:\t10\nnonvoluntary_ctxt_switches:\t2\n"
        );
        Status::from_buf_read(text.as_bytes()).ok()
    }

    #[test]
    fn reads_the_rss_fields_in_bytes() {
        let memory = "VmRSS:\t   12288 kB\nRssAnon:\t    8192 kB\nRssFile:\t    4096 kB\n\
                      RssShmem:\t       0 kB\n";
        let rss = Rss::of(&status(memory).unwrap()).unwrap();
        assert_eq!(
            (rss.total, rss.anon, rss.file),
            (12 << 20, 8 << 20, 4 << 20)
        );
        assert!(Rss::of(&status("VmRSS:\t 1 kB\n").unwrap()).is_none());
    }

    #[test]
    fn reads_a_live_process() {
        let rss = rss(std::process::id()).unwrap();
        assert!(rss.total > 0 && rss.total >= rss.anon && rss.total >= rss.file);
    }
}
