//! The original bytes of each network config the installer changed, so that `uninstall-cni`
//! gives the node back exactly what its network plugin wrote.
//!
//! They live in a directory inside the config directory: the runtime reads only files there,
//! and the two share a host volume, so they last or go together. Under `/var/run` a reboot
//! would drop the originals and keep our entries.

use super::InstallError;
use crate::host::files;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

const BACKUP_DIR: &str = ".ztunnel-cni-backup";

/// One original: the file's name then, and its bytes.
pub(crate) struct Original {
    pub(crate) name: OsString,
    pub(crate) bytes: Vec<u8>,
}

pub(crate) struct Backups {
    dir: PathBuf,
}

impl Backups {
    pub(crate) fn in_conf_dir(conf_dir: &Path) -> Backups {
        Backups {
            dir: conf_dir.join(BACKUP_DIR),
        }
    }

    /// Keeps `bytes` as the original of the config `name`, replacing an older one.
    pub(crate) fn save(&self, name: &OsStr, bytes: &[u8]) -> Result<(), InstallError> {
        let path = self.dir.join(name);
        let write = || {
            std::fs::create_dir_all(&self.dir)?;
            files::write_atomically(&path, bytes, 0o600)
        };
        write().map_err(|error| InstallError::Write { path, error })
    }

    /// The original of the config `name`, if it is kept.
    pub(crate) fn get(&self, name: &OsStr) -> Result<Option<Original>, InstallError> {
        let path = self.dir.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(Original {
                name: name.to_owned(),
                bytes,
            })),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(InstallError::Read { path, error }),
        }
    }

    /// Forgets every original, and their directory.
    pub(crate) fn clear(&self) -> Result<(), InstallError> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                Err(InstallError::Remove {
                    path: self.dir.clone(),
                    error,
                })
            }
            _ => Ok(()),
        }
    }
}
