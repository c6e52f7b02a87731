//! `/metrics` and `/stats/prometheus`: Istio's TCP metrics under `istio_`, the node's own
//! under `ztunnel_` and the process's under `process_`, read at scrape time from where they
//! already live (the kernel's per-CPU counters, the enrolled pods, the HBONE pool's and
//! servers' open counts, the certificate store, /proc), so nothing is counted twice.

use super::http::{Call, Reply};
use crate::capture::Datapath;
use crate::hbone::OpenCounts;
use crate::hbone::client::Pool;
use crate::identity::CertificateStore;
use crate::pods::PodCounts;
use crate::proxy::LocalPods;
use crate::proxy::admission::Admission;
use crate::telemetry::metrics::TrafficMetrics;
use crate::telemetry::refusals::Refusals;
use crate::xds::client::XdsHandle;
use http::{Method, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

/// The registry behind `/metrics`.
pub(crate) fn registry(traffic: &TrafficMetrics, node: NodeView) -> Registry {
    let mut registry = Registry::default();
    traffic.register(&mut registry);
    registry.register_collector(Box::new(NodeCollector { node }));
    registry
}

/// `/metrics` and `/stats/prometheus`.
pub(crate) fn handle(registry: &Registry, call: &Call) -> Reply {
    match (&call.method, call.path.as_str()) {
        (&Method::GET, "/metrics" | "/stats/prometheus") => Reply {
            status: StatusCode::OK,
            content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body: render(registry),
        },
        _ => Reply::not_found(call),
    }
}

/// The Prometheus text exposition of `registry`.
fn render(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    text
}

/// The node's state the metrics read at each scrape, where it already lives.
pub(crate) struct NodeView {
    pub(crate) datapath: Arc<Datapath>,
    pub(crate) local_pods: Arc<LocalPods>,
    pub(crate) pool: Arc<Pool>,
    pub(crate) hbone_server: Arc<OpenCounts>,
    pub(crate) certificates: Arc<CertificateStore>,
    pub(crate) refusals: Arc<Refusals>,
    pub(crate) pods: Arc<PodCounts>,
    pub(crate) admission: Arc<Admission>,
    /// The xDS client's state, when istiod feeds the mesh.
    pub(crate) xds: Option<XdsHandle>,
}

/// Reads the node's state at each scrape.
struct NodeCollector {
    node: NodeView,
}

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeCollector")
    }
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let node = &self.node;
        let mut events = encoder.encode_descriptor(
            "ztunnel_datapath_events",
            "Decisions of the eBPF programs, summed over CPUs: captures, each bypass reason, original-destination misses, inbound steers and refusals",
            None,
            MetricType::Counter,
        )?;
        for (counter, value) in node.datapath.counters() {
            ConstCounter::new(value).encode(events.encode_family(&[("event", counter.name())])?)?;
        }
        gauge(
            &mut encoder,
            "ztunnel_enrolled_pods",
            "Pods whose traffic this node's proxy captures",
            node.local_pods.count() as i64,
        )?;
        let (client, server) = (node.pool.counts(), &node.hbone_server);
        let hbone = [
            ("client", "connections", client.connections()),
            ("client", "streams", client.streams()),
            ("server", "connections", server.connections()),
            ("server", "streams", server.streams()),
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
        let mut refused = encoder.encode_descriptor(
            "ztunnel_connections_refused",
            "Connections the proxy refused before serving them, by reason",
            None,
            MetricType::Counter,
        )?;
        for (reason, count) in node.refusals.counts() {
            ConstCounter::new(count).encode(refused.encode_family(&[("reason", reason)])?)?;
        }
        let admission = &node.admission;
        let limits = admission.limits();
        let mut descriptors = encoder.encode_descriptor(
            "ztunnel_file_descriptors",
            "The node's descriptor budget for connections (RLIMIT_NOFILE less a reserve) and what the open connections are charged",
            None,
            MetricType::Gauge,
        )?;
        for (kind, count) in [("budget", limits.fd_budget), ("charged", admission.used())] {
            ConstGauge::new(count as i64).encode(descriptors.encode_family(&[("kind", kind)])?)?;
        }
        ConstGauge::new(admission.unauthenticated() as i64).encode(encoder.encode_descriptor(
            "ztunnel_unauthenticated_connections",
            "HBONE connections whose handshakes are not done yet",
            None,
            MetricType::Gauge,
        )?)?;
        let mut pods = encoder.encode_descriptor(
            "ztunnel_pods",
            "Captured pods: served, or waiting (captured, their connections refused) while taking them over fails",
            None,
            MetricType::Gauge,
        )?;
        for (state, count) in [
            ("serving", node.pods.serving()),
            ("waiting", node.pods.waiting()),
        ] {
            ConstGauge::new(count as i64).encode(pods.encode_family(&[("state", state)])?)?;
        }
        let mut expiry = encoder.encode_descriptor(
            "ztunnel_certificate_expiration_timestamp_seconds",
            "When each workload certificate the proxy holds expires (Unix time)",
            None,
            MetricType::Gauge,
        )?;
        for (identity, not_after) in node.certificates.expiries() {
            let seconds = not_after
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            ConstGauge::new(seconds as i64)
                .encode(expiry.encode_family(&[("identity", identity.to_string())])?)?;
        }
        if let Some(xds) = &node.xds {
            let status = xds.status();
            gauge(
                &mut encoder,
                "ztunnel_xds_connected",
                "Whether a stream to istiod is open (1) or not (0)",
                i64::from(status.connected),
            )?;
            ConstCounter::new(status.attempts).encode(encoder.encode_descriptor(
                "ztunnel_xds_stream_openings",
                "Streams to istiod tried since the start",
                None,
                MetricType::Counter,
            )?)?;
            let mut held = encoder.encode_descriptor(
                "ztunnel_xds_resources",
                "Resources held and accepted from istiod, by type",
                None,
                MetricType::Gauge,
            )?;
            for held_type in &status.types {
                ConstGauge::new(held_type.resources as i64)
                    .encode(held.encode_family(&[("type_url", held_type.type_url.as_str())])?)?;
            }
        }
        if let Some(process) = crate::host::process::sample() {
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
