//! How enrolled pods' connections are brought to the proxy: the eBPF programs, their maps and
//! each pod's links (`ebpf`, the product), or NAT REDIRECT rules in each pod's netns
//! (`iptables`, the baseline the benchmark measures eBPF against). `Capture` is the one place
//! that knows which is in use; the proxy and enrollment ask it, whatever the mode.
//!
//! The eBPF maps are loaded in both modes: the counters, the mesh config's kernel view and
//! the delivery announcements live there, and nothing attaches them in iptables mode.

pub(crate) mod ebpf;
pub(crate) mod iptables;

pub(crate) use ebpf::{Datapath, DatapathError, PodLinks, detach_pod};

use crate::host::netns::{Netns, unspecified};
use crate::settings::{CaptureMode, Settings};
use iptables::{Exclusions, IptablesError};
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use ztunnel_common::Addr;
use ztunnel_common::maps::{POD_HAS_IP4, POD_HAS_IP6, PodInfo};

#[derive(Debug, thiserror::Error)]
pub(crate) enum CaptureError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Iptables(#[from] IptablesError),
}

/// A pod as capture sees it.
pub(crate) struct CapturedPod<'a> {
    pub(crate) uid: &'a str,
    pub(crate) ips: &'a [IpAddr],
    pub(crate) netns: &'a Netns,
    /// The key of the pod's `ZT_PODS` entry.
    pub(crate) netns_cookie: u64,
    pub(crate) index: u32,
}

pub(crate) struct Capture {
    mode: CaptureMode,
    datapath: Arc<Datapath>,
    /// What iptables capture leaves alone (the eBPF programs read it from their maps).
    exclusions: Exclusions,
}

impl Capture {
    pub(crate) fn new(settings: &Settings, datapath: Arc<Datapath>) -> Capture {
        Capture {
            mode: settings.capture,
            datapath,
            exclusions: Exclusions {
                marks: vec![settings.mark, ztunnel_common::ports::DELIVERY_MARK],
                outbound_ports: settings.exclude_ports.clone(),
                inbound_ports: settings.exclude_inbound_ports.clone(),
                cidrs: settings.exclude_cidrs.clone(),
            },
        }
    }

    pub(crate) fn datapath(&self) -> &Arc<Datapath> {
        &self.datapath
    }

    /// Where a captured outbound connection from `client` was going, if it was captured.
    pub(crate) fn outbound_destination(
        &self,
        stream: &TcpStream,
        client: SocketAddr,
    ) -> Option<SocketAddr> {
        match self.mode {
            CaptureMode::Ebpf => self.datapath.take_orig_dst(client),
            CaptureMode::Iptables => iptables::original_destination(stream, client.is_ipv6()).ok(),
        }
    }

    /// Where a connection steered to the inbound listener was going.
    pub(crate) fn inbound_destination(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        match self.mode {
            // sk_lookup keeps the original destination as the accepted socket's address.
            CaptureMode::Ebpf => stream.local_addr(),
            CaptureMode::Iptables => {
                let v6 = stream.local_addr()?.is_ipv6();
                iptables::original_destination(stream, v6)
            }
        }
    }

    /// Where the pod's outbound listener binds: `connect4/6` rewrite to `<pod ip>:15001`;
    /// iptables' REDIRECT sends to the loopback address instead, so then the wildcard.
    pub(crate) fn outbound_listener_ip(&self, pod_ip: IpAddr) -> IpAddr {
        match self.mode {
            CaptureMode::Ebpf => pod_ip,
            CaptureMode::Iptables => unspecified(pod_ip),
        }
    }

    /// What must be in place before capture starts: with eBPF, the pod's inbound listeners
    /// registered for `sk_lookup` and its `ZT_PODS` entry. Undone by `clear`.
    pub(crate) fn prepare(
        &self,
        pod: &CapturedPod<'_>,
        inbound: &[(IpAddr, TcpListener)],
    ) -> Result<(), CaptureError> {
        if self.mode == CaptureMode::Iptables {
            return Ok(());
        }
        for (ip, listener) in inbound {
            self.datapath.register_inbound_listener(*ip, listener)?;
        }
        let info = pod_info(pod.ips, pod.index);
        Ok(self.datapath.insert_pod(pod.netns_cookie, info)?)
    }

    /// Starts capturing the pod: its links on `cgroup` (an open directory) and its netns,
    /// the ones pinned already adopted (`Datapath::capture_pod`), or the iptables rules
    /// installed (replacing ours, which stay in the netns across restarts). Undone by `stop`.
    pub(crate) fn start(
        &self,
        pod: &CapturedPod<'_>,
        cgroup: &File,
    ) -> Result<PodLinks, CaptureError> {
        if self.mode == CaptureMode::Iptables {
            iptables::install(pod.netns, pod.ips, &self.exclusions)?;
            return Ok(self.datapath.pod_links(pod.uid));
        }
        Ok(self.datapath.capture_pod(pod.uid, cgroup, pod.netns)?)
    }

    /// Stops capturing the pod. Errors are logged: a pod must be released as far as possible.
    pub(crate) fn stop(&self, pod: &CapturedPod<'_>, links: &PodLinks) {
        detach_pod(links);
        if self.mode == CaptureMode::Iptables
            && let Err(err) = iptables::remove(pod.netns)
        {
            tracing::warn!(uid = pod.uid, %err, "cannot remove the capture rules (netns already gone?)");
        }
    }

    /// Undoes `prepare`; entries already gone are fine, other errors are logged.
    pub(crate) fn clear(&self, pod: &CapturedPod<'_>) {
        if let Err(err) = self.datapath.remove_pod(pod.netns_cookie) {
            tracing::warn!(uid = pod.uid, %err, "cannot remove pod map entry");
        }
        for ip in pod.ips {
            if let Err(err) = self.datapath.unregister_inbound_listener(*ip) {
                tracing::warn!(%ip, %err, "cannot unregister inbound listener");
            }
        }
    }
}

/// The kernel's view of a pod: its first address of each family.
fn pod_info(ips: &[IpAddr], pod_index: u32) -> PodInfo {
    let mut info = PodInfo {
        pod_index,
        ..Default::default()
    };
    if let Some(ip4) = ips.iter().find(|ip| ip.is_ipv4()) {
        info.ip4 = Addr::from(*ip4);
        info.flags |= POD_HAS_IP4;
    }
    if let Some(ip6) = ips.iter().find(|ip| ip.is_ipv6()) {
        info.ip6 = Addr::from(*ip6);
        info.flags |= POD_HAS_IP6;
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_info_takes_one_address_per_family() {
        let ips: Vec<IpAddr> = vec![
            "10.244.1.2".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            "10.244.1.9".parse().unwrap(),
        ];
        let info = pod_info(&ips, 7);
        assert!(info.has_ip4() && info.has_ip6());
        assert_eq!(info.ip4, Addr::from(ips[0]));
        assert_eq!(info.ip6, Addr::from(ips[1]));
        assert_eq!(info.pod_index, 7);
    }
}
