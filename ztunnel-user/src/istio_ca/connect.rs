//! The CA client on the daemon's channel to istiod, as the daemon's settings make it.

use super::{CaConnect, IstioCa, IstioCaConfig, IstioCaError};
use crate::istiod::{self, ChannelError, IstiodChannel, IstiodEndpoint, RootCertificates};
use crate::settings::IstiodSettings;
use crate::xds::proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use std::time::Duration;
use tonic::codegen::StdError;

/// Each request makes a fresh channel, with istiod's roots as they are then: requests are
/// few (one per identity and half lifetime).
impl CaConnect for IstiodEndpoint {
    type Channel = IstiodChannel;

    async fn connect(&self) -> Result<IstioCertificateServiceClient<IstiodChannel>, StdError> {
        let channel = self.channel()?;
        Ok(IstioCertificateServiceClient::with_origin(
            channel,
            self.origin.clone(),
        ))
    }
}

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
        credentials: istiod::credentials(settings, env),
        ttl,
        root_cert: Some(roots),
    };
    Ok(Some(IstioCa::new(endpoint, config)?))
}
