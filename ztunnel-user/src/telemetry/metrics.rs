//! Istio's TCP metrics, with Istio's names and labels so existing Istio dashboards work,
//! reported by the source's proxy (`reporter="source"`) and by the destination's
//! (`reporter="destination"`) as connections open and close.

use super::labels::TrafficLabels;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// Istio's TCP metrics, recorded by `connections` as connections open and close.
#[derive(Default)]
pub(crate) struct TrafficMetrics {
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
    pub(crate) fn intern(&self, labels: TrafficLabels) -> Arc<TrafficLabels> {
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

    pub(crate) fn opened(&self, labels: &TrafficLabels) {
        self.opened.get_or_create(labels).inc();
    }

    /// A connection ended: `to_destination` and `to_source` bytes went each way.
    pub(crate) fn closed(&self, labels: &TrafficLabels, to_destination: u64, to_source: u64) {
        self.closed.get_or_create(labels).inc();
        self.received_bytes
            .get_or_create(labels)
            .inc_by(to_destination);
        self.sent_bytes.get_or_create(labels).inc_by(to_source);
    }

    /// Registers the metrics under Istio's names: `istio_tcp_*` and the access log's drops.
    pub(crate) fn register(&self, registry: &mut Registry) {
        let istio = registry.sub_registry_with_prefix("istio");
        let families = [
            (
                "tcp_connections_opened",
                "The total number of TCP connections opened",
                &self.opened,
            ),
            (
                "tcp_connections_closed",
                "The total number of TCP connections closed",
                &self.closed,
            ),
            (
                "tcp_received_bytes",
                "The total bytes the destination received from the source over TCP connections",
                &self.received_bytes,
            ),
            (
                "tcp_sent_bytes",
                "The total bytes the destination sent back to the source over TCP connections",
                &self.sent_bytes,
            ),
        ];
        for (name, help, family) in families {
            istio.register(name, help, family.clone());
        }
        registry.register(
            "ztunnel_access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            self.access_log_dropped.clone(),
        );
    }
}
