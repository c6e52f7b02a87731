//! The chained CNI plugin (spec 1.0): parsing, results and errors.
//!
//! The plugin runs after an IP-assigning plugin (such as `ptp`) and asks the ztunnel daemon to
//! capture the pod before the runtime starts it. [`run`] is the whole plugin minus the process
//! plumbing, which lives in the `ztunnel-cni` binary.

use crate::api::{self, ApiError, PodSpec, Request, Response};
use crate::settings::DEFAULT_API_SOCKET;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::io::{self, Read};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;
use tracing::{info, warn};

/// The CNI spec version this plugin implements.
pub(crate) const CNI_VERSION: &str = "1.0.0";

/// Config versions the plugin accepts. They all share the result shape the plugin reads.
pub(crate) const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

pub(crate) const DEFAULT_TIMEOUT_SECONDS: f64 = 30.0;
pub(crate) const DEFAULT_EXCLUDED_NAMESPACES: [&str; 1] = ["kube-system"];

/// Everything that makes the plugin fail, with the CNI error code each maps to.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("cniVersion {0:?} is not supported; supported versions are {SUPPORTED_VERSIONS:?}")]
    UnsupportedVersion(String),
    #[error("CHECK is not defined for cniVersion {0} (it needs 0.4.0 or later)")]
    CheckNotAllowed(String),
    #[error("the runtime did not set {0}")]
    MissingEnv(&'static str),
    #[error("unknown CNI_COMMAND {0:?} (expected ADD, DEL, CHECK or VERSION)")]
    UnknownCommand(String),
    #[error("CNI_ARGS lacks {0}")]
    MissingArg(&'static str),
    #[error("cannot read the network configuration from stdin")]
    Stdin(#[source] io::Error),
    #[error("cannot decode the network configuration")]
    Decode(#[source] serde_json::Error),
    #[error(
        "ztunnel-cni has no prevResult: it must be chained after an IP-assigning plugin such as ptp"
    )]
    NotChained,
    #[error("invalid network configuration: {0}")]
    InvalidConfig(String),
    #[error(
        "cannot reach the ztunnel daemon at {}: the ztunnel daemon must run on this node so that \
         pods never start uncaptured",
        socket.display()
    )]
    DaemonUnreachable { socket: PathBuf, source: io::Error },
    #[error("the ztunnel daemon at {} did not answer within {timeout:?}", socket.display())]
    DaemonTimeout { socket: PathBuf, timeout: Duration },
    #[error("talking to the ztunnel daemon at {} failed", socket.display())]
    DaemonIo { socket: PathBuf, source: io::Error },
    #[error("the ztunnel daemon at {} sent an unreadable response", socket.display())]
    DaemonDecode {
        socket: PathBuf,
        source: serde_json::Error,
    },
    #[error("the ztunnel daemon sent an unexpected response: {0}")]
    UnexpectedResponse(String),
    #[error("the ztunnel daemon refused to {action} pod {pod}")]
    Refused {
        action: &'static str,
        pod: String,
        message: String,
    },
    #[error("pod {0} is not captured by ztunnel")]
    NotCaptured(String),
}

impl CniError {
    /// The CNI error code: the spec's well-known codes, 999 for ztunnel's own failures.
    pub(crate) fn code(&self) -> u32 {
        match self {
            Self::UnsupportedVersion(_) | Self::CheckNotAllowed(_) => 1,
            Self::MissingEnv(_) | Self::UnknownCommand(_) | Self::MissingArg(_) => 4,
            Self::Stdin(_) | Self::DaemonIo { .. } => 5,
            Self::Decode(_) => 6,
            Self::NotChained | Self::InvalidConfig(_) => 7,
            Self::DaemonUnreachable { .. } | Self::DaemonTimeout { .. } => 11,
            Self::DaemonDecode { .. }
            | Self::UnexpectedResponse(_)
            | Self::Refused { .. }
            | Self::NotCaptured(_) => 999,
        }
    }

    /// The error's cause, for the `details` field: messages leave it out so it is not repeated.
    pub fn details(&self) -> Option<String> {
        match self {
            Self::Refused { message, .. } => Some(message.clone()),
            other => std::error::Error::source(other).map(ToString::to_string),
        }
    }
}

