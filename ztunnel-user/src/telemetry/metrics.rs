//! Istio's TCP metrics, with Istio's names and labels so existing Istio dashboards work,
//! reported by the source's proxy (`reporter="source"`) and by the destination's
//! (`reporter="destination"`) as connections open and close.

use super::labels::{ResponseFlags, TrafficLabels};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Istio's TCP metrics, recorded by `connections` as connections open and close.
#[derive(Default)]
pub(crate) struct TrafficMetrics {
    /// Every label set in use, once: connections between the same workloads share theirs
    /// (as many as the metrics have series), with what keeps its series.
    label_sets: Mutex<HashMap<Arc<TrafficLabels>, Usage>>,
    opened: Family<TrafficLabels, Counter>,
    closed: Family<TrafficLabels, Counter>,
    /// Bytes from the source to the destination (Istio: received by the destination).
    received_bytes: Family<TrafficLabels, Counter>,
    /// Bytes from the destination back to the source.
    sent_bytes: Family<TrafficLabels, Counter>,
    /// Access log lines dropped because the writer could not keep up.
    pub access_log_dropped: Counter,
}

/// What keeps a label set's series: the local pods whose connections had it (most often
/// one), and its connections still open. With neither, the series go: pods come and go, and a
/// node must not keep the counters of every pod it ever ran.
struct Usage {
    /// The shared copy, also the map's key.
    labels: Arc<TrafficLabels>,
    pods: Vec<Arc<str>>,
    open: u32,
}

impl TrafficMetrics {
    /// A connection of the local `pod` opened: the shared copy of its `labels`, counted.
    pub(crate) fn opened(&self, pod: &Arc<str>, labels: TrafficLabels) -> Arc<TrafficLabels> {
        let mut sets = self.lock();
        // One lookup for a label set in use (almost every connection), two for a new one.
        let usage = match sets.get_mut(&labels) {
            Some(usage) => usage,
            None => {
                let shared = Arc::new(labels);
                sets.entry(shared.clone()).or_insert(Usage {
                    labels: shared,
                    pods: Vec::new(),
                    open: 0,
                })
            }
        };
        usage.open += 1;
        let shared = usage.labels.clone();
        if !usage.pods.contains(pod) {
            usage.pods.push(pod.clone());
        }
        drop(sets);
        self.opened.get_or_create(&shared).inc();
        shared
    }

    /// A connection with the shared `labels` ended with `flags`: `to_destination` and
    /// `to_source` bytes went each way.
    pub(crate) fn closed(
        &self,
        labels: &Arc<TrafficLabels>,
        flags: ResponseFlags,
        to_destination: u64,
        to_source: u64,
    ) {
        let flagged;
        let series: &TrafficLabels = match flags {
            ResponseFlags::None => labels,
            other => {
                flagged = labels.with_flags(other);
                &flagged
            }
        };
        self.closed.get_or_create(series).inc();
        self.received_bytes
            .get_or_create(series)
            .inc_by(to_destination);
        self.sent_bytes.get_or_create(series).inc_by(to_source);
        let mut sets = self.lock();
        if let Some(usage) = sets.get_mut(labels) {
            usage.open = usage.open.saturating_sub(1);
            if usage.pods.is_empty() && usage.open == 0 {
                sets.remove(labels);
                self.remove_series(labels);
            }
        }
    }

    /// `pod` left the node: the series only it kept go now, or as their last connection
    /// closes.
    pub(crate) fn forget_pod(&self, pod: &str) {
        let mut sets = self.lock();
        sets.retain(|labels, usage| {
            usage.pods.retain(|p| &**p != pod);
            let kept = !usage.pods.is_empty() || usage.open > 0;
            if !kept {
                self.remove_series(labels);
            }
            kept
        });
    }

    fn remove_series(&self, labels: &TrafficLabels) {
        self.opened.remove(labels);
        for flags in ResponseFlags::ALL {
            let flagged = labels.with_flags(flags);
            for family in [&self.closed, &self.received_bytes, &self.sent_bytes] {
                family.remove(&flagged);
            }
        }
    }

    /// How many label sets are kept.
    #[cfg(test)]
    fn label_sets(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<TrafficLabels>, Usage>> {
        self.label_sets.lock().unwrap_or_else(|p| p.into_inner())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::labels::{Described, Observed, Reporter};

    fn labels(source: &str) -> TrafficLabels {
        TrafficLabels::new(&Observed {
            reporter: Reporter::Source,
            source: Some(Described {
                name: source,
                namespace: "demo",
                workload: None,
            }),
            source_identity: None,
            destination: None,
            destination_identity: None,
            service: None,
            mutual_tls: false,
        })
    }

    fn exposed(metrics: &TrafficMetrics) -> String {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    #[test]
    fn the_series_of_a_pod_that_left_go_once_its_connections_closed() {
        let metrics = TrafficMetrics::default();
        let (a1, b1): (Arc<str>, Arc<str>) = ("demo/a1".into(), "demo/b1".into());
        let open = metrics.opened(&a1, labels("a1"));
        let closed = metrics.opened(&a1, labels("a1"));
        assert!(Arc::ptr_eq(&open, &closed));
        metrics.closed(&closed, ResponseFlags::Denied, 1, 2);
        let other = metrics.opened(&b1, labels("b1"));
        metrics.closed(&other, ResponseFlags::None, 3, 4);
        assert_eq!(metrics.label_sets(), 2);

        // a1 leaves with a connection still open: its series stay until that one closes.
        metrics.forget_pod("demo/a1");
        assert!(exposed(&metrics).contains("source_workload=\"a1\""));
        metrics.closed(&open, ResponseFlags::None, 5, 6);
        let text = exposed(&metrics);
        assert!(!text.contains("source_workload=\"a1\""), "{text}");
        assert!(text.contains("source_workload=\"b1\""), "{text}");
        assert_eq!(metrics.label_sets(), 1);
    }
}
