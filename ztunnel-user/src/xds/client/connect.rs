//! The client as the daemon's settings make it, on the daemon's channel to istiod.

use super::{NodeFacts, XdsClient, XdsConfig, XdsSink};
use crate::istiod::{self, ChannelError, IstiodEndpoint, RootCertificates};
use crate::settings::IstiodSettings;
use std::sync::Arc;

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
    let credentials = istiod::credentials(settings, &env);
    let facts = NodeFacts {
        instance_ip: settings.instance_ip,
        pod_name: settings.pod_name.clone(),
        pod_namespace: settings.pod_namespace.clone(),
        node_name: node.to_owned(),
        cluster_id: credentials.cluster_id.clone(),
    };
    let config = XdsConfig::for_node(&facts, env, credentials.token_path);
    Ok(Some(XdsClient::new(config, endpoint, sink)))
}
