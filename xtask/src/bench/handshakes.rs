//! Handshakes that had to be retried, from the TCP counters of a pod's netns. A connect whose
//! SYN goes unanswered waits for its retransmission (a second for the first one), so a few of
//! them set a connection rate back more than all the work measured: the report names them
//! where a rate alone would hide why it is low (docs/PERFORMANCE.md, iptables capture).
//!
//! Parsed here rather than by `procfs` (which reads the rest of /proc for the benchmark):
//! procfs 0.18 parses /proc/net/snmp's groups, but not /proc/net/netstat's `TcpExt`.

use anyhow::{Context, Result};

/// `TcpExt: TCPSynRetrans` of `pod`'s netns: SYNs its sockets sent again.
pub fn syn_retransmissions(pod: &str) -> Result<u64> {
    let output = ztunnel_lab::run(&mut ztunnel_lab::exec(pod, &["cat", "/proc/net/netstat"])?)?;
    counter(
        &String::from_utf8_lossy(&output.stdout),
        "TcpExt",
        "TCPSynRetrans",
    )
    .with_context(|| format!("{pod}'s /proc/net/netstat has no TcpExt TCPSynRetrans"))
}

/// One counter of /proc/net/netstat (or /proc/net/snmp): each group is a line of names and a
/// line of values, both starting with `<group>:`.
fn counter(netstat: &str, group: &str, name: &str) -> Option<u64> {
    let prefix = format!("{group}:");
    let mut lines = netstat.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        let (Some(names), Some(values)) =
            (names.strip_prefix(&prefix), values.strip_prefix(&prefix))
        else {
            continue;
        };
        return names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(field, _)| *field == name)
            .and_then(|(_, value)| value.parse().ok());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_named_counter_of_the_named_group() {
        let netstat = "TcpExt: SyncookiesSent TCPSynRetrans TW\n\
                       TcpExt: 4 383 28330\n\
                       IpExt: InNoRoutes TCPSynRetrans\n\
                       IpExt: 0 7\n";
        assert_eq!(counter(netstat, "TcpExt", "TCPSynRetrans"), Some(383));
        assert_eq!(counter(netstat, "TcpExt", "TW"), Some(28330));
        assert_eq!(counter(netstat, "IpExt", "TCPSynRetrans"), Some(7));
        assert_eq!(counter(netstat, "TcpExt", "Missing"), None);
        assert_eq!(counter(netstat, "MPTcpExt", "TCPSynRetrans"), None);
    }

    #[test]
    fn this_kernel_counts_syn_retransmissions() {
        let netstat = std::fs::read_to_string("/proc/net/netstat").unwrap();
        assert!(counter(&netstat, "TcpExt", "TCPSynRetrans").is_some());
    }
}
