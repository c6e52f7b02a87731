//! How a service's endpoint is chosen for a connection, as Istio's ztunnel chooses it: the
//! health policy filters, the routing preferences rank each endpoint by how much of its
//! locality it shares with the source (the longest run of matching scopes, in the order
//! given), only the best rank is kept (`Failover`; `Strict` keeps full matches only), and
//! among those one is drawn at random in proportion to its `capacity`.

use super::workload::{HealthStatus, Locality, Workload};
use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    /// What the endpoint should share with the source, most important first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routing_preferences: Vec<LocalityScope>,
    #[serde(default)]
    pub mode: LoadBalancerMode,
    #[serde(default)]
    pub health_policy: HealthPolicy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum LocalityScope {
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
    Network,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum LoadBalancerMode {
    /// The routing preferences are not considered.
    #[default]
    Standard,
    /// Only endpoints that match every preference; none, and the connection fails.
    Strict,
    /// The endpoints that match the most preferences (in order); fewer when none does.
    Failover,
    /// No endpoint is chosen: the connection goes to the address it was made to.
    Passthrough,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum HealthPolicy {
    #[default]
    OnlyHealthy,
    /// Unhealthy endpoints are chosen too.
    AllowAll,
}

/// Which address families a service's endpoints are reached by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum IpFamily {
    Dual,
    IPv4,
    IPv6,
}

impl IpFamily {
    fn accepts(self, ip: IpAddr) -> bool {
        match self {
            IpFamily::Dual => true,
            IpFamily::IPv4 => ip.is_ipv4(),
            IpFamily::IPv6 => ip.is_ipv6(),
        }
    }
}

/// The address of `workload` a connection made to `destination` uses: one of the family a
/// service's `ip_families` allows, that of `destination` first (a dual-stack client that
/// dialled a v6 VIP gets a v6 endpoint address); `None` when the workload has none allowed.
pub(crate) fn endpoint_ip(
    workload: &Workload,
    families: Option<IpFamily>,
    destination: IpAddr,
) -> Option<IpAddr> {
    let allowed = |ip: &&IpAddr| families.is_none_or(|f| f.accepts(**ip));
    let mut candidates = workload.workload_ips.iter().filter(allowed);
    let first = *candidates.clone().next()?;
    Some(
        candidates
            .find(|ip| ip.is_ipv4() == destination.is_ipv4())
            .copied()
            .unwrap_or(first),
    )
}

impl LoadBalancer {
    fn admits(&self, status: HealthStatus) -> bool {
        status == HealthStatus::Healthy || self.health_policy == HealthPolicy::AllowAll
    }

    /// How many preferences, in order, `endpoint` shares with `source` (none with an unknown
    /// source); `None` when the mode excludes it. Standard and Passthrough rank every endpoint
    /// the same.
    fn rank(&self, source: Option<&Workload>, endpoint: &Workload) -> Option<usize> {
        if matches!(
            self.mode,
            LoadBalancerMode::Standard | LoadBalancerMode::Passthrough
        ) {
            return Some(0);
        }
        let rank = self
            .routing_preferences
            .iter()
            .take_while(|scope| source.is_some_and(|source| scope.shared(source, endpoint)))
            .count();
        let full = rank == self.routing_preferences.len();
        (full || self.mode != LoadBalancerMode::Strict).then_some(rank)
    }
}

impl LocalityScope {
    fn shared(self, a: &Workload, b: &Workload) -> bool {
        let same = |part: fn(&Locality) -> &str| locality(a, part) == locality(b, part);
        match self {
            LocalityScope::Region => same(|l| &l.region),
            LocalityScope::Zone => same(|l| &l.zone),
            LocalityScope::Subzone => same(|l| &l.subzone),
            LocalityScope::Node => a.node == b.node,
            LocalityScope::Cluster => a.cluster_id == b.cluster_id,
            LocalityScope::Network => a.network == b.network,
        }
    }
}

/// A part of `workload`'s locality; empty when it has none.
fn locality(workload: &Workload, part: fn(&Locality) -> &str) -> &str {
    workload.locality.as_deref().map_or("", part)
}

/// One of `endpoints` for a connection from `source` (a workload the model knows, if any)
/// under `balancer` (the service's, or the default: healthy only, preferences ignored).
pub(crate) fn choose<'a>(
    balancer: Option<&LoadBalancer>,
    source: Option<&Workload>,
    endpoints: impl Iterator<Item = &'a Workload>,
) -> Option<&'a Workload> {
    let default = LoadBalancer::default();
    let balancer = balancer.unwrap_or(&default);
    let mut best = Vec::new();
    let mut best_rank = 0;
    for endpoint in endpoints.filter(|w| balancer.admits(w.status) && w.capacity > 0) {
        let Some(rank) = balancer.rank(source, endpoint) else {
            continue;
        };
        if best.is_empty() || rank > best_rank {
            best.clear();
            best_rank = rank;
        }
        if rank == best_rank {
            best.push(endpoint);
        }
    }
    best.choose_weighted(&mut rand::rng(), |w| u64::from(w.capacity))
        .ok()
        .copied()
}

#[cfg(test)]
mod tests;
