//! Addresses as Istio ztunnel's local config writes them: `network/ip` (or a bare IP), a
//! prefix `network/ip/length`, and the address of a waypoint.

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::net::IpAddr;

/// An IP on a network; this proxy serves one network, so only the IP is used for routing.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NetworkAddress {
    pub network: String,
    pub ip: IpAddr,
}

impl std::str::FromStr for NetworkAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (network, ip) = text.rsplit_once('/').unwrap_or(("", text));
        let ip = ip
            .parse()
            .map_err(|_| format!("{text:?} is not an address (network/ip or ip)"))?;
        Ok(NetworkAddress {
            network: network.to_owned(),
            ip,
        })
    }
}

impl fmt::Display for NetworkAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.ip)
    }
}

/// A prefix on a network, written `network/address/length` (or `address/length`): a service
/// reached at any address inside it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NetworkCidr {
    pub network: String,
    pub cidr: IpNet,
}

impl NetworkCidr {
    /// The prefix `cidr` holds (host bits cleared: any address inside matches).
    pub fn new(network: String, cidr: IpNet) -> NetworkCidr {
        NetworkCidr {
            network,
            cidr: cidr.trunc(),
        }
    }
}

impl std::str::FromStr for NetworkCidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        // A CIDR holds one '/', so a second one ends the network.
        let (network, cidr) = match text.split_once('/') {
            Some((network, rest)) if rest.contains('/') => (network, rest),
            _ => ("", text),
        };
        let cidr: IpNet = cidr.parse().map_err(|_| {
            format!("{text:?} is not a prefix (network/address/length or address/length)")
        })?;
        Ok(NetworkCidr::new(network.to_owned(), cidr))
    }
}

impl fmt::Display for NetworkCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.cidr)
    }
}

/// Both written as text (`network/...`).
macro_rules! serde_as_text {
    ($type:ty) => {
        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }

        impl Serialize for $type {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }
    };
}

serde_as_text!(NetworkAddress);
serde_as_text!(NetworkCidr);

/// Where a waypoint is: an address (of a workload or of a service's VIP) or a service by
/// namespace and hostname.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum GatewayDestination {
    Address(NetworkAddress),
    Hostname(NamespacedHostname),
}

/// A service by namespace and hostname, kept as the key the model finds services by
/// (`namespace/hostname`), so that a connection routed to it looks it up as it is.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(from = "HostnameFields", into = "HostnameFields")]
pub struct NamespacedHostname {
    key: String,
    /// Where the namespace ends in `key`.
    slash: usize,
}

impl NamespacedHostname {
    pub fn new(namespace: &str, hostname: &str) -> NamespacedHostname {
        NamespacedHostname {
            key: format!("{namespace}/{hostname}"),
            slash: namespace.len(),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.key[..self.slash]
    }

    pub fn hostname(&self) -> &str {
        &self.key[self.slash + 1..]
    }

    /// `namespace/hostname`: the service's key.
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// `NamespacedHostname` as the config writes it.
#[derive(Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HostnameFields {
    namespace: String,
    hostname: String,
}

impl From<HostnameFields> for NamespacedHostname {
    fn from(fields: HostnameFields) -> Self {
        NamespacedHostname::new(&fields.namespace, &fields.hostname)
    }
}

impl From<NamespacedHostname> for HostnameFields {
    fn from(name: NamespacedHostname) -> Self {
        HostnameFields {
            namespace: name.namespace().to_owned(),
            hostname: name.hostname().to_owned(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayAddress {
    pub destination: GatewayDestination,
    /// The port the waypoint takes HBONE on.
    #[serde(default = "default_hbone_port")]
    pub hbone_mtls_port: u16,
}

fn default_hbone_port() -> u16 {
    ztunnel_common::ports::HBONE
}
