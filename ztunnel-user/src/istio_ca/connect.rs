//! The CA client as the daemon's settings make it, on the daemon's channel to istiod.

use super::{IstioCa, IstioCaConfig, IstioCaError};
use crate::istiod::{self, ChannelError, IstiodEndpoint, RootCertificates};
use crate::settings::IstiodSettings;
use std::time::Duration;

/// Why the CA client the settings ask for cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum CaSettingsError {
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error(transparent)]
    Client(#[from] IstioCaError),
}

/// The client of istiod's CA `settings` ask for (None: `CA_ADDRESS` is empty), asking for
/// certificates valid for `ttl`; `env` is the daemon's environment.
pub fn from_settings(
    settings: &IstiodSettings,
    ttl: Duration,
    env: &[(String, String)],
) -> Result<Option<IstioCa<IstiodEndpoint>>, CaSettingsError> {
    let roots = RootCertificates::parse(&settings.ca_root_ca);
    let Some(endpoint) = IstiodEndpoint::new(
        &settings.ca_address,
        roots.clone(),
        settings.alt_ca_hostname.clone(),
    )?
    else {
        return Ok(None);
    };
    let config = IstioCaConfig {
        credentials: istiod::credentials(settings, env, istiod::CA_HEADER_PREFIX),
        ttl,
        root_cert: Some(roots),
    };
    Ok(Some(IstioCa::new(endpoint, config)?))
}
