//! How a request to istiod authenticates, as Istio's ztunnel's do: `authorization: Bearer
//! <token>` with the token read from its file for each request (the projected service-account
//! token is rotated under the daemon), and `clusterid`.

use std::path::PathBuf;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};

/// The headers of every request to istiod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Credentials {
    /// Sent as `clusterid` (none when empty).
    pub cluster_id: String,
    /// The file of the bearer token, read again for each request; an empty file is an
    /// error. `None`: no `authorization` header.
    pub token_path: Option<PathBuf>,
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
        Ok(headers)
    }
}
