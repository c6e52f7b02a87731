//! `ztunnel install-cni` and `uninstall-cni`: put the `ztunnel-cni` plugin on the node, as
//! istio-cni's installer does. The plugin binary is copied into the runtime's bin dir, and
//! its entry appended to the node's network config (the first by name in the config dir),
//! where it stays while the node's network plugin rewrites its file; uninstalling gives the
//! original file back byte for byte.

mod backup;
mod conflist;
mod watch;

use crate::cni::{DEFAULT_EXCLUDED_NAMESPACES, DEFAULT_TIMEOUT_SECONDS};
use crate::host::files;
use crate::settings::DEFAULT_API_SOCKET;
use backup::{Backups, Original};
use conflist::{ConfList, ConfigFile, Edit, PLUGIN_TYPE};
use serde_json::{Value, json};
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use tracing::{info, warn};

/// Where the node's runtime finds plugins and network configs.
#[derive(clap::Args, Clone, Debug)]
pub struct CniDirs {
    /// The directory the container runtime runs CNI plugins from.
    #[arg(long, env = "CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The directory the container runtime reads network configs from (it uses the first
    /// `*.conflist`, `*.conf` or `*.json` by name).
    #[arg(long, env = "CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
}

#[derive(clap::Args, Clone, Debug)]
pub struct InstallArgs {
    #[command(flatten)]
    pub dirs: CniDirs,
    /// The plugin binary to copy [default: ztunnel-cni beside this executable].
    #[arg(long, env = "ZTUNNEL_CNI_PLUGIN", value_name = "PATH")]
    pub plugin: Option<PathBuf>,
    /// The daemon's API socket, as the plugin finds it on the node (`apiSocket`).
    #[arg(long, env = "ZTUNNEL_API_SOCKET", default_value = DEFAULT_API_SOCKET)]
    pub api_socket: PathBuf,
    /// A namespace whose pods the plugin leaves uncaptured (`excludeNamespaces`; repeatable,
    /// comma-separated in the variable).
    #[arg(
        long = "exclude-namespace",
        env = "ZTUNNEL_CNI_EXCLUDE_NAMESPACES",
        value_name = "NAMESPACE",
        value_delimiter = ',',
        default_values = DEFAULT_EXCLUDED_NAMESPACES
    )]
    pub exclude_namespaces: Vec<String>,
    /// How long the plugin waits for the daemon before failing the pod (`timeoutSeconds`).
    #[arg(
        long,
        env = "ZTUNNEL_CNI_TIMEOUT_SECONDS",
        default_value_t = DEFAULT_TIMEOUT_SECONDS,
        value_parser = positive_seconds
    )]
    pub timeout_seconds: f64,
    /// Install once and exit, instead of keeping the entry in place (init containers, tests).
    #[arg(long)]
    pub once: bool,
}

fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds > 0.0 => Ok(seconds),
        _ => Err(format!("{text:?} is not a positive number of seconds")),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot read the CNI config directory {}: {error}", dir.display())]
    ReadDir { dir: PathBuf, error: io::Error },
    #[error(
        "no network config (*.conflist, *.conf, *.json) in {}: the node's network plugin has not \
         written one yet",
        dir.display()
    )]
    NoConfig { dir: PathBuf },
    #[error("cannot read {}: {error}", path.display())]
    Read { path: PathBuf, error: io::Error },
    #[error("{} is not valid JSON ({error}): fix or replace it; it was left as it is", path.display())]
    Parse {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error("{} is not a network config: {reason}; it was left as it is", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "the plugin list made of {} would replace {}, which the installer did not write: remove \
         one of them",
        from.display(),
        to.display()
    )]
    WouldReplace { from: PathBuf, to: PathBuf },
    #[error(
        "cannot write {} ({error}): it is unchanged; the directory must be writable by this \
         container",
        path.display()
    )]
    Write { path: PathBuf, error: io::Error },
    #[error("cannot remove {}: {error}", path.display())]
    Remove { path: PathBuf, error: io::Error },
    #[error("cannot read the plugin binary {} ({error}): give its path with --plugin", path.display())]
    Plugin { path: PathBuf, error: io::Error },
    #[error("cannot find this executable to find ztunnel-cni beside it ({0}): give --plugin")]
    CurrentExe(io::Error),
    #[error("cannot start watching ({0})")]
    Runtime(io::Error),
}

