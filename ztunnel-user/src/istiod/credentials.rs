//! How a request to istiod authenticates, as Istio's ztunnel's do: `authorization: Bearer
//! <token>` with the token read from its file for each request (the projected service-account
//! token is rotated under the daemon), `clusterid`, and the extra headers the environment
//! gives (`XDS_HEADER_<name>`, `CA_HEADER_<name>`).

use std::path::PathBuf;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap};

/// The headers of every request to istiod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Credentials {
    /// Sent as `clusterid` (none when empty).
    pub cluster_id: String,
    /// The file of the bearer token, read again for each request; an empty file is an
    /// error. `None`: no `authorization` header.
    pub token_path: Option<PathBuf>,
    /// More headers, by name.
    pub headers: Vec<(String, String)>,
}

/// Why the headers of a request could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read the token file {path}: {source}")]
    TokenUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the token file {0} is empty")]
    TokenEmpty(PathBuf),
    #[error("the token in {0} is not a valid header value")]
    TokenInvalid(PathBuf),
    #[error("the cluster id {0:?} is not a valid header value")]
    ClusterIdInvalid(String),
    #[error(
        "the extra header {0:?} (an XDS_HEADER_* or CA_HEADER_* variable) is not a valid header \
         name and value"
    )]
    HeaderInvalid(String),
}

impl Credentials {
    /// The headers for a request made now: the token as its file holds it now (surrounding
    /// whitespace trimmed), and the cluster id.
    pub async fn metadata(&self) -> Result<MetadataMap, CredentialsError> {
        let mut headers = MetadataMap::new();
        if let Some(path) = &self.token_path {
            let bytes = tokio::fs::read(path).await.map_err(|source| {
                CredentialsError::TokenUnreadable {
                    path: path.clone(),
                    source,
                }
            })?;
            let token = bytes.trim_ascii();
            if token.is_empty() {
                return Err(CredentialsError::TokenEmpty(path.clone()));
            }
            let bearer = [b"Bearer ".as_slice(), token].concat();
            let mut value = AsciiMetadataValue::try_from(bearer)
                .map_err(|_| CredentialsError::TokenInvalid(path.clone()))?;
            value.set_sensitive(true);
            headers.insert("authorization", value);
        }
        if !self.cluster_id.is_empty() {
            let value = AsciiMetadataValue::try_from(self.cluster_id.as_str())
                .map_err(|_| CredentialsError::ClusterIdInvalid(self.cluster_id.clone()))?;
            headers.insert("clusterid", value);
        }
        for (name, value) in &self.headers {
            let invalid = || CredentialsError::HeaderInvalid(name.clone());
            let key = AsciiMetadataKey::from_bytes(name.as_bytes()).map_err(|_| invalid())?;
            let value = AsciiMetadataValue::try_from(value.as_str()).map_err(|_| invalid())?;
            headers.insert(key, value);
        }
        Ok(headers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn extra_headers_go_on_every_request_and_a_bad_one_is_named() {
        let mut credentials = Credentials {
            cluster_id: "east".into(),
            token_path: None,
            headers: vec![("X-Tenant".into(), "blue".into())],
        };
        let headers = credentials.metadata().await.unwrap();
        assert_eq!(headers.get("x-tenant").unwrap(), "blue");
        assert_eq!(headers.get("clusterid").unwrap(), "east");

        credentials.headers.push(("bad name".into(), "x".into()));
        let error = credentials.metadata().await.unwrap_err();
        assert!(matches!(&error, CredentialsError::HeaderInvalid(name) if name == "bad name"));
    }
}
