//! What the kernel can decide alone about a plaintext client (one without an identity): the
//! verdict by destination port and source prefix, exact for every source and port.
//!
//! For an identity-less client the verdict depends only on which of the CIDRs the policies
//! name contain the source, and on whether the port is one they name. The named CIDRs are
//! nested or disjoint, so the most specific one containing a source fixes its class; one
//! evaluation per (class, port) gives a table that an LPM trie looks up exactly.

use super::{Connection, Decision, DenyReason, Facts, Match, Policies, Policy, Target};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Above this many rules for one workload the kernel is left out (the proxy still decides).
pub(super) const MAX_RULES: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlaintextPlan {
    pub rules: Vec<PlaintextRule>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlaintextRule {
    /// None: every port without rules of its own.
    pub port: Option<u16>,
    pub source: IpNet,
    /// None: allowed.
    pub verdict: Option<DenyReason>,
}

impl PlaintextPlan {
    /// The kernel's lookup: the longest prefix among the port's own rules, else among the
    /// rules for any port.
    pub fn lookup(&self, source: IpAddr, port: u16) -> Option<DenyReason> {
        let source = source.to_canonical();
        let own = self.rules.iter().any(|r| r.port == Some(port));
        let group = if own { Some(port) } else { None };
        self.rules
            .iter()
            .filter(|r| r.port == group && r.source.contains(&source))
            .max_by_key(|r| r.source.prefix_len())
            .and_then(|r| r.verdict)
    }
}

impl Policies {
    /// The plan for plaintext clients of `target`; None when the policies look at the
    /// destination address (the kernel's table has no room for it) or it would be too large.
    pub fn plaintext_plan(&self, target: &Target) -> Option<PlaintextPlan> {
        let (groups, selected) = self.applicable(target);
        let grouped = groups.iter().flat_map(|g| {
            let members = [&g.enforced.deny, &g.enforced.allow].map(|index| index.members());
            members.into_iter().flatten().map(|&i| &g.policies[i])
        });
        let enforced: Vec<&Policy> = grouped
            .chain(selected.iter().copied().filter(|i| !i.policy.dry_run))
            .map(|i| &*i.policy)
            .collect();
        let matches = || {
            enforced
                .iter()
                .flat_map(|policy| policy.rules.iter().flatten().flatten())
        };
        if matches().any(|m| !m.destination_ips.is_empty() || !m.not_destination_ips.is_empty()) {
            return None;
        }
        // Both families' /0: every source falls in some class.
        let mut nets: BTreeSet<IpNet> =
            [IpNet::V4(Ipv4Net::default()), IpNet::V6(Ipv6Net::default())].into();
        let mut ports = BTreeSet::new();
        for m in matches() {
            nets.extend(source_nets(m).map(|n| n.trunc()));
            ports.extend(
                m.destination_ports
                    .iter()
                    .chain(&m.not_destination_ports)
                    .copied(),
            );
        }
        // A v6 prefix inside the v4-mapped block would be matched by v4 clients in the
        // kernel's 16-byte space but not here.
        if nets.iter().any(|n| match n {
            IpNet::V6(v6) => v6.prefix_len() > 96 && v6.addr().to_ipv4_mapped().is_some(),
            IpNet::V4(_) => false,
        }) {
            return None;
        }
        if nets.len() * (ports.len() + 1) > MAX_RULES {
            return None;
        }
        let other_port = (1..=u16::MAX).find(|p| !ports.contains(p))?;
        let representatives: Vec<(IpNet, IpAddr)> = nets
            .iter()
            .filter_map(|net| representative(net, &nets).map(|ip| (*net, ip)))
            .collect();
        let port_groups = ports
            .iter()
            .map(|&p| (Some(p), p))
            .chain([(None, other_port)]);
        let mut rules = Vec::new();
        for (port, probe) in port_groups {
            for &(source, ip) in &representatives {
                let connection = Connection {
                    source: ip,
                    destination: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), probe),
                    identity: None,
                };
                let verdict = match self.decide(&groups, &selected, &Facts::of(&connection), false)
                {
                    Decision::Allow => None,
                    Decision::Deny(denial) => Some(denial.reason),
                };
                rules.push(PlaintextRule {
                    port,
                    source,
                    verdict,
                });
            }
        }
        Some(PlaintextPlan { rules })
    }
}

fn source_nets(m: &Match) -> impl Iterator<Item = IpNet> + '_ {
    m.source_ips.iter().chain(&m.not_source_ips).copied()
}

/// An address of `net` in no more specific net of `all`, if there is one.
fn representative(net: &IpNet, all: &BTreeSet<IpNet>) -> Option<IpAddr> {
    let (start, end) = range(net);
    // More specific nets of the same family inside `net`, by start (larger first on ties).
    let mut inside: Vec<(u128, u128)> = all
        .iter()
        .filter(|other| {
            other.prefix_len() > net.prefix_len()
                && matches!(
                    (net, other),
                    (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
                )
                && net.contains(*other)
        })
        .map(range)
        .collect();
    inside.sort_by_key(|&(s, e)| (s, std::cmp::Reverse(e)));
    let mut candidate = start;
    for (s, e) in inside {
        if s > candidate {
            break;
        }
        if e >= candidate {
            candidate = e.checked_add(1)?;
        }
    }
    (candidate <= end).then(|| match net {
        IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(candidate as u32)),
        IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(candidate)),
    })
}

/// First and last address of a net, as integers.
fn range(net: &IpNet) -> (u128, u128) {
    match net {
        IpNet::V4(v4) => (
            u128::from(u32::from(v4.network())),
            u128::from(u32::from(v4.broadcast())),
        ),
        IpNet::V6(v6) => (u128::from(v6.network()), u128::from(v6.broadcast())),
    }
}
