//! A workload entry of the mesh config, in Istio ztunnel's local-config shape.

use super::address::GatewayAddress;
use super::ports::ServicePorts;
use crate::identity::Identity;
use crate::mesh::FieldError;
use crate::settings::DEFAULT_TRUST_DOMAIN;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::sync::Arc;

pub(crate) const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// How a workload takes inbound mesh traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum Protocol {
    /// Through HBONE on 15008 (a workload captured by a mesh proxy).
    #[serde(rename = "HBONE")]
    Hbone,
    /// Plain TCP (outside the mesh).
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
}

/// Only healthy workloads are chosen as a service's endpoints (unless the service's load
/// balancer allows all).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum HealthStatus {
    #[default]
    Healthy,
    Unhealthy,
}

/// How a workload's addresses are to be taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum NetworkMode {
    /// Its addresses are its own: traffic to them is traffic to it.
    #[default]
    Standard,
    /// It runs on its node's network and shares the node's address with every other such
    /// workload: it is never looked up by address.
    HostNetwork,
}

/// Where a workload runs, for locality-aware load balancing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Locality {
    #[serde(default, skip_serializing_if = "str::is_empty")]
    pub region: Box<str>,
    #[serde(default, skip_serializing_if = "str::is_empty")]
    pub zone: Box<str>,
    #[serde(default, skip_serializing_if = "str::is_empty")]
    pub subzone: Box<str>,
}

/// What an application that takes tunnel information directly expects from the last proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApplicationTunnel {
    pub protocol: TunnelHeader,
    /// The port to deliver to instead of the connection's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// Istio's `ApplicationTunnel.Protocol`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum TunnelHeader {
    /// The bytes as they come.
    #[serde(rename = "NONE")]
    None,
    /// A PROXY protocol v2 header first, with the source's identity.
    #[serde(rename = "PROXY")]
    Proxy,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    /// Shared with the model's lookups, which key the workload by it.
    pub uid: Arc<str>,
    pub name: String,
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    pub workload_ips: Vec<IpAddr>,
    #[serde(default)]
    pub protocol: Protocol,
    /// The node the workload runs on.
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub status: HealthStatus,
    /// The waypoint that handles traffic to this workload, if any (boxed: most have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<Box<GatewayAddress>>,
    /// Keys (`namespace/name`) of the WorkloadSelector policies that select this workload.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authorization_policies: Vec<String>,
    /// The services this workload is an endpoint of: `namespace/hostname` -> service port ->
    /// target port on this workload.
    #[serde(default, skip_serializing_if = "ServicePorts::is_empty")]
    pub services: ServicePorts,
    /// Istio's descriptive fields: accepted so an Istio user's file loads, shown by the admin
    /// API, not used for routing. Boxed strings: mostly empty, and 8 bytes smaller each, which
    /// keeps a workload in a smaller allocation class.
    #[serde(default, skip_serializing_if = "str::is_empty")]
    pub canonical_name: Box<str>,
    #[serde(default, skip_serializing_if = "str::is_empty")]
    pub canonical_revision: Box<str>,
    #[serde(default, skip_serializing_if = "str::is_empty")]
    pub workload_name: Box<str>,
    #[serde(default, skip_serializing_if = "str::is_empty")]
    pub workload_type: Box<str>,
    #[serde(default, skip_serializing_if = "str::is_empty")]
    pub hostname: Box<str>,
    #[serde(default, skip_serializing_if = "str::is_empty")]
    pub network: Box<str>,
    #[serde(default, skip_serializing_if = "str::is_empty")]
    pub cluster_id: Box<str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<Box<Locality>>,
    /// Its share of a service's connections relative to the other endpoints' (1 when unset;
    /// 0: never chosen).
    #[serde(
        default = "default_capacity",
        skip_serializing_if = "is_default_capacity"
    )]
    pub capacity: u32,
    #[serde(default, skip_serializing_if = "is_default")]
    pub network_mode: NetworkMode,
    /// The east-west gateway that reaches it from another network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_gateway: Option<Box<GatewayAddress>>,
    /// It takes tunnelled traffic itself.
    #[serde(default, skip_serializing_if = "is_default")]
    pub native_tunnel: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application_tunnel: Option<ApplicationTunnel>,
}

impl Workload {
    pub fn identity(&self) -> Identity {
        Identity {
            trust_domain: self.trust_domain.clone(),
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
        }
    }

    /// Whether traffic to its addresses is traffic to it (not so on the host network).
    pub fn owns_its_addresses(&self) -> bool {
        self.network_mode == NetworkMode::Standard
    }

    /// The fields set here whose behaviour this build does not have (see `unused`).
    pub(crate) fn accepted_not_used(&self) -> impl Iterator<Item = &'static str> {
        [
            (self.native_tunnel, "workload.nativeTunnel"),
            (!self.hostname.is_empty(), "workload.hostname"),
        ]
        .into_iter()
        .filter_map(|(set, field)| set.then_some(field))
    }

    /// `namespace/name`, for logs.
    pub fn label(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Checks the fields serde cannot; the problem names the field.
    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        for (field, value) in [
            ("uid", &*self.uid),
            ("name", &self.name),
            ("namespace", &self.namespace),
            ("serviceAccount", &self.service_account),
            ("trustDomain", &self.trust_domain),
        ] {
            if value.is_empty() {
                return Err(FieldError::new(format!("field {field} must not be empty")));
            }
            let in_spiffe_id = matches!(field, "namespace" | "serviceAccount" | "trustDomain");
            if in_spiffe_id && value.contains('/') {
                return Err(FieldError::new(format!(
                    "field {field} must not contain '/' (it is part of a SPIFFE id)"
                )));
            }
        }
        if self.workload_ips.is_empty() {
            return Err(FieldError::new(
                "field workloadIps must list at least one address",
            ));
        }
        for key in self.services.keys() {
            super::service::split_key(key).ok_or_else(|| {
                FieldError::new(format!("field services: {key:?} is not namespace/hostname"))
            })?;
        }
        for key in &self.authorization_policies {
            if !key.contains('/') {
                return Err(FieldError::new(format!(
                    "field authorizationPolicies: {key:?} is not namespace/name"
                )));
            }
        }
        Ok(())
    }
}

fn default_capacity() -> u32 {
    1
}

fn is_default_capacity(capacity: &u32) -> bool {
    *capacity == default_capacity()
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

fn default_service_account() -> String {
    DEFAULT_SERVICE_ACCOUNT.to_owned()
}

fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_owned()
}
