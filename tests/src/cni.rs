//! The node's CNI network config list and running it the way a container runtime's libcni does:
//! each plugin as a separate process fed its config on stdin, ADD results chained through
//! `prevResult`, the final result cached and handed back to DEL and CHECK.

use crate::daemon::DaemonOptions;
use crate::error::{LabError, Result};
use crate::exec::Placement;
use crate::topology::{EXCLUDED_NAMESPACES, NodeSpec, POD_IFNAME, PodSpec, SYSTEM_CNI_DIR};
use crate::{command, state, topology};
use serde_json::{Value, json};
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

const CNI_VERSION: &str = "1.0.0";
/// Longer than the ztunnel-cni plugin's own `timeoutSeconds`, so its error wins the race.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);
/// The project's chained plugin, found in the bin dir through CNI_PATH.
const ZTUNNEL_PLUGIN: &str = "ztunnel-cni";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operation {
    Add,
    Del,
    Check,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Operation::Add => "ADD",
            Operation::Del => "DEL",
            Operation::Check => "CHECK",
        }
    }
}

/// What a successful ADD returned.
#[derive(Clone, Debug)]
pub struct CniResult {
    /// The pod's IPv4 address, from the result's `ips`.
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address, from the result's `ips` (the lab's ranges are dual stack).
    pub ip6: Option<Ipv6Addr>,
    /// The whole result of the last plugin, as cached.
    pub raw: Value,
}

impl CniResult {
    /// Both addresses, IPv4 first, as the plugin passes them to the daemon.
    pub fn ips(&self) -> Vec<std::net::IpAddr> {
        let mut ips = vec![self.ip.into()];
        ips.extend(self.ip6.map(std::net::IpAddr::from));
        ips
    }
}

/// The node's network config list. `with_ztunnel` chains the ztunnel-cni plugin after ptp; a
/// plain-network lab (a baseline without capture) leaves it out.
pub fn conflist(node: &NodeSpec, with_ztunnel: bool) -> Value {
    let mut plugins = vec![json!({
        "type": "ptp",
        "ipMasq": false,
        "ipam": {
            "type": "host-local",
            // Dual stack: one address of each family per pod.
            "ranges": [[{ "subnet": node.subnet_cidr() }], [{ "subnet": node.subnet6_cidr() }]],
            "routes": [{ "dst": "0.0.0.0/0" }, { "dst": "::/0" }],
            "dataDir": node.ipam_dir(),
        },
    })];
    if with_ztunnel {
        plugins.push(json!({
            "type": ZTUNNEL_PLUGIN,
            "apiSocket": node.api_socket(),
            "excludeNamespaces": EXCLUDED_NAMESPACES,
            "timeoutSeconds": 30,
        }));
    }
    json!({
        "cniVersion": CNI_VERSION,
        "name": node.network_name(),
        "plugins": plugins,
    })
}

/// Writes the node's network config list (`conflist`), as its network plugin would.
pub fn write_conflist(node: &NodeSpec, with_ztunnel: bool) -> Result<()> {
    let path = node.conflist_path();
    let text = serde_json::to_string_pretty(&conflist(node, with_ztunnel)).unwrap_or_default();
    std::fs::write(&path, text).map_err(|e| LabError::io("writing", path, e))
}

/// CNI ADD of the pod's sandbox. Like libcni, a failure leaves cleanup (DEL) to the caller.
pub fn cni_add(pod: &str) -> Result<CniResult> {
    let pod = topology::pod_spec(pod)?;
    let list = read_conflist(pod.node)?;
    let mut previous: Option<Value> = None;
    for plugin in plugins_of(&list) {
        previous = Some(invoke(
            pod,
            Operation::Add,
            &list,
            plugin,
            previous.as_ref(),
        )?);
    }
    let raw = previous.unwrap_or(Value::Null);
    let ip = first_address(&raw).ok_or_else(|| LabError::NoPodAddress {
        pod: pod.name.to_owned(),
    })?;
    let ip6 = first_address(&raw);
    cache_result(pod, &list, &raw)?;
    state::record_pod_ips(pod.name, ip, ip6)?;
    Ok(CniResult { ip, ip6, raw })
}

