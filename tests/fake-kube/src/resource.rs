//! The two resources served (core v1 namespaces and pods) and what the server knows of each:
//! names, scope, and the fields a field selector may name.

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Namespaces,
    Pods,
}

impl Resource {
    pub fn from_plural(plural: &str) -> Option<Self> {
        match plural {
            "namespaces" => Some(Self::Namespaces),
            "pods" => Some(Self::Pods),
            _ => None,
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Self::Namespaces => "namespaces",
            Self::Pods => "pods",
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Self::Namespaces => "Namespace",
            Self::Pods => "Pod",
        }
    }

    pub fn list_kind(self) -> &'static str {
        match self {
            Self::Namespaces => "NamespaceList",
            Self::Pods => "PodList",
        }
    }

    pub fn namespaced(self) -> bool {
        self == Self::Pods
    }

    /// Where a field selector's field lives in the object: the fields the real server
    /// indexes for the resource (any other is refused there too).
    pub fn selectable_field(self, field: &str) -> Option<&'static str> {
        let pointer = match (self, field) {
            (_, "metadata.name") => "/metadata/name",
            (_, "metadata.namespace") => "/metadata/namespace",
            (_, "status.phase") => "/status/phase",
            (Self::Pods, "spec.nodeName") => "/spec/nodeName",
            (Self::Pods, "spec.restartPolicy") => "/spec/restartPolicy",
            (Self::Pods, "spec.schedulerName") => "/spec/schedulerName",
            (Self::Pods, "spec.serviceAccountName") => "/spec/serviceAccountName",
            (Self::Pods, "spec.hostNetwork") => "/spec/hostNetwork",
            (Self::Pods, "status.podIP") => "/status/podIP",
            (Self::Pods, "status.nominatedNodeName") => "/status/nominatedNodeName",
            _ => return None,
        };
        Some(pointer)
    }

    /// `GET /api/v1`'s entry for the resource and its subresources, for discovery.
    pub fn discovery(self) -> Vec<Value> {
        let verbs = [
            "create", "delete", "get", "list", "patch", "update", "watch",
        ];
        let short = match self {
            Self::Namespaces => "ns",
            Self::Pods => "po",
        };
        vec![
            serde_json::json!({
                "name": self.plural(),
                "singularName": self.kind().to_ascii_lowercase(),
                "namespaced": self.namespaced(),
                "kind": self.kind(),
                "verbs": verbs,
                "shortNames": [short],
            }),
            serde_json::json!({
                "name": format!("{}/status", self.plural()),
                "singularName": "",
                "namespaced": self.namespaced(),
                "kind": self.kind(),
                "verbs": ["get", "patch", "update"],
            }),
        ]
    }
}
