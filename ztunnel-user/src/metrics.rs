//! Prometheus metrics: Istio's TCP metrics, with Istio's names and labels so existing Istio
//! dashboards work, reported by the source's proxy (`reporter="source"`) and by the
//! destination's (`reporter="destination"`); and the node's own state, read at scrape time:
//! the kernel programs' counters, enrolled pods, HBONE connections and streams, certificate
//! expiry, and the process.

use crate::config::{Service, Workload};
use crate::identity::Identity;
use crate::proxy::ProxyContext;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::UNIX_EPOCH;

/// The value of an unknown label, as Istio writes it.
const UNKNOWN: &str = "unknown";

/// Istio's TCP metrics, recorded by `connections` as connections open and close.
#[derive(Default)]
pub struct TrafficMetrics {
    /// Every label set in use, once: connections between the same workloads share theirs
    /// (as many as the metrics have series).
    label_sets: Mutex<HashSet<Arc<TrafficLabels>>>,
    opened: Family<TrafficLabels, Counter>,
    closed: Family<TrafficLabels, Counter>,
    /// Bytes from the source to the destination (Istio: received by the destination).
    received_bytes: Family<TrafficLabels, Counter>,
    /// Bytes from the destination back to the source.
    sent_bytes: Family<TrafficLabels, Counter>,
    /// Access log lines dropped because the writer could not keep up.
    pub access_log_dropped: Counter,
}

impl TrafficMetrics {
    /// The shared copy of `labels`.
    pub fn intern(&self, labels: TrafficLabels) -> Arc<TrafficLabels> {
        let mut sets = self.label_sets.lock().unwrap_or_else(|p| p.into_inner());
        match sets.get(&labels) {
            Some(shared) => shared.clone(),
            None => {
                let shared = Arc::new(labels);
                sets.insert(shared.clone());
                shared
            }
        }
    }

    pub fn opened(&self, labels: &TrafficLabels) {
        self.opened.get_or_create(labels).inc();
    }

    /// A connection ended: `to_destination` and `to_source` bytes went each way.
    pub fn closed(&self, labels: &TrafficLabels, to_destination: u64, to_source: u64) {
        self.closed.get_or_create(labels).inc();
        self.received_bytes
            .get_or_create(labels)
            .inc_by(to_destination);
        self.sent_bytes.get_or_create(labels).inc_by(to_source);
    }
}

/// Which side's proxy reports a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    Source,
    Destination,
}

/// Istio's `response_flags`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResponseFlags {
    None,
    /// Authorization denied the connection.
    Denied,
    /// The upstream could not be reached.
    ConnectFailed,
}

/// Istio's standard TCP metric labels (less locality, which this proxy does not know).
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TrafficLabels {
    reporter: &'static str,
    source_workload: String,
    source_canonical_service: String,
    source_canonical_revision: String,
    source_workload_namespace: String,
    source_principal: String,
    source_app: String,
    source_version: String,
    source_cluster: String,
    destination_service: String,
    destination_service_namespace: String,
    destination_service_name: String,
    destination_workload: String,
    destination_canonical_service: String,
    destination_canonical_revision: String,
    destination_workload_namespace: String,
    destination_principal: String,
    destination_app: String,
    destination_version: String,
    destination_cluster: String,
    request_protocol: &'static str,
    response_flags: &'static str,
    connection_security_policy: &'static str,
}

/// A workload as the labels describe it: from its mesh config entry, or (for an enrolled pod
/// the config does not list) just its name and namespace.
pub struct Described<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub workload: Option<&'a Workload>,
}

impl<'a> From<&'a Workload> for Described<'a> {
    fn from(workload: &'a Workload) -> Self {
        Described {
            name: &workload.name,
            namespace: &workload.namespace,
            workload: Some(workload),
        }
    }
}

/// The labels of one side: workload, canonical service, revision, namespace, cluster.
struct SideLabels {
    workload: String,
    canonical_service: String,
    canonical_revision: String,
    namespace: String,
    cluster: String,
}