impl InstallError {
    /// Whether trying again may succeed without a change in the directory (a failing disk, a
    /// volume mounted read-only for now); a file's content waits for its next change.
    fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::ReadDir { .. } | Self::Read { .. } | Self::Write { .. } | Self::Remove { .. }
        )
    }
}

/// `ztunnel install-cni`.
pub fn install(args: &InstallArgs) -> Result<(), InstallError> {
    init_logging();
    let plugin = match &args.plugin {
        Some(plugin) => plugin.clone(),
        None => beside_this_executable()?,
    };
    let installer = Installer::new(&args.dirs.cni_conf_dir, plugin_entry(args));
    // Before the entry: the runtime runs the plugin as soon as the entry names it.
    copy_plugin(&plugin, &args.dirs.cni_bin_dir)?;
    if args.once {
        installer.insert().map(drop)
    } else {
        watch::keep_inserted(&installer)
    }
}

/// `ztunnel uninstall-cni`.
pub fn uninstall(dirs: &CniDirs) -> Result<(), InstallError> {
    init_logging();
    Installer::remove_entries(&dirs.cni_conf_dir)?;
    remove_plugin(&dirs.cni_bin_dir)
}

fn init_logging() {
    // Already set (a test, a second call): the first one stays.
    let _ = tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
}

fn beside_this_executable() -> Result<PathBuf, InstallError> {
    let this = std::env::current_exe().map_err(InstallError::CurrentExe)?;
    Ok(this.with_file_name(PLUGIN_TYPE))
}

/// Our entry in the plugin list: the keys `ztunnel-cni` reads (see `crate::cni`).
fn plugin_entry(args: &InstallArgs) -> Value {
    let seconds = args.timeout_seconds;
    // Whole seconds as people write them (`30`, not `30.0`).
    let timeout = if seconds.fract() == 0.0 && seconds <= f64::from(u32::MAX) {
        json!(seconds as u64)
    } else {
        json!(seconds)
    };
    json!({
        "type": PLUGIN_TYPE,
        "apiSocket": args.api_socket,
        "excludeNamespaces": args.exclude_namespaces,
        "timeoutSeconds": timeout,
    })
}

/// Copies the plugin into the bin dir in one step (a runtime never runs half a binary; one
/// running keeps its inode); the same binary is not written again.
fn copy_plugin(plugin: &Path, bin_dir: &Path) -> Result<(), InstallError> {
    let bytes = std::fs::read(plugin).map_err(|error| InstallError::Plugin {
        path: plugin.to_owned(),
        error,
    })?;
    let target = bin_dir.join(PLUGIN_TYPE);
    if std::fs::read(&target).is_ok_and(|installed| installed == bytes) {
        info!(path = %target.display(), "the plugin binary is already in place");
        return Ok(());
    }
    files::write_atomically(&target, &bytes, 0o755).map_err(|error| InstallError::Write {
        path: target.clone(),
        error,
    })?;
    info!(from = %plugin.display(), to = %target.display(), "copied the plugin binary");
    Ok(())
}

fn remove_plugin(bin_dir: &Path) -> Result<(), InstallError> {
    let path = bin_dir.join(PLUGIN_TYPE);
    match std::fs::remove_file(&path) {
        Ok(()) => info!(path = %path.display(), "removed the plugin binary"),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            info!(path = %path.display(), "no plugin binary to remove")
        }
        Err(error) => return Err(InstallError::Remove { path, error }),
    }
    Ok(())
}

/// Keeps our entry in the node's network config.
pub(crate) struct Installer {
    conf_dir: PathBuf,
    entry: Value,
    backups: Backups,
}

/// What `insert` did to the node's network config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Unchanged,
    Inserted,
    Replaced,
    /// A single plugin's config became a list with our entry, under the `.conflist` name.
    Converted,
}

impl Installer {
    pub(crate) fn new(conf_dir: &Path, entry: Value) -> Installer {
        Installer {
            conf_dir: conf_dir.to_owned(),
            backups: Backups::in_conf_dir(conf_dir),
            entry,
        }
    }

