//! Istio's standard TCP metric labels, made once per connection from what the connection is
//! (`Observed`), shared by its metrics, its record and its access log line.

use crate::identity::Identity;
use crate::mesh::config::{Service, Workload};
use prometheus_client::encoding::EncodeLabelSet;

/// The value of an unknown label, as Istio writes it.
const UNKNOWN: &str = "unknown";

/// Which side's proxy reports a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Reporter {
    Source,
    Destination,
}

/// Istio's `response_flags`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum ResponseFlags {
    None,
    /// Authorization denied the connection.
    Denied,
    /// The upstream could not be reached.
    ConnectFailed,
}

/// Istio's standard TCP metric labels (less locality, which this proxy does not know).
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct TrafficLabels {
    reporter: &'static str,
    source_workload: String,
    source_canonical_service: String,
    source_canonical_revision: String,
    source_workload_namespace: String,
    source_principal: String,
    source_app: String,
    source_version: String,
    source_cluster: String,
    destination_service: String,
    destination_service_namespace: String,
    destination_service_name: String,
    destination_workload: String,
    destination_canonical_service: String,
    destination_canonical_revision: String,
    destination_workload_namespace: String,
    destination_principal: String,
    destination_app: String,
    destination_version: String,
    destination_cluster: String,
    request_protocol: &'static str,
    response_flags: &'static str,
    connection_security_policy: &'static str,
}

/// A workload as the labels describe it: from its mesh config entry, or (for an enrolled pod
/// the config does not list) just its name and namespace.
pub(crate) struct Described<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub workload: Option<&'a Workload>,
}

impl<'a> From<&'a Workload> for Described<'a> {
    fn from(workload: &'a Workload) -> Self {
        Described {
            name: &workload.name,
            namespace: &workload.namespace,
            workload: Some(workload),
        }
    }
}

/// The labels of one side: workload, canonical service, revision, namespace, cluster.
struct SideLabels {
    workload: String,
    canonical_service: String,
    canonical_revision: String,
    namespace: String,
    cluster: String,
}

impl SideLabels {
    fn of(side: Option<&Described>) -> SideLabels {
        let Some(side) = side else {
            return SideLabels {
                workload: UNKNOWN.into(),
                canonical_service: UNKNOWN.into(),
                canonical_revision: UNKNOWN.into(),
                namespace: UNKNOWN.into(),
                cluster: UNKNOWN.into(),
            };
        };
        let set = |value: Option<&str>, fallback: &str| {
            value
                .filter(|v| !v.is_empty())
                .unwrap_or(fallback)
                .to_owned()
        };
        let workload = set(side.workload.map(|w| &*w.workload_name), side.name);
        SideLabels {
            canonical_service: set(side.workload.map(|w| &*w.canonical_name), &workload),
            canonical_revision: set(side.workload.map(|w| &*w.canonical_revision), "latest"),
            namespace: side.namespace.to_owned(),
            cluster: set(side.workload.map(|w| &*w.cluster_id), "Kubernetes"),
            workload,
        }
    }
}

/// What the labels of a connection are made of.
pub(crate) struct Observed<'a> {
    pub reporter: Reporter,
    pub source: Option<Described<'a>>,
    /// The identity the source proved (mTLS) or is known by (same node); none for plaintext.
    pub source_identity: Option<&'a Identity>,
    pub destination: Option<Described<'a>>,
    pub destination_identity: Option<&'a Identity>,
    /// The service the client addressed (a VIP), if it did.
    pub service: Option<&'a Service>,
    /// Whether the hop carried mesh identities (HBONE, or the same-node path between two
    /// enrolled pods).
    pub mutual_tls: bool,
}

impl TrafficLabels {
    pub(crate) fn new(observed: &Observed) -> TrafficLabels {
        let source = SideLabels::of(observed.source.as_ref());
        let destination = SideLabels::of(observed.destination.as_ref());
        let principal =
            |identity: Option<&Identity>| identity.map_or(UNKNOWN.into(), ToString::to_string);
        let service =
            |field: fn(&Service) -> String| observed.service.map_or(UNKNOWN.into(), field);
        TrafficLabels {
            reporter: match observed.reporter {
                Reporter::Source => "source",
                Reporter::Destination => "destination",
            },
            source_app: source.canonical_service.clone(),
            source_version: source.canonical_revision.clone(),
            source_workload: source.workload,
            source_canonical_service: source.canonical_service,
            source_canonical_revision: source.canonical_revision,
            source_workload_namespace: source.namespace,
            source_principal: principal(observed.source_identity),
            source_cluster: source.cluster,
            destination_service: service(|s| s.hostname.clone()),
            destination_service_namespace: service(|s| s.namespace.clone()),
            destination_service_name: service(|s| s.name.clone()),
            destination_app: destination.canonical_service.clone(),
            destination_version: destination.canonical_revision.clone(),
            destination_workload: destination.workload,
            destination_canonical_service: destination.canonical_service,
            destination_canonical_revision: destination.canonical_revision,
            destination_workload_namespace: destination.namespace,
            destination_principal: principal(observed.destination_identity),
            destination_cluster: destination.cluster,
            request_protocol: "tcp",
            response_flags: ResponseFlags::None.label(),
            connection_security_policy: if observed.mutual_tls {
                "mutual_tls"
            } else {
                UNKNOWN
            },
        }
    }

    /// The same labels with the outcome's flags, for the metrics of a closed connection.
    pub(crate) fn with_flags(&self, flags: ResponseFlags) -> TrafficLabels {
        TrafficLabels {
            response_flags: flags.label(),
            ..self.clone()
        }
    }

    pub(crate) fn source_workload(&self) -> &str {
        &self.source_workload
    }

    pub(crate) fn source_namespace(&self) -> &str {
        &self.source_workload_namespace
    }

    pub(crate) fn source_principal(&self) -> &str {
        &self.source_principal
    }

    pub(crate) fn destination_workload(&self) -> &str {
        &self.destination_workload
    }

    pub(crate) fn destination_namespace(&self) -> &str {
        &self.destination_workload_namespace
    }

    pub(crate) fn destination_principal(&self) -> &str {
        &self.destination_principal
    }

    pub(crate) fn destination_service(&self) -> &str {
        &self.destination_service
    }
}

impl ResponseFlags {
    pub(crate) const ALL: [ResponseFlags; 3] = [
        ResponseFlags::None,
        ResponseFlags::Denied,
        ResponseFlags::ConnectFailed,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            ResponseFlags::None => "-",
            ResponseFlags::Denied => "DENY",
            ResponseFlags::ConnectFailed => "CONNECT",
        }
    }
}