/// CNI DEL: the plugins in reverse order, each given the cached ADD result (if any).
pub fn cni_del(pod: &str) -> Result<()> {
    let pod = topology::pod_spec(pod)?;
    let list = read_conflist(pod.node)?;
    let cached = cached_result(pod, &list);
    for plugin in plugins_of(&list).iter().rev() {
        invoke(pod, Operation::Del, &list, plugin, cached.as_ref())?;
    }
    let cache = cache_path(pod, &list);
    match std::fs::remove_file(&cache) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(LabError::io("removing", cache, e))
        }
        _ => Ok(()),
    }
}

/// CNI CHECK: the plugins in order, each given the cached ADD result, which must exist.
pub fn cni_check(pod: &str) -> Result<()> {
    let pod_spec = topology::pod_spec(pod)?;
    let list = read_conflist(pod_spec.node)?;
    let cached = cached_result(pod_spec, &list).ok_or_else(|| LabError::NotAdded {
        pod: pod.to_owned(),
    })?;
    for plugin in plugins_of(&list) {
        invoke(pod_spec, Operation::Check, &list, plugin, Some(&cached))?;
    }
    Ok(())
}

fn read_conflist(node: &NodeSpec) -> Result<Value> {
    let path = node.conflist_path();
    let text = std::fs::read_to_string(&path).map_err(|e| LabError::io("reading", &path, e))?;
    serde_json::from_str(&text).map_err(|e| LabError::State {
        path,
        reason: e.to_string(),
    })
}

fn plugins_of(list: &Value) -> &[Value] {
    list["plugins"].as_array().map_or(&[], Vec::as_slice)
}

/// The plugin's own config object plus what libcni injects: the list's name and version and,
/// when there is one, the previous result.
fn plugin_stdin(list: &Value, plugin: &Value, previous: Option<&Value>) -> Value {
    let mut config = plugin.clone();
    if let Some(object) = config.as_object_mut() {
        object.insert("cniVersion".into(), list["cniVersion"].clone());
        object.insert("name".into(), list["name"].clone());
        if let Some(previous) = previous {
            object.insert("prevResult".into(), previous.clone());
        }
    }
    config
}

/// ztunnel-cni from the node's bin dir if installed there, else from where the lab's daemons
/// come from; ptp and host-local from Debian's.
fn search_path(node: &NodeSpec) -> Result<String> {
    let ours = DaemonOptions::load()?.daemon_bin_dir();
    Ok(format!(
        "{}:{}:{SYSTEM_CNI_DIR}",
        node.cni_bin_dir().display(),
        ours.display()
    ))
}

fn find_plugin(kind: &str, search_path: &str) -> Option<PathBuf> {
    search_path
        .split(':')
        .map(|dir| Path::new(dir).join(kind))
        .find(|candidate| candidate.is_file())
}

