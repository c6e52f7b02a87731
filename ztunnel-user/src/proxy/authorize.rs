//! Where the policies are applied: to each new connection into a pod, and, when a new mesh
//! config is put in force, again to every open connection they let in.

use super::{PodProxy, ProxyContext};
use crate::capture::DatapathError;
use crate::mesh::Applied;
use crate::mesh::authz::{Denial, Subject};
use crate::mesh::config::{Change, MeshConfig};
use crate::telemetry::connections::Tracked;
use crate::xds::client::{MeshBatch, Rejected, SinkError, XdsBatch, XdsSink, apply_to_model};

/// A config the kernel's maps could not take; the config in force stays.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the mesh config to the kernel maps: {0}")]
pub(crate) struct ApplyError(#[from] DatapathError);

impl ProxyContext {
    /// Applies the policies in `config` to a connection into `pod`; on success the connection
    /// is put under re-checking, so a later policy change can close it.
    pub(super) fn authorize(
        &self,
        config: &MeshConfig,
        pod: &PodProxy,
        tracked: &mut Tracked,
        subject: Subject,
    ) -> Result<(), Denial> {
        if let Err(denial) = config.authorize(&subject) {
            tracing::info!(pod = %pod.label, source = %subject.source, destination = %subject.destination,
                identity = ?subject.identity.as_ref().map(ToString::to_string), %denial, "connection denied by policy");
            return Err(denial);
        }
        self.connections.authorized(tracked, subject);
        Ok(())
    }

    /// Makes the changes `source` derives from the config in force, and closes the open
    /// connections the result denies. If the kernel maps cannot be written, the config in
    /// force stays and the error says why.
    pub(crate) fn apply_changes(
        &self,
        source: impl FnOnce(&MeshConfig) -> Vec<Change>,
    ) -> Result<Applied, ApplyError> {
        let datapath = self.capture.datapath();
        let applied = self.mesh.apply(source, datapath.as_ref())?;
        // Services only route new connections; workloads and policies decide on open ones.
        let touched = &applied.touched;
        if touched.policies > 0 || !touched.workloads.is_empty() {
            let config = self.mesh.current();
            self.rejoin_changed(&config, &touched.workloads);
            let closed = self
                .connections
                .revalidate(|subject| config.authorize(subject));
            if closed > 0 {
                tracing::info!(closed, "closed open connections the new policies deny");
            }
        }
        Ok(applied)
    }
}

/// istiod's resources go into force the way the file's do: one response is one batch, the
/// kernel's maps first, then the open connections re-checked. (Run in the lab with the
/// client; `xds::client`'s tests run `apply_to_model` over a `Mesh` in memory.)
impl XdsSink for ProxyContext {
    fn apply(&self, batch: XdsBatch) -> Result<Vec<Rejected>, SinkError> {
        let apply = |changes: MeshBatch| self.apply_changes(|config| changes.changes(config));
        Ok(apply_to_model(batch, apply)?)
    }
}
