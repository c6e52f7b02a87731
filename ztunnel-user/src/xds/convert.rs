//! Delta-xDS resources into changes of the mesh model: an `istio.workload.Address` (a workload
//! or a service) becomes `Change::Workload` or `Change::Service`, an
//! `istio.security.Authorization` becomes `Change::Policy`, and removed names become removals.
//! A resource that cannot be taken gives a `ResourceError` naming it, so the client can apply
//! the good resources of a response and NACK the others by name.
//!
//! The conversion is Istio's ztunnel's (`src/state/workload.rs`, `src/state/service.rs`,
//! `src/rbac.rs`), into the model of the local config:
//! - `Workload`: uid, name, namespace, addresses, hostname, network, tunnel_protocol (a
//!   sidecar's LEGACY_ISTIO_MTLS: TCP), trust_domain and service_account (empty: the
//!   defaults), waypoint, network_gateway, node, canonical_name, canonical_revision,
//!   workload_type (lower case, as Istio shows it), workload_name, native_tunnel,
//!   application_tunnel (port 0: unset), services (service and target ports),
//!   authorization_policies, status, cluster_id, locality (all empty: unset), network_mode,
//!   capacity (unset: 1);
//! - `Service`: name, namespace, hostname, addresses (one with a `length` shorter than the
//!   address is a CIDR VIP), ports (service and target), subject_alt_names, waypoint,
//!   weighted_waypoints, load_balancing (routing_preference, mode, health_policy), ip_families
//!   (AUTOMATIC: unset), canonical;
//! - `GatewayAddress`: the address or the hostname, hbone_mtls_port (unset: 15008, as in the
//!   local config);
//! - `Authorization`: every field.
//!
//! Not read, and never a reason to refuse, as in Istio's ztunnel: the `extensions` of both,
//! `Port`'s app_protocol and `LoadBalancing`'s dns_connect_strategy (this proxy resolves no
//! hostnames).
//!
//! Like Istio's ztunnel, an entry is keyed by its own uid or `namespace/hostname`, whatever the
//! resource's name: the name only names the resource in errors. An address that is not 4 or
//! 16 bytes and an unknown value of an enum read refuse the resource. Where Istio's ztunnel
//! drops or truncates a value (a policy's bad address or prefix length, a port above 65535, a
//! string match of no kind, an unknown workload_type), it is refused here: a dropped matcher
//! would widen a policy. Last, the model's own `validate()` must pass.

use super::proto::istio;
use crate::mesh::FieldError;
use crate::mesh::authz::{Action, Match, Policy, Scope, ServiceAccountMatch, StringMatch};
use crate::mesh::config::{
    ApplicationTunnel, Change, DEFAULT_SERVICE_ACCOUNT, GatewayAddress, GatewayDestination,
    HealthPolicy, HealthStatus, IpFamily, LoadBalancer, LoadBalancerMode, Locality, LocalityScope,
    MeshConfig, NamespacedHostname, NetworkAddress, NetworkCidr, NetworkMode, Protocol, Service,
    TunnelHeader, WeightedWaypoint, Workload,
};
use crate::settings::DEFAULT_TRUST_DOMAIN;
use ipnet::IpNet;
use istio::security::string_match::MatchType;
use istio::workload::{
    IpFamilies, TunnelProtocol, WorkloadStatus, WorkloadType, address, gateway_address,
};
use prost::{Message, Name};
use prost_types::Any;
use std::net::IpAddr;
use std::sync::Arc;

/// A resource of a response that cannot be taken: its name and what is wrong, as a NACK
/// lists it (`<name>: <reason>`).
#[derive(Debug, thiserror::Error)]
#[error("{name}: {problem}")]
pub struct ResourceError {
    name: String,
    problem: Problem,
}

impl ResourceError {
    /// The resource's name in the response.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What is wrong with it, without the name.
    pub fn problem(&self) -> String {
        self.problem.to_string()
    }
}