/// A failed invocation: the error and the version to report it in.
#[derive(Debug)]
pub struct Failure {
    pub cni_version: String,
    pub error: CniError,
}

impl Failure {
    /// The spec's error object, printed on stdout.
    pub fn to_json(&self) -> Value {
        let mut out = json!({
            "cniVersion": self.cni_version,
            "code": self.error.code(),
            "msg": self.error.to_string(),
        });
        if let Some(details) = self.error.details() {
            out["details"] = details.into();
        }
        out
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Command {
    Add,
    Del,
    Check,
    Version,
}

impl FromStr for Command {
    type Err = CniError;

    fn from_str(s: &str) -> Result<Self, CniError> {
        match s {
            "ADD" => Ok(Self::Add),
            "DEL" => Ok(Self::Del),
            "CHECK" => Ok(Self::Check),
            "VERSION" => Ok(Self::Version),
            other => Err(CniError::UnknownCommand(other.to_owned())),
        }
    }
}

/// The plugin's network configuration: the keys it reads, with defaults applied.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct NetConf {
    pub cni_version: String,
    pub api_socket: PathBuf,
    pub exclude_namespaces: Vec<String>,
    pub timeout: Duration,
    /// The previous plugin's result; `None` when absent or null.
    pub prev_result: Option<Value>,
}

/// The configuration as written; other plugins' keys are ignored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawNetConf {
    cni_version: String,
    api_socket: Option<PathBuf>,
    exclude_namespaces: Option<Vec<String>>,
    timeout_seconds: Option<f64>,
    prev_result: Option<Value>,
}

impl NetConf {
    pub(crate) fn parse(input: &[u8]) -> Result<Self, CniError> {
        let raw: RawNetConf = serde_json::from_slice(input).map_err(CniError::Decode)?;
        if !SUPPORTED_VERSIONS.contains(&raw.cni_version.as_str()) {
            return Err(CniError::UnsupportedVersion(raw.cni_version));
        }
        let seconds = raw.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS);
        // A zero timeout would make every socket operation fail, so it is as invalid as a negative.
        let timeout = Duration::try_from_secs_f64(seconds)
            .ok()
            .filter(|timeout| !timeout.is_zero())
            .ok_or_else(|| {
                CniError::InvalidConfig(format!(
                    "timeoutSeconds must be a positive number, not {seconds}"
                ))
            })?;
        Ok(Self {
            cni_version: raw.cni_version,
            api_socket: raw.api_socket.unwrap_or_else(|| DEFAULT_API_SOCKET.into()),
            exclude_namespaces: raw.exclude_namespaces.unwrap_or_else(|| {
                DEFAULT_EXCLUDED_NAMESPACES
                    .iter()
                    .map(|ns| ns.to_string())
                    .collect()
            }),
            timeout,
            prev_result: raw.prev_result,
        })
    }

    pub(crate) fn excludes(&self, namespace: &str) -> bool {
        self.exclude_namespaces.iter().any(|ns| ns == namespace)
    }

    /// The previous result, which a chained plugin cannot do without.
    fn prev_result(&self) -> Result<&Map<String, Value>, CniError> {
        match &self.prev_result {
            None => Err(CniError::NotChained),
            Some(Value::Object(result)) => Ok(result),
            Some(_) => Err(CniError::InvalidConfig(
                "prevResult is not an object".into(),
            )),
        }
    }

    /// ADD's output: the previous result unchanged, in the config's version.
    fn chained_result(&self) -> Result<Value, CniError> {
        let mut result = self.prev_result()?.clone();
        result.insert("cniVersion".into(), self.cni_version.clone().into());
        Ok(Value::Object(result))
    }
}

/// The pod identity Kubernetes runtimes pass in `CNI_ARGS`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct PodArgs {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub uid: Option<String>,
}

impl PodArgs {
    /// Parses `K=V;K=V`. Keys the plugin does not know, and malformed or empty pairs, are ignored
    /// rather than rejected: they are meant for other plugins in the chain.
    pub(crate) fn parse(cni_args: &str) -> Self {
        let mut args = Self::default();
        for (key, value) in cni_args.split(';').filter_map(|pair| pair.split_once('=')) {
            let value = value.trim();
            let slot = match key.trim() {
                "K8S_POD_NAME" => &mut args.name,
                "K8S_POD_NAMESPACE" => &mut args.namespace,
                "K8S_POD_UID" => &mut args.uid,
                _ => continue,
            };
            *slot = Some(value.to_owned()).filter(|value| !value.is_empty());
        }
        args
    }

