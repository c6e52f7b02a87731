//! A service entry of the mesh config: VIPs and ports in front of the workloads that list the
//! service (Istio ztunnel's local-config shape).

use super::address::{GatewayAddress, NetworkAddress};
use crate::identity::Identity;
use crate::mesh::FieldError;
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
    /// Service port -> target port (0: the same port); only these ports are served.
    #[serde(default)]
    pub ports: BTreeMap<u16, u16>,
    /// Identities an endpoint may present besides its own workload identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<GatewayAddress>,
}

impl Service {
    /// `namespace/hostname`, as workloads' `services` maps name it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
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
        if self.vips.is_empty() {
            return Err(FieldError::new("field vips must list at least one address"));
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
