//! The client as the daemon's settings make it, on the daemon's channel to istiod.

use super::{NodeFacts, XdsConfig};
use crate::istiod::{self, ChannelError, IstiodEndpoint, RootCertificates};
use crate::settings::IstiodSettings;

/// What the xDS client `settings` ask for on node `node` needs, its configuration and the
/// channel's endpoint (None: `XDS_ADDRESS` is empty); `env` is the daemon's environment
/// (`ISTIO_META_*`). Made before anything is loaded, so a bad setting stops the daemon first.
pub fn from_settings(
    settings: &IstiodSettings,
    node: &str,
    env: Vec<(String, String)>,
) -> Result<Option<(XdsConfig, IstiodEndpoint)>, ChannelError> {
    let roots = RootCertificates::parse(&settings.xds_root_ca);
    let Some(endpoint) = IstiodEndpoint::new(
        &settings.xds_address,
        roots,
        settings.alt_xds_hostname.clone(),
    )?
    else {
        return Ok(None);
    };
    let credentials = istiod::credentials(settings, &env, istiod::XDS_HEADER_PREFIX);
    let facts = NodeFacts {
        instance_ip: settings.instance_ip,
        pod_name: settings.pod_name.clone(),
        pod_namespace: settings.pod_namespace.clone(),
        node_name: node.to_owned(),
        cluster_id: credentials.cluster_id.clone(),
    };
    let config = XdsConfig::for_node(&facts, env, credentials);
    Ok(Some((config, endpoint)))
}
