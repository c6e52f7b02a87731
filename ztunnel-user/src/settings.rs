//! What the daemon runs with: one `Settings`, built once from the command line, where every
//! flag can also come from an environment variable (the way Istio's ztunnel is configured, and
//! what a DaemonSet's `env` sets), shared as `Arc<Settings>`, logged at start and shown in
//! `/config_dump`. Names are Istio's where Istio's ztunnel has the same setting (`NODE_NAME`,
//! `TRUST_DOMAIN`, `PACKET_MARK`, `LOCAL_XDS_PATH`, `XDS_ADDRESS`, ...), else `ZTUNNEL_<FLAG>`.
//!
//! This module depends on no other of the crate, so that every part may read the settings.

use clap::{Args, ValueEnum};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use ztunnel_common::maps;

/// The control API's socket, for the CNI plugin and the lab's tests. Not Istio's
/// `/var/run/ztunnel/ztunnel.sock`: istio-cni's node agent binds that path for ZDS (and removes
/// what is there), so on a node with istio-cni the two would take each other's socket.
pub const DEFAULT_API_SOCKET: &str = "/var/run/ztunnel/api.sock";
/// The enrolled pods' records (tmpfs, like bpffs: a reboot clears both together).
pub const DEFAULT_STATE_DIR: &str = "/var/run/ztunnel/state";
/// The trust domain of identities nothing else names.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:15020";
pub const DEFAULT_READINESS_ADDR: &str = "0.0.0.0:15021";
/// Where Istio's DaemonSet mounts istiod's root certificate and the proxy's token.
pub const DEFAULT_ISTIOD_ROOT: &str = "/var/run/secrets/istio/root-cert.pem";
pub const DEFAULT_AUTH_TOKEN: &str = "/var/run/secrets/tokens/istio-token";

