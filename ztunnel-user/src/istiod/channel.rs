//! The channel to istiod, for the xDS and the CA clients alike, made as Istio's ztunnel makes
//! it (`TlsGrpcChannel`): gRPC on HTTP/2 (ALPN `h2`) over TLS 1.3, with istiod's certificate
//! checked against the configured roots and the address's host (or the alternative name
//! given), server-authenticated only (the proxy proves who it is with its token:
//! `Credentials`); HTTP/2 pings every 30 s with 10 s to answer, TCP keepalive, a 5 s connect
//! timeout. The roots are read each time a channel is made: a channel made after the root
//! file changed (a rotated `istio-ca-root-cert` ConfigMap) trusts the new one.

use http::Uri;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const PING_INTERVAL: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE: Duration = Duration::from_secs(300);

/// A channel to istiod: clients made on it share its connection.
pub type IstiodChannel = Client<HttpsConnector<HttpConnector>, tonic::body::Body>;

/// Where istiod is, and how its certificate is checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IstiodEndpoint {
    /// `https://host:port`: the origin of every request.
    pub origin: Uri,
    pub roots: RootCertificates,
    /// The name istiod's certificate must carry instead of the address's host.
    pub alt_hostname: Option<String>,
}

/// istiod's trust roots, as `XDS_ROOT_CA`/`CA_ROOT_CA` give them: the path of a PEM file, or
/// the PEM itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCertificates {
    File(PathBuf),
    Pem(String),
}

impl RootCertificates {
    /// A value holding a PEM block is the PEM, anything else a path.
    pub fn parse(value: &str) -> RootCertificates {
        if value.contains("-----BEGIN") {
            RootCertificates::Pem(value.to_owned())
        } else {
            RootCertificates::File(value.into())
        }
    }

    fn describe(&self) -> String {
        match self {
            RootCertificates::File(path) => path.display().to_string(),
            RootCertificates::Pem(_) => "the PEM given".to_owned(),
        }
    }

    /// The roots as they are now.
    pub(crate) fn load(&self) -> Result<RootCertStore, ChannelError> {
        let pem = match self {
            RootCertificates::File(path) => {
                std::fs::read(path).map_err(|source| ChannelError::RootsUnreadable {
                    path: path.clone(),
                    source,
                })?
            }
            RootCertificates::Pem(pem) => pem.clone().into_bytes(),
        };
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|err| ChannelError::BadRoots {
                roots: self.describe(),
                reason: err.to_string(),
            })?;
            roots.add(cert).map_err(|err| ChannelError::BadRoots {
                roots: self.describe(),
                reason: err.to_string(),
            })?;
        }
        if roots.is_empty() {
            return Err(ChannelError::BadRoots {
                roots: self.describe(),
                reason: "no certificate in it".to_owned(),
            });
        }
        Ok(roots)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("istiod's address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("cannot read istiod's root certificates {path}: {source}")]
    RootsUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("istiod's root certificates ({roots}): {reason}")]
    BadRoots { roots: String, reason: String },
    #[error("{0:?} is not a name a certificate can be checked for")]
    BadHostname(String),
}

impl IstiodEndpoint {
    /// The endpoint at `address` (`host:port`, with or without `https://`, as Istio's
    /// `XDS_ADDRESS`); `None` when it is empty: that client is off.
    pub fn new(
        address: &str,
        roots: RootCertificates,
        alt_hostname: Option<String>,
    ) -> Result<Option<IstiodEndpoint>, ChannelError> {
        let address = address.trim();
        if address.is_empty() {
            return Ok(None);
        }
        let bad = |reason: &str| ChannelError::Address {
            address: address.to_owned(),
            reason: reason.to_owned(),
        };
        let with_scheme = if address.contains("://") {
            address.to_owned()
        } else {
            format!("https://{address}")
        };
        let origin: Uri = with_scheme
            .parse()
            .map_err(|_| bad("not a URL or host:port"))?;
        if origin.scheme_str() != Some("https") {
            return Err(bad("istiod is reached over TLS: use https://"));
        }
        if origin.port().is_none() {
            return Err(bad("give the port (istiod serves on 15012)"));
        }
        if !matches!(origin.path(), "" | "/") {
            return Err(bad("give no path"));
        }
        if let Some(name) = &alt_hostname
            && ServerName::try_from(name.as_str()).is_err()
        {
            return Err(ChannelError::BadHostname(name.clone()));
        }
        Ok(Some(IstiodEndpoint {
            origin,
            roots,
            alt_hostname,
        }))
    }

    /// A channel with the roots as they are now; it connects on its first request.
    pub fn channel(&self) -> Result<IstiodChannel, ChannelError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|err| ChannelError::BadRoots {
                roots: self.roots.describe(),
                reason: err.to_string(),
            })?
            .with_root_certificates(self.roots.load()?)
            .with_no_client_auth();
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
        tcp.set_keepalive(Some(TCP_KEEPALIVE));
        let builder = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only();
        let builder = match &self.alt_hostname {
            Some(name) => {
                let name = ServerName::try_from(name.clone())
                    .map_err(|_| ChannelError::BadHostname(name.clone()))?;
                builder.with_server_name_resolver(FixedServerNameResolver::new(name))
            }
            None => builder,
        };
        let https = builder.enable_http2().wrap_connector(tcp);
        Ok(Client::builder(TokioExecutor::new())
            .http2_only(true)
            .timer(TokioTimer::new())
            .http2_keep_alive_interval(PING_INTERVAL)
            .http2_keep_alive_timeout(PING_TIMEOUT)
            .http2_keep_alive_while_idle(true)
            .build(https))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(address: &str) -> Result<Option<IstiodEndpoint>, ChannelError> {
        IstiodEndpoint::new(address, RootCertificates::parse("/root.pem"), None)
    }

    #[test]
    fn addresses_as_istio_writes_them_and_what_is_refused() {
        assert_eq!(endpoint("").unwrap(), None);
        for address in [
            "istiod.istio-system.svc:15012",
            "https://istiod.istio-system.svc:15012",
        ] {
            let origin = endpoint(address).unwrap().unwrap().origin;
            assert_eq!(origin.to_string(), "https://istiod.istio-system.svc:15012/");
        }
        for (address, why) in [
            ("http://istiod:15012", "over TLS"),
            ("istiod.istio-system.svc", "give the port"),
            ("istiod:15012/xds", "no path"),
            ("istiod 15012", "not a URL"),
        ] {
            let err = endpoint(address).unwrap_err().to_string();
            assert!(err.contains(why), "{address}: {err}");
        }
        let err = IstiodEndpoint::new(
            "istiod:15012",
            RootCertificates::parse("/r"),
            Some("".into()),
        )
        .unwrap_err();
        assert!(matches!(err, ChannelError::BadHostname(_)), "{err}");
    }

    #[test]
    fn roots_are_a_path_or_pem_and_must_hold_a_certificate() {
        assert_eq!(
            RootCertificates::parse("/var/run/secrets/istio/root-cert.pem"),
            RootCertificates::File("/var/run/secrets/istio/root-cert.pem".into())
        );
        let missing = RootCertificates::parse("/nonexistent/root-cert.pem").load();
        assert!(matches!(missing, Err(ChannelError::RootsUnreadable { .. })));
        let empty = RootCertificates::parse("-----BEGIN KEY-----\n-----END KEY-----\n").load();
        let err = empty.expect_err("no certificate is refused").to_string();
        assert!(err.contains("no certificate"), "{err}");
    }
}
