//! The lab's istiod, when its daemons take the mesh and their certificates from a control plane
//! (`--control-plane istiod`) instead of the mesh file and the built-in CA: the `fake-istiod`
//! binary (delta xDS and the Istio CA over TLS, serving the lab's mesh file), run in node1's
//! netns as istiod runs as a pod on some node. node2 reaches it over the underlay.

use crate::cluster_service;
use crate::daemon::{is_alive, signal_and_wait};
use crate::error::{LabError, Result};
use crate::topology::{self, NODES};
use nix::sys::signal::Signal;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};

/// istiod's port for xDS and its CA.
const PORT: u16 = 15012;
const PROGRAM: &str = "fake-istiod";
/// The line the fake logs once it listens.
const SERVING: &str = "serving";

/// Where the daemons reach istiod: node1's underlay address.
pub fn address() -> SocketAddrV4 {
    SocketAddrV4::new(NODES[0].underlay_ip, PORT)
}

/// The projected service-account token the daemons present.
pub fn token_path() -> PathBuf {
    Path::new(topology::STATE_DIR).join("istio-token")
}

/// The token istiod accepts (what the API server would validate the daemons' against).
fn accepted_token_path() -> PathBuf {
    Path::new(topology::STATE_DIR).join("istiod-accepted-token")
}

/// The token of a fresh lab, on both sides.
const LAB_TOKEN: &str = "lab-token";

/// istiod's root certificate: the lab's CA root, which istiod signs with (see `fake-istiod`).
pub fn root_cert_path() -> PathBuf {
    Path::new(topology::CA_DIR).join("root-cert.pem")
}

pub fn log_path() -> PathBuf {
    Path::new(topology::STATE_DIR).join("istiod.log")
}

fn pid_file() -> PathBuf {
    Path::new(topology::STATE_DIR).join("istiod.pid")
}

fn proxy_status_path() -> PathBuf {
    Path::new(topology::STATE_DIR).join("istiod-proxy-status.json")
}

/// The environment that points a daemon at the lab's istiod, as a DaemonSet sets it.
pub fn daemon_env(node: &topology::NodeSpec) -> Vec<(String, String)> {
    let root = root_cert_path().display().to_string();
    [
        ("XDS_ADDRESS", address().to_string()),
        ("XDS_ROOT_CA", root.clone()),
        ("CA_ADDRESS", address().to_string()),
        ("CA_ROOT_CA", root),
        ("AUTH_TOKEN", token_path().display().to_string()),
        ("POD_NAME", format!("ztunnel-{}", node.name)),
        ("INSTANCE_IP", node.underlay_ip.to_string()),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value))
    .collect()
}

/// Starts istiod (writing the token first if there is none) and waits until it listens.
pub fn start_istiod() -> Result<u32> {
    if let Some(pid) = istiod_pid() {
        return Err(istiod_error(format!("is already running (pid {pid})")));
    }
    for path in [token_path(), accepted_token_path()] {
        if !path.exists() {
            std::fs::write(&path, LAB_TOKEN).map_err(|e| LabError::io("writing", path, e))?;
        }
    }
    let args = [
        "--listen".to_owned(),
        address().to_string(),
        "--mesh-config".to_owned(),
        topology::MESH_CONFIG.to_owned(),
        "--ca-dir".to_owned(),
        topology::CA_DIR.to_owned(),
        "--token-file".to_owned(),
        accepted_token_path().display().to_string(),
        "--proxy-status".to_owned(),
        proxy_status_path().display().to_string(),
        "--faults".to_owned(),
        faults_path().display().to_string(),
    ];
    let pid = cluster_service::start(PROGRAM, &args, &log_path(), SERVING)?;
    std::fs::write(pid_file(), pid.to_string())
        .map_err(|e| LabError::io("writing", pid_file(), e))?;
    Ok(pid)
}