impl SideLabels {
    fn of(side: Option<&Described>) -> SideLabels {
        let Some(side) = side else {
            return SideLabels {
                workload: UNKNOWN.into(),
                canonical_service: UNKNOWN.into(),
                canonical_revision: UNKNOWN.into(),
                namespace: UNKNOWN.into(),
                cluster: UNKNOWN.into(),
            };
        };
        let set = |value: Option<&str>, fallback: &str| {
            value
                .filter(|v| !v.is_empty())
                .unwrap_or(fallback)
                .to_owned()
        };
        let workload = set(side.workload.map(|w| w.workload_name.as_str()), side.name);
        SideLabels {
            canonical_service: set(side.workload.map(|w| w.canonical_name.as_str()), &workload),
            canonical_revision: set(
                side.workload.map(|w| w.canonical_revision.as_str()),
                "latest",
            ),
            namespace: side.namespace.to_owned(),
            cluster: set(side.workload.map(|w| w.cluster_id.as_str()), "Kubernetes"),
            workload,
        }
    }
}

/// What the labels of a connection are made of.
pub struct Observed<'a> {
    pub reporter: Reporter,
    pub source: Option<Described<'a>>,
    /// The identity the source proved (mTLS) or is known by (same node); none for plaintext.
    pub source_identity: Option<&'a Identity>,
    pub destination: Option<Described<'a>>,
    pub destination_identity: Option<&'a Identity>,
    /// The service the client addressed (a VIP), if it did.
    pub service: Option<&'a Service>,
    /// Whether the hop carried mesh identities (HBONE, or the same-node path between two
    /// enrolled pods).
    pub mutual_tls: bool,
}

impl TrafficLabels {
    pub fn new(observed: &Observed) -> TrafficLabels {
        let source = SideLabels::of(observed.source.as_ref());
        let destination = SideLabels::of(observed.destination.as_ref());
        let principal =
            |identity: Option<&Identity>| identity.map_or(UNKNOWN.into(), ToString::to_string);
        let service =
            |field: fn(&Service) -> String| observed.service.map_or(UNKNOWN.into(), field);
        TrafficLabels {
            reporter: match observed.reporter {
                Reporter::Source => "source",
                Reporter::Destination => "destination",
            },
            source_app: source.canonical_service.clone(),
            source_version: source.canonical_revision.clone(),
            source_workload: source.workload,
            source_canonical_service: source.canonical_service,
            source_canonical_revision: source.canonical_revision,
            source_workload_namespace: source.namespace,
            source_principal: principal(observed.source_identity),
            source_cluster: source.cluster,
            destination_service: service(|s| s.hostname.clone()),
            destination_service_namespace: service(|s| s.namespace.clone()),
            destination_service_name: service(|s| s.name.clone()),
            destination_app: destination.canonical_service.clone(),
            destination_version: destination.canonical_revision.clone(),
            destination_workload: destination.workload,
            destination_canonical_service: destination.canonical_service,
            destination_canonical_revision: destination.canonical_revision,
            destination_workload_namespace: destination.namespace,
            destination_principal: principal(observed.destination_identity),
            destination_cluster: destination.cluster,
            request_protocol: "tcp",
            response_flags: ResponseFlags::None.label(),
            connection_security_policy: if observed.mutual_tls {
                "mutual_tls"
            } else {
                UNKNOWN
            },
        }
    }

    /// The same labels with the outcome's flags, for the metrics of a closed connection.
    pub fn with_flags(&self, flags: ResponseFlags) -> TrafficLabels {
        TrafficLabels {
            response_flags: flags.label(),
            ..self.clone()
        }
    }

    pub fn source_workload(&self) -> &str {
        &self.source_workload
    }

    pub fn source_namespace(&self) -> &str {
        &self.source_workload_namespace
    }

    pub fn source_principal(&self) -> &str {
        &self.source_principal
    }

    pub fn destination_workload(&self) -> &str {
        &self.destination_workload
    }

    pub fn destination_namespace(&self) -> &str {
        &self.destination_workload_namespace
    }

    pub fn destination_principal(&self) -> &str {
        &self.destination_principal
    }

    pub fn destination_service(&self) -> &str {
        &self.destination_service
    }
}