    /// Puts our entry in the config the runtime uses, unless it is there as it should be.
    pub(crate) fn insert(&self) -> Result<Outcome, InstallError> {
        let name = conflist::config_names(&self.conf_dir)?
            .into_iter()
            .next()
            .ok_or_else(|| InstallError::NoConfig {
                dir: self.conf_dir.clone(),
            })?;
        let file = ConfigFile::read(self.conf_dir.join(&name))?;
        let mut list = file.parse()?;
        let original = !list.has_entry();
        let edit = list.put_entry(&self.entry);
        let path = file.list_path();
        let converted = path != file.path;
        // A list of that name left from an earlier conversion of this file is ours to replace.
        if converted && path.exists() && self.backups.get(&name)?.is_none() {
            return Err(InstallError::WouldReplace {
                from: file.path,
                to: path,
            });
        }
        let outcome = match edit {
            Edit::Unchanged if !converted => {
                tracing::debug!(path = %file.path.display(), "the entry is in place");
                return Ok(Outcome::Unchanged);
            }
            _ if converted => Outcome::Converted,
            Edit::Replaced => Outcome::Replaced,
            Edit::Unchanged | Edit::Inserted => Outcome::Inserted,
        };
        // Before the change, so that a crash in between leaves nothing to restore wrongly.
        if original {
            self.backups.save(&name, &file.bytes)?;
        }
        write(&path, &list.render(), file.mode)?;
        if converted {
            remove(&file.path)?;
        }
        info!(
            path = %path.display(),
            from = %file.path.display(),
            ?outcome,
            "ztunnel-cni is the last plugin of the node's network config"
        );
        Ok(outcome)
    }

    /// Takes our entry out of every network config of `conf_dir`. A file the network plugin
    /// did not change since gets its original bytes back (and name, if it was converted).
    pub(crate) fn remove_entries(conf_dir: &Path) -> Result<(), InstallError> {
        let backups = Backups::in_conf_dir(conf_dir);
        let mut removed = false;
        for name in conflist::config_names(conf_dir)? {
            let file = ConfigFile::read(conf_dir.join(&name))?;
            let mut list = match file.parse() {
                Ok(list) => list,
                // Not a config the runtime can use, so not one we changed.
                Err(err) => {
                    warn!("{err}");
                    continue;
                }
            };
            if !list.remove_entries() {
                continue;
            }
            removed = true;
            match original_of(&backups, &file.path)? {
                Some(original) if original_list(conf_dir, &original)? == list => {
                    let path = conf_dir.join(&original.name);
                    write(&path, &original.bytes, file.mode)?;
                    if path != file.path {
                        remove(&file.path)?;
                    }
                    info!(path = %path.display(), "restored the network config as it was before install-cni");
                }
                _ => {
                    write(&file.path, &list.render(), file.mode)?;
                    info!(path = %file.path.display(), "removed ztunnel-cni from the network config; it changed since install-cni, so its other changes stay");
                }
            }
        }
        if !removed {
            info!(dir = %conf_dir.display(), "no network config has ztunnel-cni in it");
        }
        backups.clear()
    }
}

/// The original a config was made from: its own, or that of the single plugin's config it was
/// converted from.
fn original_of(backups: &Backups, path: &Path) -> Result<Option<Original>, InstallError> {
    let name = path.file_name().map(OsString::from).unwrap_or_default();
    if let Some(original) = backups.get(&name)? {
        return Ok(Some(original));
    }
    for single in ["conf", "json"] {
        let name = Path::new(&name).with_extension(single);
        if let Some(original) = backups.get(name.as_os_str())? {
            return Ok(Some(original));
        }
    }
    Ok(None)
}

fn original_list(conf_dir: &Path, original: &Original) -> Result<ConfList, InstallError> {
    ConfList::parse(&conf_dir.join(&original.name), &original.bytes)
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    files::write_atomically(path, bytes, mode).map_err(|error| InstallError::Write {
        path: path.to_owned(),
        error,
    })
}

fn remove(path: &Path) -> Result<(), InstallError> {
    std::fs::remove_file(path).map_err(|error| InstallError::Remove {
        path: path.to_owned(),
        error,
    })
}

#[cfg(test)]
mod tests;
