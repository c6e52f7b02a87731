//! The mesh file's entries as istiod sends them: each workload and service an
//! `istio.workload.Address`, each policy an `istio.security.Authorization`, named as Istio
//! names them (a workload by its uid, a service `namespace/hostname`, a policy
//! `namespace/name`) and versioned by a digest of their bytes, so that a resource whose
//! content did not change keeps its version across reads of the file.

use prost::{Message, Name};
use prost_types::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use ztunnel_lab::istiod::{BAD_ADDRESS, digest};
use ztunnel_user::mesh::authz::{Match, Policy, StringMatch};
use ztunnel_user::mesh::config::{
    GatewayAddress, GatewayDestination, HealthPolicy, HealthStatus, IpFamily, LoadBalancer,
    LoadBalancerMode, LocalityScope, MeshFile, NetworkAddress, NetworkMode, Protocol, Service,
    TunnelHeader, Workload,
};
use ztunnel_user::xds::proto::istio::{security, workload as wire};

/// One resource as the stream carries it.
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    pub version: String,
    pub body: Any,
}

/// Resources by name, for one type.
pub type Resources = BTreeMap<String, Resource>;

/// Everything istiod would send for one version of the mesh file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// The file's version (the `digest` of its text): what a proxy is synced to.
    pub version: String,
    pub addresses: Resources,
    pub authorizations: Resources,
    /// The SPIFFE identities of the workloads: those the CA signs for.
    pub identities: BTreeSet<String>,
}

impl Snapshot {
    pub fn of(file: &MeshFile, version: String) -> Snapshot {
        let workloads = file.workloads().iter().map(|w| {
            let workload = workload(w);
            (
                workload.uid.clone(),
                address(wire::address::Type::Workload(workload)),
            )
        });
        let services = file
            .services()
            .iter()
            .map(|s| (s.key(), address(wire::address::Type::Service(service(s)))));
        let policies = file
            .policies()
            .iter()
            .map(|p| (p.key(), resource(&authorization(p))));
        Snapshot {
            version,
            addresses: workloads.chain(services).collect(),
            authorizations: policies.collect(),
            identities: file
                .workloads()
                .iter()
                .map(|w| w.identity().to_string())
                .collect(),
        }
    }

    /// Adds `BAD_ADDRESS`: a workload whose address has 3 bytes, which a proxy must refuse
    /// (NACK it by name) while it takes the others.
    pub fn add_bad_address(&mut self) {
        let broken = wire::Workload {
            uid: BAD_ADDRESS.to_owned(),
            name: "broken".to_owned(),
            namespace: "demo".to_owned(),
            addresses: vec![vec![10, 244, 9]],
            ..Default::default()
        };
        let resource = address(wire::address::Type::Workload(broken));
        self.addresses.insert(BAD_ADDRESS.to_owned(), resource);
    }

    /// Leaves out the workload `namespace/name` (of any cluster).
    pub fn withhold_workload(&mut self, workload: &str) {
        let suffix = format!("//Pod/{workload}");
        self.addresses.retain(|name, _| !name.ends_with(&suffix));
    }

    /// This snapshot's resources of `type_url`, or None for a type istiod does not serve here.
    pub fn of_type(&self, type_url: &str) -> Option<&Resources> {
        if type_url == wire::Address::type_url() {
            Some(&self.addresses)
        } else if type_url == security::Authorization::type_url() {
            Some(&self.authorizations)
        } else {
            None
        }
    }
}

