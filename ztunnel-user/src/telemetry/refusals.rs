//! Connections the proxy refuses before it serves them, by reason: counted for `/metrics`
//! (`ztunnel_connections_refused_total{reason}`), and logged at most once per interval for
//! each reason, with how many were refused since the last line, so that a flood of them
//! cannot flood the log.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often a reason may write a log line.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// A connection to a pod's outbound port (15001) from another address than the pod's own:
    /// only the pod's own captured connections may come there.
    NotFromPod,
    /// A connection to a pod's outbound port that capture did not send there (no original
    /// destination was recorded for it).
    NoOriginalDestination,
    /// A connection straight to one of the proxy's ports in a pod (delivering it would loop
    /// back into the proxy).
    ToProxyPort,
    /// The node's descriptor budget is spent.
    FdBudget,
    /// The pod's connections hold their whole share of the budget.
    PodShare,
    /// Too many connections node-wide have not authenticated yet.
    Unauthenticated,
    /// Too many connections from this address have not authenticated yet.
    UnauthenticatedPerSource,
    /// A connection did not authenticate in time (closed, not refused).
    HandshakeTimeout,
    /// An HTTP endpoint serves as many connections as it takes.
    HttpConnections,
    /// An HTTP endpoint serves as many connections from this address as it takes.
    HttpConnectionsPerSource,
}

impl Refusal {
    const ALL: [Refusal; 10] = [
        Refusal::NotFromPod,
        Refusal::NoOriginalDestination,
        Refusal::ToProxyPort,
        Refusal::FdBudget,
        Refusal::PodShare,
        Refusal::Unauthenticated,
        Refusal::UnauthenticatedPerSource,
        Refusal::HandshakeTimeout,
        Refusal::HttpConnections,
        Refusal::HttpConnectionsPerSource,
    ];

    /// The metric's `reason` label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Refusal::NotFromPod => "not_from_pod",
            Refusal::NoOriginalDestination => "no_original_destination",
            Refusal::ToProxyPort => "to_proxy_port",
            Refusal::FdBudget => "fd_budget",
            Refusal::PodShare => "pod_share",
            Refusal::Unauthenticated => "unauthenticated",
            Refusal::UnauthenticatedPerSource => "unauthenticated_per_source",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::HttpConnections => "http_connections",
            Refusal::HttpConnectionsPerSource => "http_connections_per_source",
        }
    }

    fn explain(self) -> &'static str {
        match self {
            Refusal::NotFromPod => {
                "refused a connection to a pod's outbound port from another address than the pod's"
            }
            Refusal::NoOriginalDestination => {
                "refused a connection to a pod's outbound port that capture did not send there"
            }
            Refusal::ToProxyPort => "refused a connection made straight to a proxy port of a pod",
            Refusal::FdBudget => {
                "refused a connection: the node's file descriptor budget is spent (see `limits` in /config_dump)"
            }
            Refusal::PodShare => {
                "refused a connection: the pod's connections hold its whole share of the node's descriptors (--pod-share-percent)"
            }
            Refusal::Unauthenticated => {
                "refused a connection: too many connections are authenticating (--max-unauthenticated)"
            }
            Refusal::UnauthenticatedPerSource => {
                "refused a connection: too many connections from its address are authenticating (--max-unauthenticated-per-source)"
            }
            Refusal::HandshakeTimeout => {
                "closed a connection that did not authenticate in time (--handshake-timeout-secs)"
            }
            Refusal::HttpConnections => {
                "refused a connection: the HTTP endpoint serves as many as it takes"
            }
            Refusal::HttpConnectionsPerSource => {
                "refused a connection: the HTTP endpoint serves as many from its address as it takes"
            }
        }
    }
}

/// The refusals so far.
pub(crate) struct Refusals {
    started: Instant,
    counts: [AtomicU64; Refusal::ALL.len()],
    /// When each reason last wrote a line (milliseconds since `started`, plus one; 0: never).
    logged_at: [AtomicU64; Refusal::ALL.len()],
    /// Refusals of each reason since its last line.
    unlogged: [AtomicU64; Refusal::ALL.len()],
}

impl Default for Refusals {
    fn default() -> Refusals {
        Refusals {
            started: Instant::now(),
            counts: Default::default(),
            logged_at: Default::default(),
            unlogged: Default::default(),
        }
    }
}

impl Refusals {
    /// Counts a refusal of `client`'s connection to `to` (a pod, or an endpoint of the node),
    /// and logs it unless `reason` logged within the interval.
    pub(crate) fn refuse(&self, reason: Refusal, to: &str, client: SocketAddr) {
        let i = reason as usize;
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let now = self.started.elapsed().as_millis() as u64 + 1;
        let last = self.logged_at[i].load(Ordering::Relaxed);
        let due = last == 0 || now - last >= LOG_INTERVAL.as_millis() as u64;
        if !due
            || self.logged_at[i]
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.unlogged[i].fetch_add(1, Ordering::Relaxed);
            return;
        }
        let since = self.unlogged[i].swap(0, Ordering::Relaxed);
        tracing::warn!(%to, %client, reason = reason.label(), unlogged_since_last_line = since, "{}", reason.explain());
    }

    /// Each reason's count so far.
    pub(crate) fn counts(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Refusal::ALL.iter().map(|reason| {
            (
                reason.label(),
                self.counts[*reason as usize].load(Ordering::Relaxed),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_counts_and_only_the_first_of_an_interval_logs() {
        let refusals = Refusals::default();
        let client: SocketAddr = "10.244.1.3:40000".parse().unwrap();
        for _ in 0..1000 {
            refusals.refuse(Refusal::NotFromPod, "demo/a2", client);
        }
        refusals.refuse(Refusal::NoOriginalDestination, "demo/a2", client);
        let counts: Vec<(&str, u64)> = refusals.counts().collect();
        assert_eq!(
            counts,
            [
                ("not_from_pod", 1000),
                ("no_original_destination", 1),
                ("to_proxy_port", 0),
                ("fd_budget", 0),
                ("pod_share", 0),
                ("unauthenticated", 0),
                ("unauthenticated_per_source", 0),
                ("handshake_timeout", 0),
                ("http_connections", 0),
                ("http_connections_per_source", 0),
            ]
        );
        // One line for each reason; the other 999 wait for the next interval's line.
        assert_eq!(
            refusals.unlogged[Refusal::NotFromPod as usize].load(Ordering::Relaxed),
            999
        );
        assert_eq!(
            refusals.unlogged[Refusal::NoOriginalDestination as usize].load(Ordering::Relaxed),
            0
        );
    }
}