    fn name(&self) -> Result<&str, CniError> {
        self.name
            .as_deref()
            .ok_or(CniError::MissingArg("K8S_POD_NAME"))
    }

    fn namespace(&self) -> Result<&str, CniError> {
        self.namespace
            .as_deref()
            .ok_or(CniError::MissingArg("K8S_POD_NAMESPACE"))
    }

    fn uid(&self) -> Result<&str, CniError> {
        self.uid
            .as_deref()
            .ok_or(CniError::MissingArg("K8S_POD_UID"))
    }
}

/// The pod's addresses from a previous result: `ips[].address` holds CIDRs in every supported
/// version.
pub(crate) fn pod_ips(prev_result: &Map<String, Value>) -> Result<Vec<IpAddr>, CniError> {
    let invalid = |what: String| CniError::InvalidConfig(format!("prevResult {what}"));
    let ips = match prev_result.get("ips") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(ips)) => ips,
        Some(_) => return Err(invalid("ips is not an array".into())),
    };
    let addresses = ips
        .iter()
        .map(|ip| {
            let address = ip["address"]
                .as_str()
                .ok_or_else(|| invalid(format!("ips entry {ip} has no address")))?;
            address
                .parse::<ipnet::IpNet>()
                .map(|net| net.addr())
                .map_err(|_| invalid(format!("address {address:?} is not a CIDR")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if addresses.is_empty() {
        return Err(invalid(
            "has no IP addresses: ztunnel-cni must be chained after an IP-assigning plugin such \
             as ptp"
                .into(),
        ));
    }
    Ok(addresses)
}

/// VERSION's output.
pub(crate) fn version_info() -> Value {
    json!({ "cniVersion": CNI_VERSION, "supportedVersions": SUPPORTED_VERSIONS })
}

/// Runs one invocation. `env` looks up the `CNI_*` variables; `stdin` holds the network
/// configuration. `Ok(Some(_))` is printed on stdout, `Ok(None)` prints nothing.
pub fn run(
    env: impl Fn(&str) -> Option<String>,
    mut stdin: impl Read,
) -> Result<Option<Value>, Failure> {
    let mut input = Vec::new();
    if let Err(error) = stdin.read_to_end(&mut input) {
        return Err(Failure {
            cni_version: CNI_VERSION.into(),
            error: CniError::Stdin(error),
        });
    }
    execute(&env, &input).map_err(|error| Failure {
        cni_version: reply_version(&input),
        error,
    })
}

/// The version to report an error in: the config's, unless it is unreadable or unsupported.
fn reply_version(input: &[u8]) -> String {
    serde_json::from_slice::<Value>(input)
        .ok()
        .and_then(|config| config["cniVersion"].as_str().map(str::to_owned))
        .filter(|version| SUPPORTED_VERSIONS.contains(&version.as_str()))
        .unwrap_or_else(|| CNI_VERSION.into())
}

/// What ADD, DEL and CHECK all read.
struct Invocation {
    conf: NetConf,
    container_id: String,
    args: PodArgs,
}

fn execute(env: &impl Fn(&str) -> Option<String>, input: &[u8]) -> Result<Option<Value>, CniError> {
    let require = |name: &'static str| env(name).ok_or(CniError::MissingEnv(name));
    let invocation = || -> Result<Invocation, CniError> {
        Ok(Invocation {
            conf: NetConf::parse(input)?,
            container_id: require("CNI_CONTAINERID")?,
            args: PodArgs::parse(&env("CNI_ARGS").unwrap_or_default()),
        })
    };
    match require("CNI_COMMAND")?.parse()? {
        Command::Version => Ok(Some(version_info())),
        Command::Add => {
            let invocation = invocation()?;
            add(&invocation, require("CNI_NETNS")?.into()).map(Some)
        }
        Command::Del => del(&invocation()?).map(|()| None),
        Command::Check => {
            let invocation = invocation()?;
            require("CNI_NETNS")?;
            check(&invocation).map(|()| None)
        }
    }
}

fn add(invocation: &Invocation, netns: PathBuf) -> Result<Value, CniError> {
    let Invocation {
        conf,
        container_id,
        args,
    } = invocation;
    let result = conf.chained_result()?;
    let (name, namespace, uid) = (args.name()?, args.namespace()?, args.uid()?);
    if conf.excludes(namespace) {
        info!("pod {namespace}/{name} is in an excluded namespace; not capturing it");
        return Ok(result);
    }
    let pod = PodSpec {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        uid: uid.to_owned(),
        container_id: container_id.clone(),
        netns,
        ips: pod_ips(conf.prev_result()?)?,
    };
    let label = format!("{namespace}/{name}");
    match ask(conf, &Request::Enroll { pod }, "enroll", &label)? {
        Response::Enrolled { .. } => Ok(result),
        Response::NotInMesh { reason } => {
            info!("pod {label} is not in the mesh ({reason}); not capturing it");
            Ok(result)
        }
        other => Err(CniError::UnexpectedResponse(format!("{other:?}"))),
    }
}

fn del(invocation: &Invocation) -> Result<(), CniError> {
    let Invocation {
        conf,
        container_id,
        args,
    } = invocation;
    if let Some(namespace) = &args.namespace
        && conf.excludes(namespace)
    {
        return Ok(());
    }
    let Some(uid) = args.uid.clone() else {
        warn!("CNI_ARGS lacks K8S_POD_UID; nothing to disenroll");
        return Ok(());
    };
    let label = format!("with uid {uid}");
    let request = Request::Disenroll {
        uid,
        container_id: container_id.clone(),
    };
    match ask(conf, &request, "disenroll", &label) {
        Ok(Response::Disenrolled { .. }) => Ok(()),
        Ok(other) => Err(CniError::UnexpectedResponse(format!("{other:?}"))),
        // Failing would block the pod's deletion until the daemon returns; it reconciles its
        // enrollments against the node's pods on its own.
        Err(CniError::DaemonUnreachable { socket, source }) => {
            warn!(
                "cannot reach the ztunnel daemon at {} ({source}); it releases pod {label} when \
                 it reconciles",
                socket.display()
            );
            Ok(())
        }
        Err(error) => Err(error),
    }
}

fn check(invocation: &Invocation) -> Result<(), CniError> {
    let Invocation {
        conf,
        container_id,
        args,
    } = invocation;
    if conf.cni_version.starts_with("0.3.") {
        return Err(CniError::CheckNotAllowed(conf.cni_version.clone()));
    }
    conf.prev_result()?;
    let (name, namespace, uid) = (args.name()?, args.namespace()?, args.uid()?);
    if conf.excludes(namespace) {
        return Ok(());
    }
    let label = format!("{namespace}/{name}");
    let request = Request::Check {
        uid: uid.to_owned(),
        container_id: container_id.clone(),
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    };
    match ask(conf, &request, "check", &label)? {
        Response::Checked { enrolled: true } | Response::NotInMesh { .. } => Ok(()),
        Response::Checked { enrolled: false } => Err(CniError::NotCaptured(label)),
        other => Err(CniError::UnexpectedResponse(format!("{other:?}"))),
    }
}

/// One daemon call; `action` and `pod` only word a refusal.
fn ask(
    conf: &NetConf,
    request: &Request,
    action: &'static str,
    pod: &str,
) -> Result<Response, CniError> {
    api::call(&conf.api_socket, request, conf.timeout)
        .map_err(|error| daemon_error(error, &conf.api_socket, conf.timeout, action, pod))
}

fn daemon_error(
    error: ApiError,
    socket: &Path,
    timeout: Duration,
    action: &'static str,
    pod: &str,
) -> CniError {
    let socket = socket.to_owned();
    match error {
        ApiError::Unreachable { source, .. } => CniError::DaemonUnreachable { socket, source },
        // Socket timeouts surface as EAGAIN; the daemon is up but busy, so a retry may succeed.
        ApiError::Io { source, .. }
            if matches!(
                source.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            CniError::DaemonTimeout { socket, timeout }
        }
        ApiError::Io { source, .. } => CniError::DaemonIo { socket, source },
        ApiError::Decode { source, .. } => CniError::DaemonDecode { socket, source },
        ApiError::Refused(message) => CniError::Refused {
            action,
            pod: pod.to_owned(),
            message,
        },
    }
}

#[cfg(test)]
mod tests;