/// Runs one plugin inside the node's netns (the "host" from the plugin's point of view) and
/// returns its parsed stdout: the result for ADD, `Null` for DEL and CHECK.
fn invoke(
    pod: &PodSpec,
    operation: Operation,
    list: &Value,
    plugin: &Value,
    previous: Option<&Value>,
) -> Result<Value> {
    let kind = plugin["type"].as_str().unwrap_or_default();
    let cni_path = search_path(pod.node)?;
    let binary = find_plugin(kind, &cni_path).ok_or_else(|| LabError::PluginNotFound {
        plugin: kind.to_owned(),
        search_path: cni_path.clone(),
    })?;
    let container_id = pod.container_id();
    let cni_args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
        pod.namespace, pod.name, container_id, pod.uid
    );
    let node = pod.node;
    let mut command = Placement::new(&node.system_cgroup(), &node.netns_path(), false)?
        .command(binary.as_os_str());
    command
        .env("CNI_COMMAND", operation.as_str())
        .env("CNI_CONTAINERID", &container_id)
        .env("CNI_NETNS", pod.netns_path())
        .env("CNI_IFNAME", POD_IFNAME)
        .env("CNI_ARGS", cni_args)
        .env("CNI_PATH", &cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());

    let failure = |reason: String| LabError::PluginOutput {
        command: operation.as_str(),
        pod: pod.name.to_owned(),
        plugin: kind.to_owned(),
        reason,
    };
    let mut child = command
        .spawn()
        .map_err(|e| failure(format!("cannot start {}: {e}", binary.display())))?;
    let config = plugin_stdin(list, plugin, previous).to_string();
    if let Some(mut stdin) = child.stdin.take() {
        // Like Go's os/exec under libcni, a plugin that exits without reading its config is
        // judged by its exit status and output, not by our broken pipe.
        match stdin.write_all(config.as_bytes()) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                return Err(failure(format!("writing its config: {e}")));
            }
            _ => {}
        }
    }
    let output = command::output_within(child, PLUGIN_TIMEOUT)
        .map_err(|e| failure(e.to_string()))?
        .ok_or_else(|| {
            failure(format!(
                "no answer within {}s; killed it",
                PLUGIN_TIMEOUT.as_secs()
            ))
        })?;

    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(match serde_json::from_str::<Value>(&stdout) {
            Ok(error) if error["code"].is_u64() => LabError::Plugin {
                command: operation.as_str(),
                pod: pod.name.to_owned(),
                plugin: kind.to_owned(),
                code: error["code"]
                    .as_u64()
                    .and_then(|code| u32::try_from(code).ok())
                    .unwrap_or(u32::MAX),
                msg: error["msg"].as_str().unwrap_or_default().to_owned(),
                details: error["details"].as_str().unwrap_or_default().to_owned(),
            },
            _ => failure(format!(
                "{} with stdout {:?} and stderr {:?}",
                output.status,
                stdout.trim(),
                stderr.trim()
            )),
        });
    }
    match operation {
        Operation::Add => serde_json::from_str(&stdout)
            .map_err(|e| failure(format!("result is not JSON ({e}): {:?}", stdout.trim()))),
        Operation::Del | Operation::Check => Ok(Value::Null),
    }
}

/// The first address of the result's `ips` that parses as an `Address` (IPv4 or IPv6).
fn first_address<Address: std::str::FromStr>(result: &Value) -> Option<Address> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        let address = ip["address"].as_str()?;
        address.split('/').next()?.parse().ok()
    })
}

/// Named like libcni's `<network>-<container id>-<ifname>` cache entry.
fn cache_path(pod: &PodSpec, list: &Value) -> PathBuf {
    let network = list["name"].as_str().unwrap_or_default();
    pod.node
        .cni_cache_dir()
        .join(format!("{network}-{}-{POD_IFNAME}", pod.container_id()))
}

fn cache_result(pod: &PodSpec, list: &Value, result: &Value) -> Result<()> {
    let path = cache_path(pod, list);
    let dir = pod.node.cni_cache_dir();
    std::fs::create_dir_all(&dir).map_err(|e| LabError::io("creating", dir, e))?;
    let entry = json!({
        "kind": "cniCacheV1",
        "containerId": pod.container_id(),
        "ifName": POD_IFNAME,
        "networkName": list["name"],
        "result": result,
    });
    std::fs::write(&path, entry.to_string()).map_err(|e| LabError::io("writing", path, e))
}

fn cached_result(pod: &PodSpec, list: &Value) -> Option<Value> {
    let text = std::fs::read_to_string(cache_path(pod, list)).ok()?;
    let entry: Value = serde_json::from_str(&text).ok()?;
    Some(entry["result"].clone()).filter(|result| !result.is_null())
}
