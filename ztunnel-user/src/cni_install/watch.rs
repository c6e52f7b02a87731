//! Keeping the entry in place: the node's network plugin may rewrite or replace its config at
//! any time (an upgrade, a restart), and another config may become the first by name.

use super::{InstallError, Installer};
use crate::host::file_watch::{self, WatchError};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

/// How soon a failure that no change of the directory may fix is tried again.
const RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Inserts the entry, then again after each change of the directory's network configs, until
/// SIGTERM or SIGINT. The entry stays when it ends: the pods that start meanwhile (a rolling
/// update of the installer) wait for the daemon rather than start uncaptured.
pub(super) fn keep_inserted(installer: &Installer) -> Result<(), InstallError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(InstallError::Runtime)?;
    runtime.block_on(async {
        let mut terminate = signal(SignalKind::terminate()).map_err(InstallError::Runtime)?;
        let mut interrupt = signal(SignalKind::interrupt()).map_err(InstallError::Runtime)?;
        let dir = &installer.conf_dir;
        let unwatched = |err: &WatchError| warn!("{err}; trying again");
        let watch = file_watch::on_directory_changes(
            dir,
            super::conflist::is_config_name,
            unwatched,
            || match installer.insert() {
                Ok(_) => None,
                Err(err @ InstallError::NoConfig { .. }) => {
                    info!("{err}; waiting for it");
                    None
                }
                Err(err) if err.is_transient() => {
                    error!("{err}; trying again in {RETRY:?}");
                    Some(RETRY)
                }
                Err(err) => {
                    error!("{err}; waiting for the file to change");
                    None
                }
            },
        );
        info!(dir = %dir.display(), "keeping ztunnel-cni in the node's network config");
        let stopping = |signal: &str| {
            info!(
                signal,
                "stopping; the ztunnel-cni entry stays, so pods cannot start uncaptured \
                 (uninstall-cni removes it)"
            )
        };
        tokio::select! {
            // The watch runs until the process ends.
            () = watch => {}
            _ = terminate.recv() => stopping("SIGTERM"),
            _ = interrupt.recv() => stopping("SIGINT"),
        }
        Ok(())
    })
}
