//! Where the resources of a response go: the `XdsSink` the client hands each response's
//! converted changes to, and `apply_to_model`, what a sink over the mesh model does with them
//! (the daemon's `ProxyContext` is one, in `proxy::authorize`).

use super::super::convert::{
    address_change, address_removal, authorization_change, authorization_removal,
};
use super::super::proto::envoy::service::discovery::v3::Resource;
use super::response;
use crate::mesh::Applied;
use crate::mesh::config::{Change, MeshConfig, Refused};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

/// A type of resource the client subscribes to (every resource of it: wildcard).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ResourceKind {
    /// `istio.workload.Address`: a workload (named by its uid) or a service
    /// (`namespace/hostname`).
    Address,
    /// `istio.security.Authorization`: a policy (`namespace/name`).
    Authorization,
}

impl ResourceKind {
    /// Every type subscribed to, in the order of the initial requests.
    pub const ALL: [ResourceKind; 2] = [ResourceKind::Address, ResourceKind::Authorization];

    pub fn type_url(self) -> &'static str {
        match self {
            ResourceKind::Address => "type.googleapis.com/istio.workload.Address",
            ResourceKind::Authorization => "type.googleapis.com/istio.security.Authorization",
        }
    }

    pub fn from_type_url(type_url: &str) -> Option<ResourceKind> {
        ResourceKind::ALL
            .into_iter()
            .find(|kind| kind.type_url() == type_url)
    }

    /// The change a resource of this type makes, or why it cannot be taken.
    fn change(self, resource: &Resource) -> Result<Change, Rejected> {
        let Some(any) = &resource.resource else {
            return Err(Rejected::new(&resource.name, "the entry holds no resource"));
        };
        let change = match self {
            ResourceKind::Address => address_change(&resource.name, any),
            ResourceKind::Authorization => authorization_change(&resource.name, any),
        };
        change.map_err(|err| Rejected::new(err.name(), err.problem()))
    }
}

/// A resource of a response, converted: its name in the response and the change it makes.
#[derive(Clone, Debug, PartialEq)]
pub struct Upsert {
    pub name: String,
    pub change: Change,
}

impl Upsert {
    /// The name its version is held under: a workload's own uid when that is the name (as
    /// istiod names workloads), so that the model and the versions share one string.
    pub(super) fn held_name(&self) -> Arc<str> {
        match &self.change {
            Change::Workload(workload) if *workload.uid == *self.name => workload.uid.clone(),
            _ => Arc::from(self.name.as_str()),
        }
    }
}

/// A resource that was not taken: its name and why, as a NACK lists it (`<name>: <reason>`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{name}: {reason}")]
pub struct Rejected {
    pub name: String,
    pub reason: String,
}

impl Rejected {
    pub fn new(name: impl Into<String>, reason: impl ToString) -> Rejected {
        Rejected {
            name: name.into(),
            reason: reason.to_string(),
        }
    }
}

/// Why a whole response could not be applied (the kernel's maps refused the result): every
/// resource of it is NACKed, and the config in force stays.
pub type SinkError = Box<dyn std::error::Error + Send + Sync>;

/// The resources of one response, converted, for the sink: to apply as one batch, the
/// `upserts` first, then the removal of the resources named `removed`.
#[derive(Clone, Debug, PartialEq)]
pub struct XdsBatch {
    pub kind: ResourceKind,
    pub upserts: Vec<Upsert>,
    pub removed: Vec<String>,
}

/// Takes the resources of each response, in the order they come. The client converts them
/// first (a resource that does not convert is NACKed and never reaches the sink).
pub trait XdsSink: Send + Sync {
    /// Applies `batch` (names removed that are already gone are no error). Returns the
    /// upserts the model refused, by their names in the batch (the others stay applied); an
    /// `Err` when nothing was applied.
    fn apply(&self, batch: XdsBatch) -> Result<Vec<Rejected>, SinkError>;
}

/// The changes of one response for the mesh model, made from the version in force when the
/// batch is applied (a removed Address is looked up there as a workload, then a service).
pub(crate) struct MeshBatch {
    kind: ResourceKind,
    upserts: Vec<Change>,
    removed: Vec<String>,
}

impl MeshBatch {
    /// The batch's changes against `config`: the upserts, then the removals.
    pub(crate) fn changes(self, config: &MeshConfig) -> Vec<Change> {
        let mut changes = self.upserts;
        changes.extend(self.removed.iter().filter_map(|name| match self.kind {
            ResourceKind::Address => address_removal(config, name),
            ResourceKind::Authorization => Some(authorization_removal(name)),
        }));
        changes
    }
}

/// `XdsSink::apply` for a sink over the mesh model: `apply` makes the `MeshBatch`'s changes
/// (through `Mesh::apply`, with the kernel's maps), and what the model refuses (by the
/// entry's uid or key) is named by the resources that carried it.
pub(crate) fn apply_to_model<E>(
    batch: XdsBatch,
    apply: impl FnOnce(MeshBatch) -> Result<Applied, E>,
) -> Result<Vec<Rejected>, E> {
    let mut carriers: HashMap<String, Vec<String>> = HashMap::new();
    let upserts = batch
        .upserts
        .into_iter()
        .map(|upsert| {
            if let Some(key) = entry_key(&upsert.change) {
                carriers.entry(key).or_default().push(upsert.name);
            }
            upsert.change
        })
        .collect();
    let applied = apply(MeshBatch {
        kind: batch.kind,
        upserts,
        removed: batch.removed,
    })?;
    Ok(applied
        .refused
        .into_iter()
        .flat_map(|Refused { name: key, problem }| {
            let names = carriers.remove(&key).unwrap_or_else(|| vec![key]);
            let reason = problem.to_string();
            names
                .into_iter()
                .map(move |name| Rejected::new(name, &reason))
        })
        .collect())
}

/// The uid or key the model knows an added entry by.
fn entry_key(change: &Change) -> Option<String> {
    match change {
        Change::Workload(workload) => Some(workload.uid.to_string()),
        Change::Service(service) => Some(service.key()),
        Change::Policy(policy) => Some(policy.key()),
        Change::RemoveWorkload(_) | Change::RemoveService(_) | Change::RemovePolicy(_) => None,
    }
}

/// A response's resources, converted: each good one's upsert and version, and why each of
/// the others cannot be taken.
pub(super) struct Converted {
    pub(super) upserts: Vec<(Upsert, String)>,
    pub(super) rejected: Vec<Rejected>,
}

/// The resources of a response of `kind`, each decoded and converted in turn; or why one does
/// not decode.
pub(super) fn convert(
    kind: ResourceKind,
    resources: Vec<Bytes>,
) -> Result<Converted, prost::DecodeError> {
    let mut upserts = Vec::with_capacity(resources.len());
    let mut rejected = Vec::new();
    for bytes in resources {
        let resource = response::resource(bytes)?;
        match kind.change(&resource) {
            Ok(change) => upserts.push((
                Upsert {
                    name: resource.name,
                    change,
                },
                resource.version,
            )),
            Err(rejection) => rejected.push(rejection),
        }
    }
    Ok(Converted { upserts, rejected })
}
