//! The bearer token every call must carry, as istiod checks the proxy's service-account token:
//! the expected one is read from its file at each call, so a test can rotate it.

use std::path::PathBuf;
use tonic::Status;
use tonic::metadata::MetadataMap;

#[derive(Clone, Debug)]
pub struct TokenFile(pub PathBuf);

impl TokenFile {
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let expected = std::fs::read_to_string(&self.0).map_err(|err| {
            Status::internal(format!("istiod cannot read {}: {err}", self.0.display()))
        })?;
        let presented = metadata
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        match presented {
            Some(token) if token == expected.trim() => Ok(()),
            Some(_) => Err(Status::unauthenticated("the bearer token is not valid")),
            None => Err(Status::unauthenticated("no bearer token")),
        }
    }
}