/// `ztunnel run`'s settings.
#[derive(Args, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// Name of this node: the mesh config's workloads with this `node` are served here.
    #[arg(long, env = "NODE_NAME", default_value = "node")]
    pub node: String,
    /// The network this node's pods are on (Istio's `NETWORK`; empty: the default network).
    /// A workload on another network is reached through its network's gateway.
    #[arg(long, env = "NETWORK", default_value = "")]
    pub network: String,
    /// Unix socket for the CNI plugin and the CLI.
    #[arg(long, env = "ZTUNNEL_API_SOCKET", default_value = DEFAULT_API_SOCKET)]
    pub api_socket: PathBuf,
    /// The cgroup-v2 directory under which the kubelet creates pod cgroups [default: its
    /// `kubepods.slice` (systemd driver) or `kubepods` (cgroupfs driver) below wherever cgroup
    /// v2 is mounted]. `/config_dump` shows the one in use.
    #[arg(long, env = "ZTUNNEL_CGROUP_ROOT", value_name = "DIR")]
    pub cgroup_root: Option<PathBuf>,
    /// bpffs directory for this daemon's maps and links.
    #[arg(long, env = "ZTUNNEL_BPFFS", default_value = "/sys/fs/bpf/ztunnel")]
    pub bpffs: PathBuf,
    /// Directory of the enrolled pods' records, from which a restarted daemon takes over the
    /// pods its previous run captured.
    #[arg(long, env = "ZTUNNEL_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// How pods' traffic is captured: eBPF (the product), or iptables REDIRECT rules in each
    /// pod's netns (the baseline benchmarks compare eBPF with).
    #[arg(long, env = "ZTUNNEL_CAPTURE", value_enum, default_value_t = CaptureMode::Ebpf)]
    pub capture: CaptureMode,
    /// SO_MARK on every proxy socket; capture skips sockets carrying it.
    #[arg(long, env = "PACKET_MARK", default_value_t = ztunnel_common::ports::DEFAULT_MARK)]
    pub mark: u32,
    /// Destinations never captured (repeatable; comma-separated in the variable), e.g. the
    /// API server's address.
    #[arg(
        long = "exclude-cidr",
        env = "ZTUNNEL_EXCLUDE_CIDRS",
        value_name = "CIDR",
        value_delimiter = ','
    )]
    pub exclude_cidrs: Vec<IpNet>,
    /// Destination ports never captured outbound (repeatable; comma-separated in the
    /// variable).
    #[arg(
        long = "exclude-port",
        env = "ZTUNNEL_EXCLUDE_PORTS",
        value_name = "PORT",
        value_delimiter = ','
    )]
    pub exclude_ports: Vec<u16>,
    /// Pod ports never captured inbound (repeatable; comma-separated in the variable).
    #[arg(
        long = "exclude-inbound-port",
        env = "ZTUNNEL_EXCLUDE_INBOUND_PORTS",
        value_name = "PORT",
        value_delimiter = ','
    )]
    pub exclude_inbound_ports: Vec<u16>,
    /// Which pods are captured: every pod the CNI plugin is called for (`cni`), or, as Istio's
    /// ambient mode does, those of namespaces (or pods) labelled
    /// `istio.io/dataplane-mode=ambient` in the Kubernetes API (`kubernetes`), which also
    /// enrolls and releases running pods as labels change and annotates captured pods
    /// `ambient.istio.io/redirection: enabled` for istiod.
    #[arg(long, env = "ZTUNNEL_ENROLLMENT", value_enum, default_value_t = Enrollment::Cni)]
    pub enrollment: Enrollment,
    /// The Kubernetes API for `--enrollment kubernetes` [default: the cluster the daemon's pod
    /// runs in, by its service account].
    #[arg(long, env = "KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Mesh config (workloads, services, policies in Istio ztunnel's local config shape).
    /// Without it, every destination is outside the mesh and pods get their namespace's
    /// `default` identity.
    #[arg(long, env = "LOCAL_XDS_PATH", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Trust domain of this node's workloads (for pods the mesh config does not list).
    #[arg(long, env = "TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Directory of the built-in CA: its root is created there on first start (0700/0600).
    #[arg(long, env = "ZTUNNEL_CA_DIR", default_value = "/var/lib/ztunnel/ca")]
    pub ca_dir: PathBuf,
    /// An operator-given CA certificate (PEM) to issue workload certificates with, so several
    /// nodes share one trust root; needs --ca-key.
    #[arg(long, env = "ZTUNNEL_CA_CERT", requires = "ca_key", value_name = "PEM")]
    pub ca_cert: Option<PathBuf>,
    /// The private key (PEM) of --ca-cert.
    #[arg(long, env = "ZTUNNEL_CA_KEY", requires = "ca_cert", value_name = "PEM")]
    pub ca_key: Option<PathBuf>,
    /// Lifetime of workload certificates, in seconds or as Istio's `SECRET_TTL` gives it
    /// (`24h`, `1h30m`, `90s`); each is renewed at half of it.
    #[arg(
        long,
        env = "SECRET_TTL",
        default_value = "86400",
        value_name = "SECONDS",
        value_parser = seconds_or_duration
    )]
    pub cert_lifetime_secs: u64,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `ztunnel_user=debug`; the admin
    /// API's `/logging` changes it at run time.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,
    /// The admin API (config dump, log level, quit); keep it on localhost.
    #[arg(long, env = "ZTUNNEL_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// Prometheus metrics (`/metrics`, `/stats/prometheus`).
    #[arg(long, env = "ZTUNNEL_METRICS_ADDR", default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    /// Readiness (`/healthz/ready`).
    #[arg(long, env = "ZTUNNEL_READINESS_ADDR", default_value = DEFAULT_READINESS_ADDR)]
    pub readiness_addr: SocketAddr,
    /// Access log lines, one per connection when it ends.
    #[arg(long, env = "ZTUNNEL_ACCESS_LOG_FORMAT", value_enum, default_value_t = AccessLogFormat::Text)]
    pub access_log_format: AccessLogFormat,
    /// Where access log lines go: `-` for standard output, or a file to append to.
    #[arg(
        long,
        env = "ZTUNNEL_ACCESS_LOG",
        default_value = "-",
        value_name = "PATH"
    )]
    pub access_log: AccessLogOutput,
    /// On SIGTERM (or `/quitquitquit`): how long open connections may go on after the
    /// listeners closed and HBONE peers got GOAWAY, before the rest are cut.
    #[arg(
        long,
        env = "ZTUNNEL_DRAIN_TIMEOUT_SECS",
        default_value_t = 10,
        value_name = "SECONDS"
    )]
    pub drain_timeout_secs: u64,
    /// The eBPF programs' capture decisions as debug lines in this log (target
    /// `ztunnel_ebpf`). Off, the kernel's verifier removes their logging code at load.
    #[arg(long, env = "ZTUNNEL_EBPF_LOG", value_parser = clap::builder::BoolishValueParser::new())]
    pub ebpf_log: bool,
    /// How long a connection may take to authenticate: HBONE's TLS and HTTP/2 handshakes, as
    /// server and as client (and the CONNECT's answer, a few seconds more), and an HTTP
    /// endpoint's client to send a request's headers (or, between requests, the next one).
    #[arg(
        long,
        env = "ZTUNNEL_HANDSHAKE_TIMEOUT_SECS",
        default_value_t = 10,
        value_name = "SECONDS"
    )]
    pub handshake_timeout_secs: u64,
    /// Connections that have not authenticated yet (HBONE before its handshakes are done),
    /// node-wide; never more than half the descriptor budget.
    #[arg(long, env = "ZTUNNEL_MAX_UNAUTHENTICATED", default_value_t = 1024)]
    pub max_unauthenticated: usize,
    /// Connections that have not authenticated yet from one source address.
    #[arg(
        long,
        env = "ZTUNNEL_MAX_UNAUTHENTICATED_PER_SOURCE",
        default_value_t = 128
    )]
    pub max_unauthenticated_per_source: usize,
    /// The largest share of the node's descriptor budget (RLIMIT_NOFILE less a reserve)
    /// that one pod's connections may hold, in percent.
    #[arg(
        long,
        env = "ZTUNNEL_POD_SHARE_PERCENT",
        default_value_t = 50,
        value_parser = clap::value_parser!(u8).range(1..=100),
        value_name = "PERCENT"
    )]
    pub pod_share_percent: u8,
    /// Pods this node can enroll (`ZT_PODS`, and twice as many addresses in
    /// `ZT_INBOUND_LISTENERS`). Beyond it an enrollment fails (the runtime retries the CNI
    /// ADD).
    #[arg(
        long = flags::MAX_PODS,
        env = flags::MAX_PODS_ENV,
        default_value_t = maps::MAX_PODS,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(u32::MAX / 2)),
        value_name = "PODS"
    )]
    pub max_pods: u32,
    /// Addresses of the mesh's workloads, on every node, the kernel can hold (`ZT_WORKLOADS`,
    /// preallocated: its kernel memory is taken whole at start). Beyond it a new mesh config
    /// is refused and the one in force stays.
    #[arg(
        long = flags::MAX_WORKLOAD_ADDRESSES,
        env = flags::MAX_WORKLOAD_ADDRESSES_ENV,
        default_value_t = maps::MAX_WORKLOAD_ADDRESSES,
        value_parser = clap::value_parser!(u32).range(1..),
        value_name = "ADDRESSES"
    )]
    pub max_workload_addresses: u32,
    /// Plaintext rules the kernel can hold (`ZT_PLAINTEXT_RULES`: what this node's workloads'
    /// policies decide for clients without an identity). Beyond it the proxy alone enforces
    /// the policies.
    #[arg(
        long = flags::MAX_PLAINTEXT_RULES,
        env = flags::MAX_PLAINTEXT_RULES_ENV,
        default_value_t = maps::MAX_PLAINTEXT_RULES,
        value_parser = clap::value_parser!(u32).range(1..),
        value_name = "RULES"
    )]
    pub max_plaintext_rules: u32,
    #[command(flatten)]
    pub istiod: IstiodSettings,
}

