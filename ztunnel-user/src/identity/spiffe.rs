//! The workload identity: Istio's SPIFFE ID `spiffe://<trust-domain>/ns/<namespace>/sa/<account>`,
//! carried as the URI SAN of a workload certificate.

use std::fmt;
use std::str::FromStr;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

const SCHEME: &str = "spiffe://";

/// A workload's identity: its service account in its namespace, within a trust domain.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("{id:?} is not a SPIFFE identity: it must start with {SCHEME}")]
    WrongScheme { id: String },
    #[error(
        "{id:?} does not have the shape of a workload identity: \
         spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    WrongPath { id: String },
    #[error("{id:?} has an empty {part}")]
    EmptyPart { id: String, part: &'static str },
    #[error("cannot parse the certificate: {0}")]
    BadCertificate(String),
    #[error("the certificate has no URI SAN, so no SPIFFE identity")]
    NoUri,
    #[error("the certificate has {0} URI SANs; a SPIFFE certificate has exactly one")]
    ManyUris(usize),
}

impl Identity {
    /// The identity in a certificate (DER): its one URI SAN, as SPIFFE requires of an X.509-SVID.
    pub(crate) fn from_certificate(der: &[u8]) -> Result<Identity, IdentityError> {
        let bad = |error: &dyn fmt::Display| IdentityError::BadCertificate(error.to_string());
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| bad(&e))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| bad(&e))?
            .ok_or(IdentityError::NoUri)?;
        let uris: Vec<&str> = san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .collect();
        match uris.as_slice() {
            [uri] => uri.parse(),
            [] => Err(IdentityError::NoUri),
            many => Err(IdentityError::ManyUris(many.len())),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// Debug shows the SPIFFE ID too: errors and logs stay short.
impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Identity").field(&self.to_string()).finish()
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(id: &str) -> Result<Self, Self::Err> {
        let path = id
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::WrongScheme { id: id.to_owned() })?;
        let segments: Vec<&str> = path.split('/').collect();
        let [trust_domain, "ns", namespace, "sa", service_account] = segments.as_slice() else {
            return Err(IdentityError::WrongPath { id: id.to_owned() });
        };
        let parts = [
            (trust_domain, "trust domain"),
            (namespace, "namespace"),
            (service_account, "service account"),
        ];
        if let Some((_, part)) = parts.iter().find(|(value, _)| value.is_empty()) {
            return Err(IdentityError::EmptyPart {
                id: id.to_owned(),
                part,
            });
        }
        Ok(Identity {
            trust_domain: (*trust_domain).to_owned(),
            namespace: (*namespace).to_owned(),
            service_account: (*service_account).to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_round_trip() {
        let text = "spiffe://cluster.local/ns/shop/sa/checkout";
        let identity: Identity = text.parse().unwrap();
        assert_eq!(
            identity,
            Identity {
                trust_domain: "cluster.local".into(),
                namespace: "shop".into(),
                service_account: "checkout".into(),
            }
        );
        assert_eq!(identity.to_string(), text);
    }

    #[test]
    fn refuses_other_schemes() {
        for id in [
            "https://cluster.local/ns/a/sa/b",
            "cluster.local/ns/a/sa/b",
            "",
        ] {
            assert!(
                matches!(
                    id.parse::<Identity>(),
                    Err(IdentityError::WrongScheme { .. })
                ),
                "{id}"
            );
        }
    }

    #[test]
    fn refuses_other_path_shapes() {
        for id in [
            "spiffe://cluster.local",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/namespace/a/sa/b",
        ] {
            assert!(
                matches!(id.parse::<Identity>(), Err(IdentityError::WrongPath { .. })),
                "{id}"
            );
        }
    }

    #[test]
    fn refuses_empty_parts() {
        for (id, empty) in [
            ("spiffe:///ns/a/sa/b", "trust domain"),
            ("spiffe://td/ns//sa/b", "namespace"),
            ("spiffe://td/ns/a/sa/", "service account"),
        ] {
            match id.parse::<Identity>() {
                Err(IdentityError::EmptyPart { part, .. }) => assert_eq!(part, empty, "{id}"),
                other => panic!("{id}: {other:?}"),
            }
        }
    }

    #[test]
    fn errors_say_what_is_expected() {
        let error = "spiffe://td/a/b".parse::<Identity>().unwrap_err();
        assert!(
            error
                .to_string()
                .contains("/ns/<namespace>/sa/<service-account>")
        );
    }

    #[test]
    fn from_certificate_refuses_garbage() {
        assert!(matches!(
            Identity::from_certificate(b"not a certificate"),
            Err(IdentityError::BadCertificate(_))
        ));
    }
}