fn address(kind: wire::address::Type) -> Resource {
    resource(&wire::Address { r#type: Some(kind) })
}

fn resource<M: Message + Name>(message: &M) -> Resource {
    let body = Any::from_msg(message).expect("encoding into a Vec cannot fail");
    let version = digest(&body.value);
    Resource { version, body }
}

fn workload(w: &Workload) -> wire::Workload {
    let tunnel_protocol = match w.protocol {
        Protocol::Hbone => wire::TunnelProtocol::Hbone,
        Protocol::Tcp => wire::TunnelProtocol::None,
    };
    let status = match w.status {
        HealthStatus::Healthy => wire::WorkloadStatus::Healthy,
        HealthStatus::Unhealthy => wire::WorkloadStatus::Unhealthy,
    };
    // The file says it in lower case; unset is what protobuf's zero, a Deployment, means.
    let workload_type = wire::WorkloadType::from_str_name(&w.workload_type.to_uppercase())
        .unwrap_or(wire::WorkloadType::Deployment);
    let services = w
        .services
        .iter()
        .map(|(key, ports)| {
            (
                key.to_owned(),
                wire::PortList {
                    ports: ports_of(ports.iter()),
                },
            )
        })
        .collect();
    wire::Workload {
        uid: istiod_uid(w),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        addresses: w.workload_ips.iter().map(|ip| ip_bytes(*ip)).collect(),
        hostname: w.hostname.to_string(),
        network: w.network.to_string(),
        tunnel_protocol: tunnel_protocol.into(),
        trust_domain: w.trust_domain.clone(),
        service_account: w.service_account.clone(),
        waypoint: w.waypoint.as_deref().map(gateway),
        node: w.node.clone(),
        canonical_name: w.canonical_name.to_string(),
        canonical_revision: w.canonical_revision.to_string(),
        workload_type: workload_type.into(),
        workload_name: w.workload_name.to_string(),
        services,
        authorization_policies: w.authorization_policies.clone(),
        status: status.into(),
        cluster_id: w.cluster_id.to_string(),
        locality: w.locality.as_deref().map(|l| wire::Locality {
            region: l.region.to_string(),
            zone: l.zone.to_string(),
            subzone: l.subzone.to_string(),
        }),
        // Istio sends the capacity only when it is not the default.
        capacity: (w.capacity != 1).then_some(w.capacity),
        network_mode: match w.network_mode {
            NetworkMode::Standard => wire::NetworkMode::Standard,
            NetworkMode::HostNetwork => wire::NetworkMode::HostNetwork,
        }
        .into(),
        network_gateway: w.network_gateway.as_deref().map(gateway),
        native_tunnel: w.native_tunnel,
        application_tunnel: w.application_tunnel.map(|t| wire::ApplicationTunnel {
            protocol: match t.protocol {
                TunnelHeader::None => wire::application_tunnel::Protocol::None,
                TunnelHeader::Proxy => wire::application_tunnel::Protocol::Proxy,
            }
            .into(),
            port: t.port.map_or(0, u32::from),
        }),
        ..Default::default()
    }
}

/// The name istiod gives a pod's workload, `<cluster>//Pod/<namespace>/<name>`, not the
/// pod's uid the file has: the daemons must join their pods to it by namespace, name and node.
pub fn istiod_uid(w: &Workload) -> String {
    let cluster = match &*w.cluster_id {
        "" => "Kubernetes",
        cluster => cluster,
    };
    format!("{cluster}//Pod/{}/{}", w.namespace, w.name)
}

fn service(s: &Service) -> wire::Service {
    wire::Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        addresses: s
            .vips
            .iter()
            .map(network_address)
            .chain(s.cidr_vips.iter().map(|vip| wire::NetworkAddress {
                network: vip.network.clone(),
                address: ip_bytes(vip.cidr.addr()),
                length: Some(vip.cidr.prefix_len().into()),
            }))
            .collect(),
        ports: ports_of(s.ports.iter().map(|(&from, &to)| (from, to))),
        subject_alt_names: s.subject_alt_names.clone(),
        waypoint: s.waypoint.as_ref().map(gateway),
        weighted_waypoints: s
            .weighted_waypoints
            .iter()
            .map(|w| wire::WeightedWaypoint {
                waypoint: Some(gateway(&w.waypoint)),
                weight: w.weight,
            })
            .collect(),
        load_balancing: s.load_balancer.as_ref().map(load_balancing),
        ip_families: match s.ip_families {
            None => wire::IpFamilies::Automatic,
            Some(IpFamily::IPv4) => wire::IpFamilies::Ipv4Only,
            Some(IpFamily::IPv6) => wire::IpFamilies::Ipv6Only,
            Some(IpFamily::Dual) => wire::IpFamilies::Dual,
        }
        .into(),
        canonical: s.canonical,
        ..Default::default()
    }
}

fn load_balancing(lb: &LoadBalancer) -> wire::LoadBalancing {
    use wire::load_balancing::{HealthPolicy as Health, Mode, Scope};
    wire::LoadBalancing {
        routing_preference: lb
            .routing_preferences
            .iter()
            .map(|scope| match scope {
                LocalityScope::Region => Scope::Region,
                LocalityScope::Zone => Scope::Zone,
                LocalityScope::Subzone => Scope::Subzone,
                LocalityScope::Node => Scope::Node,
                LocalityScope::Cluster => Scope::Cluster,
                LocalityScope::Network => Scope::Network,
            })
            .map(i32::from)
            .collect(),
        mode: match lb.mode {
            LoadBalancerMode::Standard => Mode::UnspecifiedMode,
            LoadBalancerMode::Strict => Mode::Strict,
            LoadBalancerMode::Failover => Mode::Failover,
            LoadBalancerMode::Passthrough => Mode::Passthrough,
        }
        .into(),
        health_policy: match lb.health_policy {
            HealthPolicy::OnlyHealthy => Health::OnlyHealthy,
            HealthPolicy::AllowAll => Health::AllowAll,
        }
        .into(),
        ..Default::default()
    }
}

fn gateway(g: &GatewayAddress) -> wire::GatewayAddress {
    let destination = match &g.destination {
        GatewayDestination::Address(address) => {
            wire::gateway_address::Destination::Address(network_address(address))
        }
        GatewayDestination::Hostname(name) => {
            wire::gateway_address::Destination::Hostname(wire::NamespacedHostname {
                namespace: name.namespace().to_owned(),
                hostname: name.hostname().to_owned(),
            })
        }
    };
    wire::GatewayAddress {
        destination: Some(destination),
        hbone_mtls_port: g.hbone_mtls_port.into(),
    }
}

fn network_address(address: &NetworkAddress) -> wire::NetworkAddress {
    wire::NetworkAddress {
        network: address.network.clone(),
        address: ip_bytes(address.ip),
        length: None,
    }
}

fn ports_of(ports: impl Iterator<Item = (u16, u16)>) -> Vec<wire::Port> {
    ports
        .map(|(service_port, target_port)| wire::Port {
            service_port: service_port.into(),
            target_port: target_port.into(),
            ..Default::default()
        })
        .collect()
}

fn authorization(p: &Policy) -> security::Authorization {
    use ztunnel_user::mesh::authz::{Action, Scope};
    let scope = match p.scope {
        Scope::Global => security::Scope::Global,
        Scope::Namespace => security::Scope::Namespace,
        Scope::WorkloadSelector => security::Scope::WorkloadSelector,
    };
    let action = match p.action {
        Action::Allow => security::Action::Allow,
        Action::Deny => security::Action::Deny,
    };
    let rules = p
        .rules
        .iter()
        .map(|rule| security::Rule {
            clauses: rule
                .iter()
                .map(|clause| security::Clause {
                    matches: clause.iter().map(policy_match).collect(),
                })
                .collect(),
        })
        .collect();
    security::Authorization {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        scope: scope.into(),
        action: action.into(),
        rules,
        dry_run: p.dry_run,
    }
}

fn policy_match(m: &Match) -> security::Match {
    let strings = |matches: &[StringMatch]| matches.iter().map(string_match).collect();
    let accounts = |accounts: &[ztunnel_user::mesh::authz::ServiceAccountMatch]| {
        accounts
            .iter()
            .map(|a| security::ServiceAccountMatch {
                namespace: a.namespace.clone(),
                service_account: a.service_account.clone(),
            })
            .collect()
    };
    let nets = |nets: &[ipnet::IpNet]| {
        nets.iter()
            .map(|net| security::Address {
                address: ip_bytes(net.addr()),
                length: net.prefix_len().into(),
            })
            .collect()
    };
    let ports = |ports: &[u16]| ports.iter().map(|&port| port.into()).collect();
    security::Match {
        namespaces: strings(&m.namespaces),
        not_namespaces: strings(&m.not_namespaces),
        service_accounts: accounts(&m.service_accounts),
        not_service_accounts: accounts(&m.not_service_accounts),
        principals: strings(&m.principals),
        not_principals: strings(&m.not_principals),
        source_ips: nets(&m.source_ips),
        not_source_ips: nets(&m.not_source_ips),
        destination_ips: nets(&m.destination_ips),
        not_destination_ips: nets(&m.not_destination_ips),
        destination_ports: ports(&m.destination_ports),
        not_destination_ports: ports(&m.not_destination_ports),
    }
}

fn string_match(m: &StringMatch) -> security::StringMatch {
    use security::string_match::MatchType;
    let match_type = match m {
        StringMatch::Exact(s) => MatchType::Exact(s.clone()),
        StringMatch::Prefix(s) => MatchType::Prefix(s.clone()),
        StringMatch::Suffix(s) => MatchType::Suffix(s.clone()),
        StringMatch::Presence() => MatchType::Presence(()),
    };
    security::StringMatch {
        match_type: Some(match_type),
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

#[cfg(test)]
mod tests;