/// The flags (and variables) that size the kernel maps: the errors of a full map name them.
pub mod flags {
    pub const MAX_PODS: &str = "max-pods";
    pub const MAX_PODS_ENV: &str = "ZTUNNEL_MAX_PODS";
    pub const MAX_WORKLOAD_ADDRESSES: &str = "max-workload-addresses";
    pub const MAX_WORKLOAD_ADDRESSES_ENV: &str = "ZTUNNEL_MAX_WORKLOAD_ADDRESSES";
    pub const MAX_PLAINTEXT_RULES: &str = "max-plaintext-rules";
    pub const MAX_PLAINTEXT_RULES_ENV: &str = "ZTUNNEL_MAX_PLAINTEXT_RULES";
}

/// A kernel map whose capacity is a setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapCapacity {
    pub map: &'static str,
    pub entries: u32,
    /// The setting's flag (without `--`) and variable.
    pub flag: &'static str,
    pub env: &'static str,
}

impl Settings {
    /// The maps the settings size, with their capacities.
    pub fn map_capacities(&self) -> [MapCapacity; 4] {
        let pods = |map, entries| MapCapacity {
            map,
            entries,
            flag: flags::MAX_PODS,
            env: flags::MAX_PODS_ENV,
        };
        [
            pods(maps::names::PODS, self.max_pods),
            // An address per family, each with its listener.
            pods(maps::names::INBOUND_LISTENERS, self.max_pods * 2),
            MapCapacity {
                map: maps::names::WORKLOADS,
                entries: self.max_workload_addresses,
                flag: flags::MAX_WORKLOAD_ADDRESSES,
                env: flags::MAX_WORKLOAD_ADDRESSES_ENV,
            },
            MapCapacity {
                map: maps::names::PLAINTEXT_RULES,
                entries: self.max_plaintext_rules,
                flag: flags::MAX_PLAINTEXT_RULES,
                env: flags::MAX_PLAINTEXT_RULES_ENV,
            },
        ]
    }
}

