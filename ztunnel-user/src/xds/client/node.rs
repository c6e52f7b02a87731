//! Who the client says it is (the `Node` of every initial request, as Istio's ztunnel builds
//! it) and how it authenticates (`istiod::Credentials`, at every stream opening).

use super::super::proto::envoy::config::core::v3::Node;
use crate::istiod::Credentials;
use prost_types::{Struct, Value, value::Kind};
use std::net::IpAddr;

/// The prefix of the environment variables that become node metadata (without it).
const ISTIO_META_PREFIX: &str = "ISTIO_META_";
/// The `INSTANCE_IP` Istio's ztunnel uses when none is set.
const DEFAULT_INSTANCE_IP: &str = "1.1.1.1";

/// What the client needs to talk to istiod, whatever the channel.
#[derive(Clone, Debug, PartialEq)]
pub struct XdsConfig {
    /// `Node.id`: `ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`
    /// (`NodeFacts::node_id`); istiod takes the proxy's type from its first field.
    pub node_id: String,
    /// `Node.metadata`, a Struct of strings (`NodeFacts::metadata`).
    pub node_metadata: Struct,
    /// The headers of every stream opening.
    pub credentials: Credentials,
}

impl XdsConfig {
    /// The config Istio's ztunnel would run with on this node: its `Node` from `facts` and
    /// the `ISTIO_META_*` variables of `env` (`std::env::vars()`), authenticating with
    /// `credentials`.
    pub fn for_node(
        facts: &NodeFacts,
        env: impl IntoIterator<Item = (String, String)>,
        credentials: Credentials,
    ) -> XdsConfig {
        XdsConfig {
            node_id: facts.node_id(),
            node_metadata: facts.metadata(env),
            credentials,
        }
    }

    pub(super) fn node(&self) -> Node {
        Node {
            id: self.node_id.clone(),
            metadata: Some(self.node_metadata.clone()),
            ..Node::default()
        }
    }
}

/// The downward-API facts Istio's ztunnel reads from its environment to name itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// `INSTANCE_IP`, the proxy pod's IP; `1.1.1.1` when unset, as in Istio's ztunnel.
    pub instance_ip: Option<IpAddr>,
    /// `POD_NAME`, `POD_NAMESPACE`: the proxy's own pod.
    pub pod_name: String,
    pub pod_namespace: String,
    /// `NODE_NAME`.
    pub node_name: String,
    /// `ISTIO_META_CLUSTER_ID`, else `CLUSTER_ID`, else `Kubernetes` (the caller resolves it).
    pub cluster_id: String,
}

impl NodeFacts {
    fn instance_ip(&self) -> String {
        self.instance_ip
            .map_or_else(|| DEFAULT_INSTANCE_IP.to_owned(), |ip| ip.to_string())
    }

    /// `ztunnel~<INSTANCE_IP>~<POD_NAME>.<POD_NAMESPACE>~<POD_NAMESPACE>.svc.cluster.local`.
    pub fn node_id(&self) -> String {
        let (ip, pod, ns) = (self.instance_ip(), &self.pod_name, &self.pod_namespace);
        format!("ztunnel~{ip}~{pod}.{ns}~{ns}.svc.cluster.local")
    }

    /// `NAME`, `NAMESPACE`, `INSTANCE_IPS` and `NODE_NAME`; then each `ISTIO_META_<K>` of
    /// `env` as `<K>` (replacing those, as in Istio's ztunnel); last `CLUSTER_ID`, always
    /// sent (Istio's chart sets `ISTIO_META_CLUSTER_ID`, which `cluster_id` already took).
    /// Every value is a string; `ISTIO_METAJSON_*` and a ProxyConfig's `proxyMetadata` are
    /// not read.
    pub fn metadata(&self, env: impl IntoIterator<Item = (String, String)>) -> Struct {
        let mut fields = [
            ("NAME", self.pod_name.clone()),
            ("NAMESPACE", self.pod_namespace.clone()),
            ("INSTANCE_IPS", self.instance_ip()),
            ("NODE_NAME", self.node_name.clone()),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), string_value(value)))
        .collect::<std::collections::BTreeMap<_, _>>();
        for (key, value) in env {
            match key.strip_prefix(ISTIO_META_PREFIX) {
                Some(name) if !name.is_empty() => {
                    fields.insert(name.to_owned(), string_value(value));
                }
                _ => {}
            }
        }
        fields.insert(
            "CLUSTER_ID".to_owned(),
            string_value(self.cluster_id.clone()),
        );
        Struct { fields }
    }
}

fn string_value(value: String) -> Value {
    Value {
        kind: Some(Kind::StringValue(value)),
    }
}
