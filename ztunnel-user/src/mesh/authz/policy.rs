//! Authorization policies as the mesh config writes them: Istio ztunnel's local-config shape
//! (rules of clauses of matches), `deny_unknown_fields` so a typo is an error, not a hole.

use crate::mesh::FieldError;
use ipnet::IpNet;
use serde::de::{self, EnumAccess, MapAccess, VariantAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;
use std::net::IpAddr;

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    /// Any rule matching makes the policy match; no rules match nothing.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Only logged, never enforced.
    #[serde(default)]
    pub dry_run: bool,
}

/// A rule matches when all its clauses match.
pub type Rule = Vec<Clause>;
/// A clause matches when any of its matches does (an empty clause matches).
pub type Clause = Vec<Match>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum Scope {
    /// Every workload.
    Global,
    /// The workloads of the policy's namespace.
    Namespace,
    /// The workloads that list the policy in `authorizationPolicies`.
    WorkloadSelector,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum Action {
    Allow,
    Deny,
}

/// All set fields must match; within a field any value; a `not` field matches when none does.
/// A match with no field set never matches.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Match {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccountMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    #[serde(
        default,
        deserialize_with = "nets",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub source_ips: Vec<IpNet>,
    #[serde(
        default,
        deserialize_with = "nets",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub not_source_ips: Vec<IpNet>,
    #[serde(
        default,
        deserialize_with = "nets",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub destination_ips: Vec<IpNet>,
    #[serde(
        default,
        deserialize_with = "nets",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub not_destination_ips: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
}

/// Istio's string match, externally tagged: `{Exact: s}`, `{Prefix: s}`, `{Suffix: s}`,
/// `{Presence: []}` (YAML tags such as `!Exact s` are read too).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any non-empty value.
    Presence(),
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence() => !value.is_empty(),
        }
    }
}

impl Match {
    /// A match that sets no field: Istio skips it.
    pub fn is_empty(&self) -> bool {
        *self == Match::default()
    }

    fn shrink_to_fit(&mut self) {
        self.namespaces.shrink_to_fit();
        self.not_namespaces.shrink_to_fit();
        self.principals.shrink_to_fit();
        self.not_principals.shrink_to_fit();
        self.service_accounts.shrink_to_fit();
        self.not_service_accounts.shrink_to_fit();
        self.source_ips.shrink_to_fit();
        self.not_source_ips.shrink_to_fit();
        self.destination_ips.shrink_to_fit();
        self.not_destination_ips.shrink_to_fit();
        self.destination_ports.shrink_to_fit();
        self.not_destination_ports.shrink_to_fit();
    }
}

impl Policy {
    /// Trims every list to its length (see `MeshFile::parse`).
    pub(crate) fn shrink_to_fit(&mut self) {
        self.rules.shrink_to_fit();
        for rule in &mut self.rules {
            rule.shrink_to_fit();
            for clause in rule {
                clause.shrink_to_fit();
                clause.iter_mut().for_each(Match::shrink_to_fit);
            }
        }
    }

    /// `namespace/name`, as workloads' `authorizationPolicies` name it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Checks what serde cannot; the problem names the field.
    pub fn validate(&self) -> Result<(), FieldError> {
        for (field, value) in [("name", &self.name), ("namespace", &self.namespace)] {
            if value.is_empty() {
                return Err(FieldError::new(format!("field {field} must not be empty")));
            }
            if value.contains('/') {
                return Err(FieldError::new(format!(
                    "field {field} must not contain '/'"
                )));
            }
        }
        for (r, rule) in self.rules.iter().enumerate() {
            for (c, clause) in rule.iter().enumerate() {
                for (m, matcher) in clause.iter().enumerate() {
                    let ports = [
                        ("destinationPorts", &matcher.destination_ports),
                        ("notDestinationPorts", &matcher.not_destination_ports),
                    ];
                    for (field, ports) in ports {
                        if ports.contains(&0) {
                            return Err(FieldError::new(format!(
                                "rules[{r}][{c}][{m}].{field}: port 0 is not a port"
                            )));
                        }
                    }
                    let accounts = [
                        ("serviceAccounts", &matcher.service_accounts),
                        ("notServiceAccounts", &matcher.not_service_accounts),
                    ];
                    for (field, accounts) in accounts {
                        if accounts
                            .iter()
                            .any(|a| a.namespace.is_empty() || a.service_account.is_empty())
                        {
                            return Err(FieldError::new(format!(
                                "rules[{r}][{c}][{m}].{field}: namespace and serviceAccount must not be empty"
                            )));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// CIDRs, or bare addresses as single-address networks.
fn nets<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<IpNet>, D::Error> {
    Vec::<String>::deserialize(deserializer)?
        .iter()
        .map(|text| {
            text.parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    serde::de::Error::custom(format!("{text:?} is not an address or CIDR"))
                })
        })
        .collect()
}

const STRING_MATCHES: &[&str] = &["Exact", "Prefix", "Suffix", "Presence"];

impl<'de> Deserialize<'de> for StringMatch {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StringMatchVisitor)
    }
}

struct StringMatchVisitor;

impl<'de> Visitor<'de> for StringMatchVisitor {
    type Value = StringMatch;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("one of {Exact: s}, {Prefix: s}, {Suffix: s}, {Presence: []}")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StringMatch, A::Error> {
        let Some(kind) = map.next_key::<String>()? else {
            return Err(de::Error::invalid_length(0, &self));
        };
        let value = match kind.as_str() {
            "Exact" => StringMatch::Exact(map.next_value()?),
            "Prefix" => StringMatch::Prefix(map.next_value()?),
            "Suffix" => StringMatch::Suffix(map.next_value()?),
            "Presence" => {
                map.next_value::<de::IgnoredAny>()?;
                StringMatch::Presence()
            }
            other => return Err(de::Error::unknown_variant(other, STRING_MATCHES)),
        };
        if map.next_key::<String>()?.is_some() {
            return Err(de::Error::invalid_length(2, &self));
        }
        Ok(value)
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<StringMatch, A::Error> {
        let (kind, variant) = data.variant::<String>()?;
        match kind.as_str() {
            "Exact" => variant.newtype_variant().map(StringMatch::Exact),
            "Prefix" => variant.newtype_variant().map(StringMatch::Prefix),
            "Suffix" => variant.newtype_variant().map(StringMatch::Suffix),
            "Presence" => variant
                .newtype_variant::<de::IgnoredAny>()
                .map(|_| StringMatch::Presence()),
            other => Err(de::Error::unknown_variant(other, STRING_MATCHES)),
        }
    }
}