/// How the daemon reaches istiod, and who it says it is there; Istio's ztunnel's variables.
#[derive(Args, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IstiodSettings {
    /// istiod's xDS endpoint (`host:port`, `https://` implied), e.g.
    /// `istiod.istio-system.svc:15012`: workloads, services and policies come from it (with
    /// --config, both feed the mesh). Empty: off.
    #[arg(
        long,
        env = "XDS_ADDRESS",
        default_value = "",
        value_name = "HOST:PORT"
    )]
    pub xds_address: String,
    /// istiod's root certificate: a PEM file's path (the `istio-ca-root-cert` ConfigMap
    /// mounted), or the PEM itself. Read again at each connection to istiod.
    #[arg(long, env = "XDS_ROOT_CA", default_value = DEFAULT_ISTIOD_ROOT, value_name = "PEM")]
    pub xds_root_ca: String,
    /// The name istiod's certificate is checked for, when not the address's host.
    #[arg(long, env = "ALT_XDS_HOSTNAME", value_name = "NAME")]
    pub alt_xds_hostname: Option<String>,
    /// istiod's CA (`host:port`): workload certificates come from it instead of the built-in
    /// CA, each valid for --cert-lifetime-secs. Empty: the built-in CA.
    #[arg(long, env = "CA_ADDRESS", default_value = "", value_name = "HOST:PORT")]
    pub ca_address: String,
    /// The CA's root certificate (a path or the PEM), as --xds-root-ca; also trusted for the
    /// peers' certificates, with the roots the CA sends.
    #[arg(long, env = "CA_ROOT_CA", default_value = DEFAULT_ISTIOD_ROOT, value_name = "PEM")]
    pub ca_root_ca: String,
    /// The name the CA's certificate is checked for, when not the address's host.
    #[arg(long, env = "ALT_CA_HOSTNAME", value_name = "NAME")]
    pub alt_ca_hostname: Option<String>,
    /// The file of the token each request to istiod carries (a projected service-account
    /// token with audience `istio-ca`), read again for each request.
    #[arg(long, env = "AUTH_TOKEN", default_value = DEFAULT_AUTH_TOKEN, value_name = "FILE")]
    pub auth_token: PathBuf,
    /// The cluster's id, sent to istiod (`ISTIO_META_CLUSTER_ID`, if set, wins).
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
    /// This daemon's own pod (downward API), by which istiod knows the proxy.
    #[arg(long, env = "POD_NAME", default_value = "ztunnel")]
    pub pod_name: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    pub pod_namespace: String,
    /// This daemon's pod IP (downward API `status.podIP`).
    #[arg(long, env = "INSTANCE_IP", value_name = "IP")]
    pub instance_ip: Option<std::net::IpAddr>,
}

/// Which pods the daemon captures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Enrollment {
    /// Every pod the CNI plugin is called for, but those of its excluded namespaces.
    Cni,
    /// The pods Istio's ambient mode captures, by the labels in the Kubernetes API.
    Kubernetes,
}

/// How enrolled pods' connections are brought to the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMode {
    /// The eBPF programs on the pod's cgroup and netns (the product).
    Ebpf,
    /// NAT REDIRECT rules in the pod's netns (`iptables`): the baseline eBPF is measured
    /// against.
    Iptables,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    Text,
    Json,
    /// No access log.
    Off,
}

/// Where access log lines go: `-` for standard output, else a file appended to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "PathBuf", into = "PathBuf")]
pub enum AccessLogOutput {
    Stdout,
    File(PathBuf),
}

impl From<PathBuf> for AccessLogOutput {
    fn from(path: PathBuf) -> AccessLogOutput {
        if path.as_os_str() == "-" {
            AccessLogOutput::Stdout
        } else {
            AccessLogOutput::File(path)
        }
    }
}

impl From<AccessLogOutput> for PathBuf {
    fn from(output: AccessLogOutput) -> PathBuf {
        match output {
            AccessLogOutput::Stdout => PathBuf::from("-"),
            AccessLogOutput::File(path) => path,
        }
    }
}

impl std::str::FromStr for AccessLogOutput {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<AccessLogOutput, Self::Err> {
        Ok(PathBuf::from(text).into())
    }
}

/// Why a certificate lifetime is refused.
#[derive(Debug, thiserror::Error)]
enum LifetimeError {
    #[error("{0:?} is neither seconds nor a duration such as 24h or 1h30m")]
    Unreadable(String),
    #[error("{0:?}: a certificate must live more than 0 s")]
    Zero(String),
}

