//! The lab's Kubernetes API, when its daemons enroll pods by label (`lab up --kube fake`): the
//! `fake-kube-apiserver` binary, run in node1's netns as the API server would be reached from
//! a node, holding the lab's namespaces and pods. Each pod gets a sandbox process (as a pause
//! container is), by which a daemon finds a running pod's netns from the host.

use crate::cluster_service;
use crate::error::{LabError, Result};
use crate::exec::{Placement, exec_node};
use crate::topology::{self, NODES, PODS, PodSpec};
use serde_json::{Value, json};
use std::net::{IpAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Stdio;

const PORT: u16 = 6443;
const PROGRAM: &str = "fake-kube-apiserver";
/// The line the fake prints once it listens.
const LISTENING: &str = "listening on";
/// The label by which Istio's ambient mode takes a namespace in.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// The annotation a daemon puts on the pods it captures.
pub const REDIRECTION: &str = "ambient.istio.io/redirection";

/// Where the daemons (and `kubectl` on node1) reach the API: node1's underlay address.
pub fn address() -> SocketAddrV4 {
    SocketAddrV4::new(NODES[0].underlay_ip, PORT)
}

/// The kubeconfig the fake writes for its clients.
pub fn kubeconfig_path() -> PathBuf {
    Path::new(topology::STATE_DIR).join("kubeconfig")
}

pub fn log_path() -> PathBuf {
    Path::new(topology::STATE_DIR).join("kube-apiserver.log")
}

/// The environment that makes a daemon enroll by the API's labels, as the DaemonSet sets it.
pub fn daemon_env() -> Vec<(String, String)> {
    vec![
        ("ZTUNNEL_ENROLLMENT".to_owned(), "kubernetes".to_owned()),
        (
            "KUBECONFIG".to_owned(),
            kubeconfig_path().display().to_string(),
        ),
    ]
}

/// Starts the fake API server and waits until it listens; then creates the lab's namespaces
/// (none labelled) and pods, each with the address the CNI will give it.
pub fn start_kube_api() -> Result<u32> {
    let args = [
        "--listen".to_owned(),
        address().to_string(),
        "--kubeconfig".to_owned(),
        kubeconfig_path().display().to_string(),
    ];
    // It prints the line once the kubeconfig is written.
    let pid = cluster_service::start(PROGRAM, &args, &log_path(), LISTENING)?;
    let mut namespaces: Vec<&str> = PODS.iter().map(|pod| pod.namespace).collect();
    namespaces.extend(topology::EXCLUDED_NAMESPACES);
    namespaces.sort_unstable();
    namespaces.dedup();
    for namespace in namespaces {
        request("POST", "/api/v1/namespaces", &namespace_object(namespace))?;
    }
    for pod in &PODS {
        create_pod(pod, &[pod.expected_ip().into(), pod.expected_ip6().into()])?;
    }
    Ok(pid)
}

fn namespace_object(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
}

/// Creates the pod in the API as the scheduler leaves it: on its node, and running at `ips`
/// (the first is `podIP`), or pending when there are none (its sandbox's CNI ADD is still to
/// come). The fake keeps the given uid, by which the pod's cgroup is named.
pub fn create_pod(pod: &PodSpec, ips: &[IpAddr]) -> Result<()> {
    let status = match ips.is_empty() {
        false => running_status(ips),
        true => json!({"phase": "Pending"}),
    };
    let object = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": pod.namespace, "uid": pod.uid},
        "spec": {
            "nodeName": pod.node.name,
            "serviceAccountName": pod.service_account,
            "containers": [{"name": "app", "image": "lab"}],
        },
        "status": status,
    });
    let path = format!("/api/v1/namespaces/{}/pods", pod.namespace);
    request("POST", &path, &object).map(drop)
}

/// A running pod's status with its addresses, as the kubelet reports them.
fn running_status(ips: &[IpAddr]) -> Value {
    let listed: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
    json!({"phase": "Running", "podIP": ips.first().map(IpAddr::to_string), "podIPs": listed})
}

