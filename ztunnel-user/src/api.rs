//! What the daemon tells others, as data: the local control API (one JSON request and one
//! JSON response per connection on a Unix socket, through which the CNI plugin enrolls and
//! disenrolls pods), and the admin API's `/config_dump` and `/connections`, which the CLI
//! reads.

use crate::mesh::MeshStatus;
use crate::mesh::authz::Policy;
use crate::mesh::config::{Service, Workload};
use crate::settings::Settings;
use crate::xds::client::XdsStatus;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A pod as the CNI plugin knows it at ADD time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// The sandbox container id (`CNI_CONTAINERID`).
    pub container_id: String,
    /// Path of the pod's network namespace (`CNI_NETNS`).
    pub netns: PathBuf,
    /// The pod's addresses, from the previous plugin's result.
    pub ips: Vec<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Capture the pod; answered only once its traffic is captured.
    Enroll {
        pod: PodSpec,
    },
    /// Release the pod. Only the enrollment of this sandbox is removed (a stale DEL for an older
    /// sandbox of the same pod leaves the current one alone).
    Disenroll {
        uid: String,
        container_id: String,
    },
    /// Is this sandbox of the pod enrolled (or, with Kubernetes enrollment, out of the mesh)?
    Check {
        uid: String,
        container_id: String,
        /// The pod's namespace and name, by which Kubernetes enrollment reads its labels
        /// (absent from older plugins' requests).
        #[serde(default)]
        namespace: String,
        #[serde(default)]
        name: String,
    },
    Status,
    /// Recent captured connections, newest last.
    Connections,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolledPod {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub container_id: String,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    pub ips: Vec<IpAddr>,
    /// The SPIFFE identity the pod's traffic carries.
    pub identity: String,
    /// The pinned bpf_links that capture this pod.
    pub links: Vec<PathBuf>,
    /// Set while the proxy does not serve the pod: captured, its new connections refused
    /// (never sent uncaptured) while the daemon retries taking it over. Absent from the
    /// answers of older daemons, which serve every pod they list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<PodWaiting>,
}

/// Why a captured pod is not served yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodWaiting {
    /// Why the last attempt to take it over failed.
    pub reason: String,
    pub attempts: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterValue {
    pub name: String,
    pub value: u64,
}

/// A workload certificate the daemon holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateInfo {
    pub identity: String,
    /// Expiry, in seconds since the Unix epoch.
    pub expires_unix: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub pods: Vec<EnrolledPod>,
    pub certificates: Vec<CertificateInfo>,
    /// Kernel decision counters, summed over CPUs.
    pub counters: Vec<CounterValue>,
    pub mesh: MeshStatus,
    /// istiod's xDS stream and resources, when the daemon takes the mesh from istiod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xds: Option<XdsStatus>,
}

/// What the admin API's `/config_dump` answers: the status, the readiness, the settings the
/// daemon runs with and the mesh config in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigDump {
    #[serde(flatten)]
    pub status: Status,
    /// None when ready, else what is still missing.
    pub not_ready: Option<String>,
    pub settings: Settings,
    pub limits: Limits,
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    pub policies: Vec<Policy>,
    /// Fields the entries set that this build reads but does not act on yet.
    #[serde(default)]
    pub accepted_not_used: Vec<String>,
}

/// The resource limits the daemon enforces, as resolved at start (`proxy::admission`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// RLIMIT_NOFILE in force.
    pub open_files: u64,
    /// The descriptors connections may hold, node-wide: the limit less a reserve.
    pub fd_budget: usize,
    /// Of which one pod's connections may hold at most.
    pub pod_fds: usize,
    /// Connections that have not authenticated yet, node-wide.
    pub unauthenticated: usize,
    /// Connections that have not authenticated yet, from one source address.
    pub unauthenticated_per_source: usize,
    pub handshake_timeout_secs: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Outbound,
    Inbound,
}

/// One proxied connection, as the daemon recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionRecord {
    pub direction: Direction,
    /// The pod (namespace/name) the proxy served this connection for.
    pub pod: String,
    pub source: SocketAddr,
    pub original_destination: SocketAddr,
    /// The source's SPIFFE identity, if it has one (`unknown` for plaintext clients).
    pub source_identity: String,
    /// The destination workload's identity, if the mesh config knows it.
    pub destination_identity: String,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Still open when the record was read.
    pub open: bool,
    /// Istio's response flags: `-`, `DENY` (authorization), `CONNECT` (upstream unreachable).
    pub response_flags: String,
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Enrolled {
        pod: EnrolledPod,
    },
    Disenrolled {
        was_enrolled: bool,
    },
    Checked {
        enrolled: bool,
    },
    /// The pod is not in the mesh (`--enrollment kubernetes`: its labels keep it out), so there
    /// is nothing to do for it.
    NotInMesh {
        reason: String,
    },
    Status(Status),
    Connections {
        connections: Vec<ConnectionRecord>,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "cannot reach the ztunnel daemon at {path}: {source} (is `ztunnel run` running on this node?)"
    )]
    Unreachable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to the ztunnel daemon at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the ztunnel daemon at {path} sent an unreadable response: {source}")]
    Decode {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("the ztunnel daemon refused: {0}")]
    Refused(String),
}

/// Sends one request and waits (at most `timeout`) for the response. A `Response::Error` is
/// returned as `ApiError::Refused`.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, ApiError> {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;

    let io = |source| ApiError::Io {
        path: socket.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| ApiError::Unreachable {
        path: socket.to_owned(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(request).expect("requests always serialize");
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io)?;
    match serde_json::from_str(&answer).map_err(|source| ApiError::Decode {
        path: socket.to_owned(),
        source,
    })? {
        Response::Error { message } => Err(ApiError::Refused(message)),
        response => Ok(response),
    }
}
