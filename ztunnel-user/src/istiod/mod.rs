//! What the daemon's clients of istiod (the xDS client, the CA client) share: the way they
//! reach it (`Dial`) and the channel the daemon dials (TLS, HTTP/2), the credentials every
//! request carries, and how a channel's failure is told from istiod's answer.

mod channel;
mod credentials;
mod dial;

pub use channel::{ChannelError, IstiodChannel, IstiodEndpoint, RootCertificates};
pub use credentials::{Credentials, CredentialsError};
pub use dial::Dial;

use crate::settings::IstiodSettings;

/// The variable that, set, names the cluster instead of `CLUSTER_ID` (Istio's chart sets it).
const META_CLUSTER_ID: &str = "ISTIO_META_CLUSTER_ID";

/// The prefix of the variables whose rest names an extra header of the xDS requests.
pub const XDS_HEADER_PREFIX: &str = "XDS_HEADER_";
/// The same for the CA's requests.
pub const CA_HEADER_PREFIX: &str = "CA_HEADER_";

/// The credentials `settings` give, with the daemon's environment `env`
/// (`ISTIO_META_CLUSTER_ID`, if set, names the cluster; each `<header_prefix><name>` adds a
/// header).
pub fn credentials(
    settings: &IstiodSettings,
    env: &[(String, String)],
    header_prefix: &str,
) -> Credentials {
    let cluster_id = env
        .iter()
        .find(|(key, value)| key == META_CLUSTER_ID && !value.is_empty())
        .map_or_else(|| settings.cluster_id.clone(), |(_, value)| value.clone());
    let headers = env
        .iter()
        .filter_map(|(key, value)| {
            let name = key.strip_prefix(header_prefix)?;
            Some((name.to_owned(), value.clone()))
        })
        .collect();
    Credentials {
        cluster_id,
        token_path: Some(settings.auth_token.clone()),
        headers,
    }
}

/// The channel's failure a call's status carries, with its causes (`a: b: c`), or `None` if
/// istiod sent the status. The channel connects at a client's first call, so a connection
/// that failed comes as a status, and its own text says little ("client error (Connect)"):
/// the causes say why (a certificate not trusted, a name not matched, a refused connection).
pub fn channel_failure(status: &tonic::Status) -> Option<String> {
    let mut cause = std::error::Error::source(status);
    let mut text = String::new();
    while let Some(error) = cause {
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&error.to_string());
        cause = error.source();
    }
    (!text.is_empty()).then_some(text)
}
