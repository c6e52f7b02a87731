//! The client on the daemon's channel to istiod, and the client as the daemon's settings make
//! it.

use super::super::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use super::{Connect, NodeFacts, XdsClient, XdsConfig, XdsSink};
use crate::istiod::{ChannelError, IstiodChannel, IstiodEndpoint, RootCertificates};
use crate::settings::IstiodSettings;
use std::sync::Arc;
use tonic::codegen::StdError;

/// The variable that, set, names the cluster instead of `CLUSTER_ID` (Istio's chart sets it).
const META_CLUSTER_ID: &str = "ISTIO_META_CLUSTER_ID";

/// Each stream opening makes a fresh channel, with istiod's roots as they are then.
impl Connect for IstiodEndpoint {
    type Channel = IstiodChannel;

    async fn connect(&self) -> Result<AggregatedDiscoveryServiceClient<IstiodChannel>, StdError> {
        let channel = self.channel()?;
        Ok(AggregatedDiscoveryServiceClient::with_origin(
            channel,
            self.origin.clone(),
        ))
    }
}

/// The xDS client `settings` ask for on node `node` (None: `XDS_ADDRESS` is empty), feeding
/// `sink`; `env` is the daemon's environment (`ISTIO_META_*`).
pub fn from_settings<S: XdsSink + ?Sized>(
    settings: &IstiodSettings,
    node: &str,
    env: Vec<(String, String)>,
    sink: Arc<S>,
) -> Result<Option<XdsClient<IstiodEndpoint, S>>, ChannelError> {
    let roots = RootCertificates::parse(&settings.xds_root_ca);
    let Some(endpoint) = IstiodEndpoint::new(
        &settings.xds_address,
        roots,
        settings.alt_xds_hostname.clone(),
    )?
    else {
        return Ok(None);
    };
    let cluster_id = env
        .iter()
        .find(|(key, value)| key == META_CLUSTER_ID && !value.is_empty())
        .map_or_else(|| settings.cluster_id.clone(), |(_, value)| value.clone());
    let facts = NodeFacts {
        instance_ip: settings.instance_ip,
        pod_name: settings.pod_name.clone(),
        pod_namespace: settings.pod_namespace.clone(),
        node_name: node.to_owned(),
        cluster_id,
    };
    let config = XdsConfig::for_node(&facts, env, Some(settings.auth_token.clone()));
    Ok(Some(XdsClient::new(config, endpoint, sink)))
}