/// What the kubelet reports once the pod's sandbox has its addresses.
pub fn report_running(pod: &PodSpec, ips: &[IpAddr]) -> Result<()> {
    let patch = json!({"status": running_status(ips)});
    let path = format!(
        "/api/v1/namespaces/{}/pods/{}/status",
        pod.namespace, pod.name
    );
    request("PATCH", &path, &patch).map(drop)
}

/// A merge patch of the pod's object (its labels, say).
pub fn patch_pod(pod: &PodSpec, patch: &Value) -> Result<()> {
    let path = format!("/api/v1/namespaces/{}/pods/{}", pod.namespace, pod.name);
    request("PATCH", &path, patch).map(drop)
}

pub fn delete_pod(pod: &PodSpec) -> Result<()> {
    let path = format!("/api/v1/namespaces/{}/pods/{}", pod.namespace, pod.name);
    request("DELETE", &path, &Value::Null).map(drop)
}

/// Labels namespace `name` `istio.io/dataplane-mode=ambient`, or removes the label.
pub fn label_ambient(namespace: &str, ambient: bool) -> Result<()> {
    let value = if ambient {
        json!("ambient")
    } else {
        Value::Null
    };
    let patch = json!({"metadata": {"labels": {DATAPLANE_MODE: value}}});
    let path = format!("/api/v1/namespaces/{namespace}");
    request("PATCH", &path, &patch).map(drop)
}

/// The pod as the API has it now.
pub fn get_pod(pod: &PodSpec) -> Result<Value> {
    let path = format!("/api/v1/namespaces/{}/pods/{}", pod.namespace, pod.name);
    request("GET", &path, &Value::Null)
}

/// Whether the API shows the pod annotated as captured.
pub fn is_marked_redirected(pod: &PodSpec) -> Result<bool> {
    let object = get_pod(pod)?;
    Ok(object["metadata"]["annotations"][REDIRECTION] == "enabled")
}

/// One request to the API, from node1 (where it listens); the answer's JSON.
fn request(method: &str, path: &str, body: &Value) -> Result<Value> {
    let url = format!("http://{}{path}", address());
    let mut argv = vec![
        "curl".to_owned(),
        "-sS".to_owned(),
        "--fail-with-body".to_owned(),
        "--max-time".to_owned(),
        "10".to_owned(),
        "-X".to_owned(),
        method.to_owned(),
    ];
    if !body.is_null() {
        let content_type = if method == "PATCH" {
            "application/merge-patch+json"
        } else {
            "application/json"
        };
        argv.extend([
            "-H".to_owned(),
            format!("Content-Type: {content_type}"),
            "--data-binary".to_owned(),
            body.to_string(),
        ]);
    }
    argv.push(url);
    let output = exec_node(NODES[0].name, &argv)?
        .output()
        .map_err(|e| kube_error(format!("running curl: {e}")))?;
    if !output.status.success() {
        return Err(kube_error(format!(
            "{method} {path} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    serde_json::from_slice(&output.stdout)
        .map_err(|e| kube_error(format!("{method} {path} answered no JSON: {e}")))
}

/// Starts the pod's sandbox process: in its cgroup and netns, until the lab is torn down.
pub fn start_sandbox(pod: &PodSpec) -> Result<u32> {
    let mut command =
        Placement::new(&pod.cgroup_path(), &pod.netns_path(), true)?.command("sleep".as_ref());
    // Nothing of ours held open: a pipe to `lab up` would never see its end.
    command
        .arg("infinity")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = command
        .spawn()
        .map_err(|e| kube_error(format!("starting the sandbox of {}: {e}", pod.name)))?;
    let pid = child.id();
    // It outlives us; `lab down` kills what is left in the lab's cgroups.
    drop(child);
    Ok(pid)
}

fn kube_error(problem: String) -> LabError {
    cluster_service::error(PROGRAM, problem)
}