/// Stops istiod, if it runs; says whether it did.
pub fn stop_istiod() -> Result<bool> {
    let Some(pid) = istiod_pid() else {
        return Ok(false);
    };
    if !signal_and_wait(pid, Signal::SIGTERM, cluster_service::STOP_TIMEOUT) {
        signal_and_wait(pid, Signal::SIGKILL, cluster_service::STOP_TIMEOUT);
    }
    let _ = std::fs::remove_file(pid_file());
    Ok(true)
}

pub fn istiod_pid() -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let is_fake_istiod = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|comm| comm.trim() == "fake-istiod");
    (is_alive(pid) && is_fake_istiod).then_some(pid)
}

/// Replaces the token the daemons present (istiod accepts only the lab's).
pub fn write_daemon_token(token: &str) -> Result<()> {
    std::fs::write(token_path(), token).map_err(|e| LabError::io("writing", token_path(), e))
}

/// The token a fresh lab's daemons present, which istiod accepts.
pub fn restore_daemon_token() -> Result<()> {
    write_daemon_token(LAB_TOKEN)
}

/// How istiod versions what it serves, a resource's bytes or the mesh file's text: the first
/// 8 bytes of their SHA-256, in hex.
pub fn digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The version of the mesh file each node's daemon has ACKed from istiod, by node (the
/// `digest` of the file's text).
pub fn synced_versions() -> BTreeMap<String, String> {
    std::fs::read(proxy_status_path())
        .ok()
        .and_then(|text| serde_json::from_slice(&text).ok())
        .unwrap_or_default()
}

/// The faults istiod shows, read by it at each call (and, for `bad_address` and
/// `withheld_workloads`, with each version of the mesh file): what the fault tests set with
/// `set_faults`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// How the CA answers `CreateCertificate`.
    pub ca: CaAnswer,
    /// How long each `CreateCertificate` takes first.
    pub ca_delay_ms: u64,
    /// The names of the certificate istiod serves to new connections (its DNS name and
    /// address when None).
    pub serving_names: Option<Vec<String>>,
    /// Also serve an Address no proxy can take (`BAD_ADDRESS`: a workload with a 3-byte IP).
    pub bad_address: bool,
    /// The workloads (`namespace/name`) not served, as istiod before it has seen a pod.
    pub withheld_workloads: Vec<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaAnswer {
    /// Signs the CSR as asked.
    #[default]
    Sign,
    /// Fails every call with `Unavailable`, as a CA that is down.
    Refuse,
    /// Answers with no certificate.
    EmptyChain,
    /// Signs the CSR's key for another identity.
    WrongIdentity,
}

/// The name of the Address `Faults::bad_address` adds.
pub const BAD_ADDRESS: &str = "Kubernetes//Pod/demo/broken";

pub fn faults_path() -> PathBuf {
    Path::new(topology::STATE_DIR).join("istiod-faults.json")
}

/// Puts istiod in `faults` from its next call on.
pub fn set_faults(faults: &Faults) -> Result<()> {
    let text = serde_json::to_string(faults).expect("faults serialize");
    let partial = faults_path().with_extension("partial");
    std::fs::write(&partial, text)
        .and_then(|()| std::fs::rename(&partial, faults_path()))
        .map_err(|e| LabError::io("writing", faults_path(), e))
}

/// The faults in `path` (none when it is absent); an unreadable file is reported as such.
pub fn read_faults(path: &Path) -> std::result::Result<Faults, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Faults::default()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Has istiod end every xDS stream with `Unavailable` (its connections stay).
pub fn drop_streams() -> Result<()> {
    signal_istiod(Signal::SIGUSR1)
}

/// Has istiod send GOAWAY on every connection, as istiod does when it shuts down or
/// rebalances: the proxies must come back at once.
pub fn goaway() -> Result<()> {
    signal_istiod(Signal::SIGUSR2)
}

fn signal_istiod(signal: Signal) -> Result<()> {
    let pid = istiod_pid().ok_or_else(|| istiod_error("is not running".to_owned()))?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("a pid fits in i32"));
    nix::sys::signal::kill(pid, signal)
        .map_err(|e| istiod_error(format!("cannot be sent {signal}: {e}")))
}

fn istiod_error(problem: String) -> LabError {
    cluster_service::error(PROGRAM, problem)
}