/// Whole seconds, or a Go duration of hours, minutes and seconds (`24h0m0s`, `90m`), as
/// Istio's `SECRET_TTL` is written; more than zero.
fn seconds_or_duration(text: &str) -> Result<u64, LifetimeError> {
    let unreadable = || LifetimeError::Unreadable(text.to_owned());
    let seconds = match text.parse::<u64>() {
        Ok(seconds) => seconds,
        Err(_) => {
            let (mut total, mut number) = (0u64, String::new());
            for c in text.chars() {
                if c.is_ascii_digit() {
                    number.push(c);
                    continue;
                }
                let unit = match c {
                    'h' => 3600,
                    'm' => 60,
                    's' => 1,
                    _ => return Err(unreadable()),
                };
                let value: u64 = number.parse().map_err(|_| unreadable())?;
                total = value
                    .checked_mul(unit)
                    .and_then(|part| total.checked_add(part))
                    .ok_or_else(unreadable)?;
                number.clear();
            }
            if !number.is_empty() {
                return Err(unreadable());
            }
            total
        }
    };
    if seconds == 0 {
        return Err(LifetimeError::Zero(text.to_owned()));
    }
    Ok(seconds)
}

/// The settings `ztunnel run ARGS` gives, for the tests.
#[cfg(test)]
pub(crate) fn parse(args: &[&str]) -> Settings {
    try_parse(args).unwrap()
}

#[cfg(test)]
fn try_parse(args: &[&str]) -> Result<Settings, clap::Error> {
    #[derive(clap::Parser)]
    struct Command {
        #[command(flatten)]
        settings: Settings,
    }
    let argv = std::iter::once("ztunnel").chain(args.iter().copied());
    <Command as clap::Parser>::try_parse_from(argv).map(|command| command.settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_and_round_trip_through_json() {
        let settings = parse(&[
            "--node",
            "node7",
            "--exclude-cidr",
            "10.96.0.0/12",
            "--exclude-cidr",
            "fd00::/8",
            "--capture",
            "iptables",
            "--access-log",
            "/var/log/ztunnel.log",
        ]);
        assert_eq!(settings.node, "node7");
        assert_eq!(settings.exclude_cidrs.len(), 2);
        assert_eq!(settings.capture, CaptureMode::Iptables);
        assert_eq!(
            settings.access_log,
            AccessLogOutput::File("/var/log/ztunnel.log".into())
        );
        let json = serde_json::to_value(&settings).unwrap();
        assert_eq!(json["capture"], "iptables");
        assert_eq!(json["access_log"], "/var/log/ztunnel.log");
        assert_eq!(serde_json::from_value::<Settings>(json).unwrap(), settings);
        assert_eq!(parse(&[]).access_log, AccessLogOutput::Stdout);
    }

    #[test]
    fn map_capacities_default_to_the_programs_own() {
        let capacities = parse(&[]).map_capacities();
        let entries: Vec<(&str, u32)> = capacities.iter().map(|c| (c.map, c.entries)).collect();
        assert_eq!(
            entries,
            [
                (maps::names::PODS, maps::MAX_PODS),
                (maps::names::INBOUND_LISTENERS, maps::MAX_PODS * 2),
                (maps::names::WORKLOADS, maps::MAX_WORKLOAD_ADDRESSES),
                (maps::names::PLAINTEXT_RULES, maps::MAX_PLAINTEXT_RULES),
            ]
        );
        let small = parse(&["--max-workload-addresses", "8"]);
        assert_eq!(small.map_capacities()[2].entries, 8);
        assert!(try_parse(&["--max-pods", "0"]).is_err());
        assert!(try_parse(&["--max-pods", &(u32::MAX / 2 + 1).to_string()]).is_err());
    }

    #[test]
    fn the_certificate_lifetime_is_seconds_or_istios_secret_ttl() {
        let lifetime = |value: &str| try_parse(&["--cert-lifetime-secs", value]);
        for (value, seconds) in [
            ("3600", 3600),
            ("24h0m0s", 86_400),
            ("1h30m", 5400),
            ("90s", 90),
        ] {
            assert_eq!(
                lifetime(value).unwrap().cert_lifetime_secs,
                seconds,
                "{value}"
            );
        }
        for value in ["0", "0h", "24x", "500ms", "h"] {
            assert!(lifetime(value).is_err(), "{value}");
        }
        assert_eq!(parse(&[]).cert_lifetime_secs, 86_400);
    }

    #[test]
    fn a_ca_certificate_needs_its_key() {
        let err = try_parse(&["--ca-cert", "root.pem"]).expect_err("refused");
        assert!(err.to_string().contains("--ca-key"), "{err}");
    }
}