impl ResponseFlags {
    pub fn label(self) -> &'static str {
        match self {
            ResponseFlags::None => "-",
            ResponseFlags::Denied => "DENY",
            ResponseFlags::ConnectFailed => "CONNECT",
        }
    }
}

/// The registry behind `/metrics`: Istio's TCP metrics under `istio_`, the node's own under
/// `ztunnel_`, the process's under `process_`.
pub fn registry(ctx: Arc<ProxyContext>) -> Registry {
    let mut registry = Registry::default();
    let traffic = ctx.connections.metrics();
    let istio = registry.sub_registry_with_prefix("istio");
    let families = [
        (
            "tcp_connections_opened",
            "The total number of TCP connections opened",
            &traffic.opened,
        ),
        (
            "tcp_connections_closed",
            "The total number of TCP connections closed",
            &traffic.closed,
        ),
        (
            "tcp_received_bytes",
            "The total bytes the destination received from the source over TCP connections",
            &traffic.received_bytes,
        ),
        (
            "tcp_sent_bytes",
            "The total bytes the destination sent back to the source over TCP connections",
            &traffic.sent_bytes,
        ),
    ];
    for (name, help, family) in families {
        istio.register(name, help, family.clone());
    }
    registry.register(
        "ztunnel_access_log_dropped",
        "Access log lines dropped because the writer fell behind",
        traffic.access_log_dropped.clone(),
    );
    registry.register_collector(Box::new(NodeCollector { ctx }));
    registry
}

/// The Prometheus text exposition of `registry`.
pub fn render(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    text
}

/// Reads the node's state at each scrape.
struct NodeCollector {
    ctx: Arc<ProxyContext>,
}

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeCollector")
    }
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let ctx = &self.ctx;
        let mut events = encoder.encode_descriptor(
            "ztunnel_datapath_events",
            "Decisions of the eBPF programs, summed over CPUs: captures, each bypass reason, original-destination misses, inbound steers and refusals",
            None,
            MetricType::Counter,
        )?;
        for (counter, value) in ctx.datapath.counters() {
            ConstCounter::new(value).encode(events.encode_family(&[("event", counter.name())])?)?;
        }
        gauge(
            &mut encoder,
            "ztunnel_enrolled_pods",
            "Pods whose traffic this node's proxy captures",
            ctx.enrolled_pods() as i64,
        )?;
        let pool = ctx.pool.counts();
        let hbone = [
            ("client", "connections", pool.connections),
            ("client", "streams", pool.streams),
            ("server", "connections", ctx.hbone_connections.count()),
            ("server", "streams", ctx.hbone_streams.count()),
        ];
        let mut open = encoder.encode_descriptor(
            "ztunnel_hbone_open",
            "Open HBONE connections and CONNECT streams, as client (pooled, to other nodes) and as server (on pods' 15008)",
            None,
            MetricType::Gauge,
        )?;
        for (side, kind, count) in hbone {
            ConstGauge::new(count as i64)
                .encode(open.encode_family(&[("side", side), ("kind", kind)])?)?;
        }
        let mut expiry = encoder.encode_descriptor(
            "ztunnel_certificate_expiration_timestamp_seconds",
            "When each workload certificate the proxy holds expires (Unix time)",
            None,
            MetricType::Gauge,
        )?;
        for (identity, not_after) in ctx.tls.store.expiries() {
            let seconds = not_after
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            ConstGauge::new(seconds as i64)
                .encode(expiry.encode_family(&[("identity", identity.to_string())])?)?;
        }
        if let Some(process) = crate::process::sample() {
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                process.resident_bytes as i64,
            )?;
            gauge(
                &mut encoder,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                process.virtual_bytes as i64,
            )?;
            gauge(
                &mut encoder,
                "process_open_fds",
                "Open file descriptors",
                process.open_fds as i64,
            )?;
            gauge(
                &mut encoder,
                "process_threads",
                "Threads of the process",
                process.threads as i64,
            )?;
            let cpu = encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(process.cpu_seconds).encode(cpu)?;
            gauge(
                &mut encoder,
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch, in seconds",
                process.start_time_seconds as i64,
            )?;
        }
        Ok(())
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(metric)
}
