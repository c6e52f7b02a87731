//! Capture by iptables instead of eBPF (`ztunnel run --capture iptables`): NAT REDIRECT rules
//! inside the pod's netns, the way sidecar meshes and Istio's first ambient releases capture.
//! It exists as the baseline the benchmark measures eBPF capture against; the proxy behind it
//! is the same. Outbound TCP is redirected to the 15001 listener and inbound TCP (but HBONE on
//! 15008) to 15006; the original destination comes from conntrack (`SO_ORIGINAL_DST`).
//!
//! Only the pod's netns is touched, in chains of our own (`ZTUNNEL_*`), so removing them
//! leaves the pod as it was.

use crate::host::netns::Netns;
use socket2::SockRef;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use tokio::net::TcpStream;
use ztunnel_common::ports;

const OUTPUT_CHAIN: &str = "ZTUNNEL_OUTPUT";
const PREROUTING_CHAIN: &str = "ZTUNNEL_PREROUTING";

#[derive(Debug, thiserror::Error)]
pub(crate) enum IptablesError {
    #[error("running {tool} in {netns}: {source} (is the iptables package installed?)")]
    Spawn {
        tool: &'static str,
        netns: String,
        source: io::Error,
    },
    #[error("{tool} in {netns} failed ({status}): {stderr}")]
    Failed {
        tool: &'static str,
        netns: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// What the rules let through uncaptured.
#[derive(Clone, Debug, Default)]
pub(crate) struct Exclusions {
    /// The proxy's own sockets and its deliveries carry these marks.
    pub(crate) marks: Vec<u32>,
    pub(crate) outbound_ports: Vec<u16>,
    pub(crate) inbound_ports: Vec<u16>,
    pub(crate) cidrs: Vec<ipnet::IpNet>,
}

/// The `iptables-restore` input for a pod with `ips`, for one address family.
fn rules(ips: &[IpAddr], exclusions: &Exclusions, v6: bool) -> String {
    let mut out = format!(
        "*nat\n:{OUTPUT_CHAIN} - [0:0]\n:{PREROUTING_CHAIN} - [0:0]\n\
         -A OUTPUT -p tcp -j {OUTPUT_CHAIN}\n-A PREROUTING -p tcp -j {PREROUTING_CHAIN}\n"
    );
    let mut rule = |chain: &str, text: String| out.push_str(&format!("-A {chain} {text}\n"));
    for mark in &exclusions.marks {
        rule(OUTPUT_CHAIN, format!("-m mark --mark {mark:#x} -j RETURN"));
    }
    let loopback = if v6 { "::1/128" } else { "127.0.0.0/8" };
    rule(OUTPUT_CHAIN, format!("-d {loopback} -j RETURN"));
    for ip in ips.iter().filter(|ip| ip.is_ipv6() == v6) {
        rule(OUTPUT_CHAIN, format!("-d {ip} -j RETURN"));
    }
    for net in exclusions
        .cidrs
        .iter()
        .filter(|n| matches!(n, ipnet::IpNet::V6(_)) == v6)
    {
        rule(OUTPUT_CHAIN, format!("-d {net} -j RETURN"));
    }
    for port in &exclusions.outbound_ports {
        rule(OUTPUT_CHAIN, format!("-p tcp --dport {port} -j RETURN"));
    }
    rule(
        OUTPUT_CHAIN,
        format!("-p tcp -j REDIRECT --to-ports {}", ports::OUTBOUND),
    );
    // HBONE comes to the proxy's own 15008; everything else is the app's (as Istio's in-pod
    // rules have it).
    for port in exclusions.inbound_ports.iter().chain([&ports::HBONE]) {
        rule(PREROUTING_CHAIN, format!("-p tcp --dport {port} -j RETURN"));
    }
    rule(
        PREROUTING_CHAIN,
        format!("-p tcp -j REDIRECT --to-ports {}", ports::INBOUND_PLAINTEXT),
    );
    out.push_str("COMMIT\n");
    out
}

/// Installs the capture rules in the pod's netns (replacing ours, if any).
pub(crate) fn install(
    netns: &Netns,
    ips: &[IpAddr],
    exclusions: &Exclusions,
) -> Result<(), IptablesError> {
    remove(netns)?;
    for (tool, v6) in [("iptables-restore", false), ("ip6tables-restore", true)] {
        if ips.iter().any(|ip| ip.is_ipv6() == v6) {
            run(
                netns,
                tool,
                &["--noflush"],
                Some(&rules(ips, exclusions, v6)),
            )?;
        }
    }
    Ok(())
}

/// Removes our chains and the jumps to them; a pod without them is left alone.
pub(crate) fn remove(netns: &Netns) -> Result<(), IptablesError> {
    for tool in ["iptables", "ip6tables"] {
        let present = run(netns, tool, &["-t", "nat", "-S"], None)?;
        for (builtin, chain) in [("OUTPUT", OUTPUT_CHAIN), ("PREROUTING", PREROUTING_CHAIN)] {
            if present.contains(&format!("-A {builtin} -p tcp -j {chain}")) {
                run(
                    netns,
                    tool,
                    &["-t", "nat", "-D", builtin, "-p", "tcp", "-j", chain],
                    None,
                )?;
            }
            if present.contains(&format!("-N {chain}")) {
                run(netns, tool, &["-t", "nat", "-F", chain], None)?;
                run(netns, tool, &["-t", "nat", "-X", chain], None)?;
            }
        }
    }
    Ok(())
}

/// Runs an iptables tool inside `netns`, feeding it `input`; its standard output.
fn run(
    netns: &Netns,
    tool: &'static str,
    args: &[&str],
    input: Option<&str>,
) -> Result<String, IptablesError> {
    let name = || netns.path().display().to_string();
    let fd = netns
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| IptablesError::Spawn {
            tool,
            netns: name(),
            source,
        })?;
    let mut command = Command::new(tool);
    command
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setns is async-signal-safe and the fd stays open in the child until exec.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let spawn_error = |source| IptablesError::Spawn {
        tool,
        netns: name(),
        source,
    };
    let mut child = command.spawn().map_err(spawn_error)?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes()).map_err(spawn_error)?;
    }
    let output = child.wait_with_output().map_err(spawn_error)?;
    if !output.status.success() {
        return Err(IptablesError::Failed {
            tool,
            netns: name(),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The destination a redirected connection was addressed to, from conntrack
/// (`SO_ORIGINAL_DST`, or `IP6T_SO_ORIGINAL_DST` for IPv6).
pub(crate) fn original_destination(stream: &TcpStream, v6: bool) -> io::Result<SocketAddr> {
    let socket = SockRef::from(stream);
    let addr = if v6 {
        socket.original_dst_v6()?
    } else {
        socket.original_dst_v4()?
    };
    addr.as_socket()
        .ok_or_else(|| io::Error::other("the original destination is not an IP address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_skip_the_proxy_loopback_own_address_inbound_hbone_and_exclusions() {
        let ips: Vec<IpAddr> = vec!["10.244.1.2".parse().unwrap(), "fd00::2".parse().unwrap()];
        let exclusions = Exclusions {
            marks: vec![1337, 0x111],
            outbound_ports: vec![22],
            inbound_ports: vec![9090],
            cidrs: vec![
                "10.96.0.1/32".parse().unwrap(),
                "fd00:96::/64".parse().unwrap(),
            ],
        };
        let v4 = rules(&ips, &exclusions, false);
        let lines: Vec<&str> = v4.lines().collect();
        for expected in [
            "-A OUTPUT -p tcp -j ZTUNNEL_OUTPUT",
            "-A ZTUNNEL_OUTPUT -m mark --mark 0x539 -j RETURN",
            "-A ZTUNNEL_OUTPUT -m mark --mark 0x111 -j RETURN",
            "-A ZTUNNEL_OUTPUT -d 127.0.0.0/8 -j RETURN",
            "-A ZTUNNEL_OUTPUT -d 10.244.1.2 -j RETURN",
            "-A ZTUNNEL_OUTPUT -d 10.96.0.1/32 -j RETURN",
            "-A ZTUNNEL_OUTPUT -p tcp --dport 22 -j RETURN",
            "-A ZTUNNEL_PREROUTING -p tcp --dport 9090 -j RETURN",
            "-A ZTUNNEL_PREROUTING -p tcp --dport 15008 -j RETURN",
        ] {
            assert!(lines.contains(&expected), "{expected} in\n{v4}");
        }
        // The app's connections to another node's proxy ports are the app's, and captured.
        assert!(!v4.contains("-A ZTUNNEL_OUTPUT -p tcp --dport 150"), "{v4}");
        // The redirects come last, after every exception.
        let last_output = lines
            .iter()
            .rposition(|l| l.starts_with("-A ZTUNNEL_OUTPUT"))
            .unwrap();
        assert_eq!(
            lines[last_output],
            "-A ZTUNNEL_OUTPUT -p tcp -j REDIRECT --to-ports 15001"
        );
        assert_eq!(
            lines[lines.len() - 2],
            "-A ZTUNNEL_PREROUTING -p tcp -j REDIRECT --to-ports 15006"
        );
        assert!(
            !v4.contains("fd00"),
            "no IPv6 address in the IPv4 rules:\n{v4}"
        );
        let v6 = rules(&ips, &exclusions, true);
        assert!(v6.contains("-d ::1/128 -j RETURN") && v6.contains("-d fd00::2 -j RETURN"));
        assert!(v6.contains("-d fd00:96::/64 -j RETURN") && !v6.contains("10.244"));
    }
}
