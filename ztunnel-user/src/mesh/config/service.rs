//! A service entry of the mesh config: VIPs and ports in front of the workloads that list the
//! service (Istio ztunnel's local-config shape).

use super::address::{GatewayAddress, NetworkAddress, NetworkCidr};
use super::load_balancing::{IpFamily, LoadBalancer, LoadBalancerMode};
use super::workload::HealthStatus;
use crate::identity::Identity;
use crate::mesh::FieldError;
use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// With the namespace, the key workloads use to list the service (`namespace/hostname`).
    pub hostname: String,
    #[serde(default)]
    pub vips: Vec<NetworkAddress>,
    /// Prefixes: the service at any address in one (the longest prefix wins).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cidr_vips: Vec<NetworkCidr>,
    /// Service port -> target port (0: the same port); only these ports are served.
    #[serde(default)]
    pub ports: BTreeMap<u16, u16>,
    /// Identities an endpoint may present besides its own workload identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
    /// The primary waypoint: the one older proxies use, and this one when
    /// `weighted_waypoints` is empty or weighs nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<GatewayAddress>,
    /// A weighted set of waypoints (Istio's waypoint canary): each connection takes one, drawn
    /// by weight.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weighted_waypoints: Vec<WeightedWaypoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    /// Unset: any family, the one the client dialled first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_families: Option<IpFamily>,
    /// Preferred in lookups by hostname outside the client's namespace.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub canonical: bool,
    /// Endpoints listed on the service (Istio's local config allows it; the workloads'
    /// `services` say the same), by workload uid.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub endpoints: BTreeMap<String, ServiceEndpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightedWaypoint {
    pub waypoint: GatewayAddress,
    /// Relative to the set's other weights; 0: none of the connections.
    pub weight: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEndpoint {
    pub workload_uid: String,
    #[serde(default)]
    pub port: BTreeMap<u16, u16>,
    #[serde(default)]
    pub status: HealthStatus,
}

impl Service {
    /// `namespace/hostname`, as workloads' `services` maps name it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }

    /// The waypoint one connection to the service goes through: one of the weighted set,
    /// drawn by weight, else the primary.
    pub fn waypoint_for_connection(&self) -> Option<&GatewayAddress> {
        self.weighted_waypoints
            .choose_weighted(&mut rand::rng(), |w| w.weight)
            .map(|w| &w.waypoint)
            .ok()
            .or(self.waypoint.as_ref())
    }

    /// Every waypoint a connection to the service may go through.
    pub fn waypoints(&self) -> impl Iterator<Item = &GatewayAddress> {
        let weighted = self.weighted_waypoints.iter().map(|w| &w.waypoint);
        self.waypoint.iter().chain(weighted)
    }

    /// Whether connections to it keep their destination (no endpoint is chosen).
    pub fn passes_through(&self) -> bool {
        self.load_balancer
            .as_ref()
            .is_some_and(|lb| lb.mode == LoadBalancerMode::Passthrough)
    }

    /// The fields set here whose behaviour this build does not have (see `unused`).
    pub(crate) fn accepted_not_used(&self) -> impl Iterator<Item = &'static str> {
        [
            (self.canonical, "service.canonical"),
            (!self.endpoints.is_empty(), "service.endpoints"),
        ]
        .into_iter()
        .filter_map(|(set, field)| set.then_some(field))
    }

    /// The identities of `subject_alt_names` (validated to parse).
    pub fn extra_identities(&self) -> Vec<Identity> {
        self.subject_alt_names
            .iter()
            .filter_map(|san| san.parse().ok())
            .collect()
    }

    /// Checks the fields serde cannot; the problem names the field.
    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        for (field, value) in [
            ("name", &self.name),
            ("namespace", &self.namespace),
            ("hostname", &self.hostname),
        ] {
            if value.is_empty() {
                return Err(FieldError::new(format!("field {field} must not be empty")));
            }
        }
        if self.namespace.contains('/') {
            return Err(FieldError::new("field namespace must not contain '/'"));
        }
        if self.ports.is_empty() {
            return Err(FieldError::new(
                "field ports must map at least one service port",
            ));
        }
        if self.ports.contains_key(&0) {
            return Err(FieldError::new("field ports: 0 is not a service port"));
        }
        for san in &self.subject_alt_names {
            san.parse::<Identity>()
                .map_err(|err| FieldError::new(format!("field subjectAltNames: {err}")))?;
        }
        Ok(())
    }
}

/// Splits a `namespace/hostname` key.
pub(super) fn split_key(key: &str) -> Option<(&str, &str)> {
    key.split_once('/')
        .filter(|(namespace, hostname)| !namespace.is_empty() && !hostname.is_empty())
}
