//! `state.json`: what `up` built, for `status`, scripts and the end-to-end tests.

use crate::error::{LabError, Result};
use crate::topology::STATE_DIR;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Lab {
    /// False for a plain-network lab: no daemons, no ztunnel-cni plugin in the chain.
    pub with_ztunnel: bool,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub netns: PathBuf,
    pub underlay_ip: Ipv4Addr,
    pub pod_subnet: String,
    pub conflist: PathBuf,
    pub api_socket: PathBuf,
    pub log: PathBuf,
    pub bpffs: PathBuf,
    /// The kubepods cgroup the daemon watches.
    pub cgroup_root: PathBuf,
    pub daemon_pid: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pod {
    pub name: String,
    pub node: String,
    pub namespace: String,
    pub uid: String,
    pub container_id: String,
    pub service_account: String,
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address (the lab is dual stack; absent in a state written before).
    #[serde(default)]
    pub ip6: Option<Ipv6Addr>,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    /// Enrolled by the ztunnel-cni plugin, as opposed to excluded by namespace.
    pub captured: bool,
}

impl Pod {
    /// The pod's addresses, IPv4 first, as the CNI plugin passes them to the daemon.
    pub fn ips(&self) -> Vec<IpAddr> {
        let mut ips = vec![IpAddr::V4(self.ip)];
        ips.extend(self.ip6.map(IpAddr::V6));
        ips
    }
}

pub fn state_path() -> PathBuf {
    Path::new(STATE_DIR).join("state.json")
}

impl Lab {
    /// Reads the state of the running lab.
    pub fn load() -> Result<Lab> {
        let path = state_path();
        let text = std::fs::read_to_string(&path).map_err(|e| LabError::State {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        serde_json::from_str(&text).map_err(|e| LabError::State {
            path,
            reason: e.to_string(),
        })
    }

    /// Writes the state through a temporary file, so a reader never sees half of it.
    pub fn save(&self) -> Result<()> {
        let path = state_path();
        let temporary = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).map_err(|e| LabError::State {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        std::fs::write(&temporary, text).map_err(|e| LabError::io("writing", &temporary, e))?;
        std::fs::rename(&temporary, &path).map_err(|e| LabError::io("replacing", path, e))
    }

    pub fn pod(&self, name: &str) -> Result<&Pod> {
        self.pods
            .iter()
            .find(|pod| pod.name == name)
            .ok_or_else(|| LabError::UnknownName(name.to_owned()))
    }

    pub fn node(&self, name: &str) -> Result<&Node> {
        self.nodes
            .iter()
            .find(|node| node.name == name)
            .ok_or_else(|| LabError::UnknownName(name.to_owned()))
    }
}

/// Applies `change` to the saved state, if the lab has one yet (during `up` it does not).
fn update(change: impl FnOnce(&mut Lab)) -> Result<()> {
    if !state_path().exists() {
        return Ok(());
    }
    let mut lab = Lab::load()?;
    change(&mut lab);
    lab.save()
}

/// A pod re-added through CNI may get new addresses.
pub(crate) fn record_pod_ips(pod: &str, ip: Ipv4Addr, ip6: Option<Ipv6Addr>) -> Result<()> {
    update(|lab| {
        if let Some(entry) = lab.pods.iter_mut().find(|entry| entry.name == pod) {
            entry.ip = ip;
            entry.ip6 = ip6;
        }
    })
}

pub(crate) fn record_daemon_pid(node: &str, pid: Option<u32>) -> Result<()> {
    update(|lab| {
        if let Some(entry) = lab.nodes.iter_mut().find(|entry| entry.name == node) {
            entry.daemon_pid = pid;
        }
    })
}