/// What is wrong with a resource.
#[derive(Debug, thiserror::Error)]
enum Problem {
    #[error("type {found:?} where {expected:?} was expected")]
    WrongType { found: String, expected: String },
    #[error("cannot decode: {0}")]
    Undecodable(#[from] prost::DecodeError),
    #[error("{field}: an address of {len} bytes (an IP is 4 or 16)")]
    AddressLength { field: String, len: usize },
    #[error("{field}: unknown value {value}")]
    UnknownEnum { field: &'static str, value: i32 },
    /// A value the model cannot take, with the field it is in.
    #[error("{0}")]
    Unusable(String),
    /// The model's own check of the converted entry.
    #[error(transparent)]
    Invalid(#[from] FieldError),
}

/// The `istio.workload.Address` `name`: its workload or service, added or replaced.
pub fn address_change(name: &str, resource: &Any) -> Result<Change, ResourceError> {
    let convert = || match decode::<istio::workload::Address>(resource)?.r#type {
        Some(address::Type::Workload(w)) => Ok(Change::Workload(Arc::new(workload(w)?))),
        Some(address::Type::Service(s)) => Ok(Change::Service(Arc::new(service(s)?))),
        None => Err(Problem::Unusable(
            "neither a workload nor a service".to_owned(),
        )),
    };
    convert().map_err(|problem| named(name, problem))
}

/// The `istio.security.Authorization` `name`, added or replaced.
pub fn authorization_change(name: &str, resource: &Any) -> Result<Change, ResourceError> {
    let convert = || Ok(Change::Policy(Arc::new(policy(decode(resource)?)?)));
    convert().map_err(|problem| named(name, problem))
}

/// The removal of the Address `name` from `config`, the version the batch is applied to (the
/// one `Mesh::apply` hands the batch's source). As Istio's ztunnel does, the name is tried as a
/// workload's uid first, then as a service's `namespace/hostname`; `None` when it is neither
/// (already gone: nothing to do). A name added by the same batch is not found there, but istiod
/// does not add and remove one name in one response.
pub fn address_removal(config: &MeshConfig, name: &str) -> Option<Change> {
    if config.workload_by_uid(name).is_some() {
        Some(Change::RemoveWorkload(name.to_owned()))
    } else if config.service_by_key(name).is_some() {
        Some(Change::RemoveService(name.to_owned()))
    } else {
        None
    }
}

/// The removal of the Authorization `name` (`namespace/name`, the policy's key).
pub fn authorization_removal(name: &str) -> Change {
    Change::RemovePolicy(name.to_owned())
}

fn named(name: &str, problem: Problem) -> ResourceError {
    ResourceError {
        name: name.to_owned(),
        problem,
    }
}

/// The message in `resource`, which must say it is an `M`.
fn decode<M: Message + Name + Default>(resource: &Any) -> Result<M, Problem> {
    let expected = M::type_url();
    if resource.type_url != expected {
        return Err(Problem::WrongType {
            found: resource.type_url.clone(),
            expected,
        });
    }
    Ok(M::decode(resource.value.as_slice())?)
}

fn workload(w: istio::workload::Workload) -> Result<Workload, Problem> {
    let protocol = match known(w.tunnel_protocol, "tunnel_protocol")? {
        TunnelProtocol::Hbone => Protocol::Hbone,
        // A sidecar's mutual TLS is not ours to speak: such a workload gets plain TCP, as
        // from a client outside the mesh.
        TunnelProtocol::None | TunnelProtocol::LegacyIstioMtls => Protocol::Tcp,
    };
    let status = match known(w.status, "status")? {
        WorkloadStatus::Healthy => HealthStatus::Healthy,
        WorkloadStatus::Unhealthy => HealthStatus::Unhealthy,
    };
    let workload_type: WorkloadType = known(w.workload_type, "workload_type")?;
    let workload_ips = each(&w.addresses, |i, bytes| {
        ip(bytes, || format!("addresses[{i}]"))
    })?;
    let services = w
        .services
        .into_iter()
        .map(|(key, list)| {
            let ports = port_map(&list.ports, || format!("services[{key:?}]"))?;
            Ok((key, ports))
        })
        .collect::<Result<_, Problem>>()?;
    let workload = Workload {
        uid: w.uid.into(),
        name: w.name,
        namespace: w.namespace,
        service_account: or_default(w.service_account, DEFAULT_SERVICE_ACCOUNT),
        trust_domain: or_default(w.trust_domain, DEFAULT_TRUST_DOMAIN),
        workload_ips,
        protocol,
        node: w.node,
        status,
        waypoint: w
            .waypoint
            .map(|g| gateway(g, "waypoint").map(Box::new))
            .transpose()?,
        authorization_policies: w.authorization_policies,
        services,
        canonical_name: w.canonical_name.into(),
        canonical_revision: w.canonical_revision.into(),
        workload_name: w.workload_name.into(),
        workload_type: workload_type.as_str_name().to_lowercase().into(),
        hostname: w.hostname.into(),
        network: w.network.into(),
        cluster_id: w.cluster_id.into(),
        locality: w
            .locality
            .map(|l| Locality {
                region: l.region.into(),
                zone: l.zone.into(),
                subzone: l.subzone.into(),
            })
            .filter(|l| *l != Locality::default())
            .map(Box::new),
        capacity: w.capacity.unwrap_or(1),
        network_mode: match known(w.network_mode, "network_mode")? {
            istio::workload::NetworkMode::Standard => NetworkMode::Standard,
            istio::workload::NetworkMode::HostNetwork => NetworkMode::HostNetwork,
        },
        network_gateway: w
            .network_gateway
            .map(|g| gateway(g, "network_gateway").map(Box::new))
            .transpose()?,
        native_tunnel: w.native_tunnel,
        application_tunnel: w.application_tunnel.map(application_tunnel).transpose()?,
    };
    workload.validate()?;
    Ok(workload)
}

fn application_tunnel(t: istio::workload::ApplicationTunnel) -> Result<ApplicationTunnel, Problem> {
    use istio::workload::application_tunnel::Protocol as Wire;
    Ok(ApplicationTunnel {
        protocol: match known(t.protocol, "application_tunnel.protocol")? {
            Wire::None => TunnelHeader::None,
            Wire::Proxy => TunnelHeader::Proxy,
        },
        port: match t.port {
            0 => None,
            other => Some(port(other, || "application_tunnel.port".to_owned())?),
        },
    })
}

fn service(s: istio::workload::Service) -> Result<Service, Problem> {
    let mut vips = Vec::new();
    let mut cidr_vips = Vec::new();
    for (i, address) in s.addresses.into_iter().enumerate() {
        let field = || format!("addresses[{i}]");
        let length = address.length;
        let vip = network_address(address, field)?;
        let full = if vip.ip.is_ipv4() { 32 } else { 128 };
        match length.filter(|&length| length != full) {
            None => vips.push(vip),
            Some(length) => {
                let cidr = u8::try_from(length)
                    .ok()
                    .and_then(|length| IpNet::new(vip.ip, length).ok())
                    .ok_or_else(|| {
                        Problem::Unusable(format!(
                            "{}: prefix length {length} is longer than {}",
                            field(),
                            vip.ip
                        ))
                    })?;
                cidr_vips.push(NetworkCidr::new(vip.network, cidr));
            }
        }
    }
    let service = Service {
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
        vips,
        cidr_vips,
        ports: port_map(&s.ports, || "ports".to_owned())?,
        subject_alt_names: s.subject_alt_names,
        waypoint: s.waypoint.map(|g| gateway(g, "waypoint")).transpose()?,
        weighted_waypoints: each(s.weighted_waypoints, |i, w| {
            let field = format!("weighted_waypoints[{i}].waypoint");
            let waypoint = w
                .waypoint
                .ok_or_else(|| Problem::Unusable(format!("{field}: unset")))?;
            Ok(WeightedWaypoint {
                waypoint: gateway(waypoint, &field)?,
                weight: w.weight,
            })
        })?,
        load_balancer: s.load_balancing.map(load_balancer).transpose()?,
        ip_families: match known(s.ip_families, "ip_families")? {
            IpFamilies::Automatic => None,
            IpFamilies::Ipv4Only => Some(IpFamily::IPv4),
            IpFamilies::Ipv6Only => Some(IpFamily::IPv6),
            IpFamilies::Dual => Some(IpFamily::Dual),
        },
        canonical: s.canonical,
        // Istio's xDS carries endpoints on the workloads only.
        endpoints: Default::default(),
    };
    service.validate()?;
    Ok(service)
}

fn load_balancer(lb: istio::workload::LoadBalancing) -> Result<LoadBalancer, Problem> {
    use istio::workload::load_balancing::{HealthPolicy as WireHealth, Mode, Scope};
    let routing_preferences = each(&lb.routing_preference, |i, &scope| {
        Ok(match known(scope, "load_balancing.routing_preference")? {
            Scope::Region => LocalityScope::Region,
            Scope::Zone => LocalityScope::Zone,
            Scope::Subzone => LocalityScope::Subzone,
            Scope::Node => LocalityScope::Node,
            Scope::Cluster => LocalityScope::Cluster,
            Scope::Network => LocalityScope::Network,
            Scope::UnspecifiedScope => {
                return Err(Problem::Unusable(format!(
                    "load_balancing.routing_preference[{i}]: UNSPECIFIED_SCOPE is not a scope"
                )));
            }
        })
    })?;
    Ok(LoadBalancer {
        routing_preferences,
        mode: match known(lb.mode, "load_balancing.mode")? {
            Mode::UnspecifiedMode => LoadBalancerMode::Standard,
            Mode::Strict => LoadBalancerMode::Strict,
            Mode::Failover => LoadBalancerMode::Failover,
            Mode::Passthrough => LoadBalancerMode::Passthrough,
        },
        health_policy: match known(lb.health_policy, "load_balancing.health_policy")? {
            WireHealth::OnlyHealthy => HealthPolicy::OnlyHealthy,
            WireHealth::AllowAll => HealthPolicy::AllowAll,
        },
    })
}

fn gateway(g: istio::workload::GatewayAddress, field: &str) -> Result<GatewayAddress, Problem> {
    let destination = match g.destination {
        Some(gateway_address::Destination::Address(address)) => {
            GatewayDestination::Address(network_address(address, || format!("{field}.address"))?)
        }
        Some(gateway_address::Destination::Hostname(name)) => {
            GatewayDestination::Hostname(NamespacedHostname::new(&name.namespace, &name.hostname))
        }
        None => {
            return Err(Problem::Unusable(format!(
                "{field}: neither an address nor a hostname"
            )));
        }
    };
    // Protobuf cannot tell 0 from unset, and unset is HBONE's port (as in the local config).
    let hbone_mtls_port = match g.hbone_mtls_port {
        0 => ztunnel_common::ports::HBONE,
        other => port(other, || format!("{field}.hbone_mtls_port"))?,
    };
    Ok(GatewayAddress {
        destination,
        hbone_mtls_port,
    })
}

fn network_address(
    address: istio::workload::NetworkAddress,
    field: impl FnOnce() -> String,
) -> Result<NetworkAddress, Problem> {
    Ok(NetworkAddress {
        ip: ip(&address.address, field)?,
        network: address.network,
    })
}

/// Service port -> target port.
fn port_map<Ports: FromIterator<(u16, u16)>>(
    ports: &[istio::workload::Port],
    field: impl Fn() -> String,
) -> Result<Ports, Problem> {
    ports
        .iter()
        .map(|p| Ok((port(p.service_port, &field)?, port(p.target_port, &field)?)))
        .collect()
}

fn policy(a: istio::security::Authorization) -> Result<Policy, Problem> {
    let scope = match known(a.scope, "scope")? {
        istio::security::Scope::Global => Scope::Global,
        istio::security::Scope::Namespace => Scope::Namespace,
        istio::security::Scope::WorkloadSelector => Scope::WorkloadSelector,
    };
    let action = match known(a.action, "action")? {
        istio::security::Action::Allow => Action::Allow,
        istio::security::Action::Deny => Action::Deny,
    };
    let rules = each(a.rules, |r, rule| {
        each(rule.clauses, |c, clause| {
            each(clause.matches, |m, matcher| {
                policy_match(matcher, &format!("rules[{r}][{c}][{m}]"))
            })
        })
    })?;
    let policy = Policy {
        name: a.name,
        namespace: a.namespace,
        scope,
        action,
        rules,
        dry_run: a.dry_run,
    };
    policy.validate()?;
    Ok(policy)
}

/// One match of a policy's clause; `at` is where it is (`rules[r][c][m]`).
fn policy_match(m: istio::security::Match, at: &str) -> Result<Match, Problem> {
    Ok(Match {
        namespaces: string_matches(m.namespaces, at, "namespaces")?,
        not_namespaces: string_matches(m.not_namespaces, at, "not_namespaces")?,
        principals: string_matches(m.principals, at, "principals")?,
        not_principals: string_matches(m.not_principals, at, "not_principals")?,
        service_accounts: m.service_accounts.into_iter().map(account).collect(),
        not_service_accounts: m.not_service_accounts.into_iter().map(account).collect(),
        source_ips: nets(&m.source_ips, at, "source_ips")?,
        not_source_ips: nets(&m.not_source_ips, at, "not_source_ips")?,
        destination_ips: nets(&m.destination_ips, at, "destination_ips")?,
        not_destination_ips: nets(&m.not_destination_ips, at, "not_destination_ips")?,
        destination_ports: ports(&m.destination_ports, at, "destination_ports")?,
        not_destination_ports: ports(&m.not_destination_ports, at, "not_destination_ports")?,
    })
}

fn string_matches(
    matches: Vec<istio::security::StringMatch>,
    at: &str,
    field: &str,
) -> Result<Vec<StringMatch>, Problem> {
    each(matches, |i, m| match m.match_type {
        Some(MatchType::Exact(s)) => Ok(StringMatch::Exact(s)),
        Some(MatchType::Prefix(s)) => Ok(StringMatch::Prefix(s)),
        Some(MatchType::Suffix(s)) => Ok(StringMatch::Suffix(s)),
        Some(MatchType::Presence(_)) => Ok(StringMatch::Presence()),
        None => Err(Problem::Unusable(format!(
            "{at}.{field}[{i}]: a string match of no kind"
        ))),
    })
}

fn account(a: istio::security::ServiceAccountMatch) -> ServiceAccountMatch {
    ServiceAccountMatch {
        namespace: a.namespace,
        service_account: a.service_account,
    }
}

/// CIDRs: an address and a prefix length no longer than the address.
fn nets(
    addresses: &[istio::security::Address],
    at: &str,
    field: &str,
) -> Result<Vec<IpNet>, Problem> {
    each(addresses, |i, a| {
        let place = || format!("{at}.{field}[{i}]");
        let ip = ip(&a.address, place)?;
        u8::try_from(a.length)
            .ok()
            .and_then(|length| IpNet::new(ip, length).ok())
            .ok_or_else(|| {
                Problem::Unusable(format!(
                    "{}: prefix length {} is longer than {ip}",
                    place(),
                    a.length
                ))
            })
    })
}

fn ports(values: &[u32], at: &str, field: &str) -> Result<Vec<u16>, Problem> {
    each(values, |i, &value| {
        port(value, || format!("{at}.{field}[{i}]"))
    })
}

/// Each item of a list converted, given its index for errors; or the first error.
fn each<T, U>(
    items: impl IntoIterator<Item = T>,
    convert: impl Fn(usize, T) -> Result<U, Problem>,
) -> Result<Vec<U>, Problem> {
    // Sized up front: collecting `Result`s loses the length, and a list grown from empty keeps
    // room for four (a policy's one 288-byte match took 1.2 KB).
    let items = items.into_iter();
    let mut converted = Vec::with_capacity(items.size_hint().0);
    for (i, item) in items.enumerate() {
        converted.push(convert(i, item)?);
    }
    Ok(converted)
}

/// An IP as the wire carries it: 4 bytes (IPv4) or 16 (IPv6).
fn ip(bytes: &[u8], field: impl FnOnce() -> String) -> Result<IpAddr, Problem> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Ok(IpAddr::from(v4));
    }
    if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        return Ok(IpAddr::from(v6));
    }
    Err(Problem::AddressLength {
        field: field(),
        len: bytes.len(),
    })
}

fn port(value: u32, field: impl FnOnce() -> String) -> Result<u16, Problem> {
    u16::try_from(value)
        .map_err(|_| Problem::Unusable(format!("{}: {value} is not a port", field())))
}

/// An enum field's value, which must be one this build knows.
fn known<E: TryFrom<i32>>(value: i32, field: &'static str) -> Result<E, Problem> {
    E::try_from(value).map_err(|_| Problem::UnknownEnum { field, value })
}

/// Protobuf's empty string is an unset field: `default` then, as in Istio's ztunnel.
fn or_default(value: String, default: &str) -> String {
    if value.is_empty() {
        default.to_owned()
    } else {
        value
    }
}
