//! The node's network config as the container runtime reads it (libcni): the first file by
//! name in the config directory, a plugin list (`.conflist`) or a single plugin (`.conf`,
//! `.json`), and our plugin's entry in it.

use super::InstallError;
use serde_json::{Map, Value};
use std::ffi::{OsStr, OsString};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Our plugin's `type`, which is also the name of its binary in the bin dir.
pub(crate) const PLUGIN_TYPE: &str = "ztunnel-cni";
const LIST_EXTENSION: &str = "conflist";
/// What libcni takes for a network config; the others (ours `.tmp` included) it ignores.
const CONFIG_EXTENSIONS: [&str; 3] = ["conf", LIST_EXTENSION, "json"];

/// Whether the runtime would read a file of this name as a network config.
pub(crate) fn is_config_name(name: &OsStr) -> bool {
    Path::new(name)
        .extension()
        .is_some_and(|extension| CONFIG_EXTENSIONS.iter().any(|known| extension == *known))
}

/// The names of the directory's network configs, in the order the runtime sorts them (bytes,
/// as Go's `sort.Strings`); directories are skipped, as libcni does.
pub(crate) fn config_names(dir: &Path) -> Result<Vec<OsString>, InstallError> {
    let read_error = |error| InstallError::ReadDir {
        dir: dir.to_owned(),
        error,
    };
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_error)? {
        let entry = entry.map_err(read_error)?;
        // Through symlinks, as the runtime opens them.
        let is_file = std::fs::metadata(entry.path()).is_ok_and(|meta| meta.is_file());
        if is_file && is_config_name(&entry.file_name()) {
            names.push(entry.file_name());
        }
    }
    names.sort();
    Ok(names)
}

/// A config file's contents and permissions, as read.
pub(crate) struct ConfigFile {
    pub(crate) path: PathBuf,
    pub(crate) bytes: Vec<u8>,
    pub(crate) mode: u32,
}

impl ConfigFile {
    pub(crate) fn read(path: PathBuf) -> Result<ConfigFile, InstallError> {
        let read = || -> std::io::Result<(Vec<u8>, u32)> {
            let mode = std::fs::metadata(&path)?.permissions().mode() & 0o7777;
            Ok((std::fs::read(&path)?, mode))
        };
        match read() {
            Ok((bytes, mode)) => Ok(ConfigFile { path, bytes, mode }),
            Err(error) => Err(InstallError::Read { path, error }),
        }
    }

    /// The name the file has once it holds a list: a single plugin's becomes `.conflist`.
    pub(crate) fn list_path(&self) -> PathBuf {
        self.path.with_extension(LIST_EXTENSION)
    }

    pub(crate) fn parse(&self) -> Result<ConfList, InstallError> {
        ConfList::parse(&self.path, &self.bytes)
    }
}

/// A network config as a plugin list: its other keys, in the file's order, and its plugins.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ConfList {
    /// Every key but `plugins`, which holds its place here (as null) for the rendering.
    fields: Map<String, Value>,
    plugins: Vec<Value>,
}

/// What putting our entry in did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Edit {
    /// It was there with these settings.
    Unchanged,
    Inserted,
    /// It was there with other settings.
    Replaced,
}

impl ConfList {
    /// Reads `bytes` as the file at `path` is read by the runtime: by its extension, a list or
    /// a single plugin, which is wrapped in a list as libcni does (the list takes its
    /// `cniVersion` and `name`).
    pub(crate) fn parse(path: &Path, bytes: &[u8]) -> Result<ConfList, InstallError> {
        let invalid = |reason: &str| InstallError::Invalid {
            path: path.to_owned(),
            reason: reason.to_owned(),
        };
        let Value::Object(mut fields) =
            serde_json::from_slice(bytes).map_err(|error| InstallError::Parse {
                path: path.to_owned(),
                error,
            })?
        else {
            return Err(invalid("it is not a JSON object"));
        };
        if path.extension().is_some_and(|ext| ext == LIST_EXTENSION) {
            return match fields.get_mut("plugins") {
                Some(Value::Array(plugins)) => {
                    let plugins = std::mem::take(plugins);
                    fields.insert("plugins".into(), Value::Null);
                    Ok(ConfList { fields, plugins })
                }
                Some(_) => Err(invalid("its \"plugins\" is not a list")),
                None => Err(invalid("a .conflist without \"plugins\"")),
            };
        }
        let list_fields = ["cniVersion", "name"]
            .into_iter()
            .filter_map(|key| Some((key.to_owned(), fields.get(key)?.clone())))
            .chain([("plugins".to_owned(), Value::Null)])
            .collect();
        Ok(ConfList {
            fields: list_fields,
            plugins: vec![Value::Object(fields)],
        })
    }

    fn is_ours(plugin: &Value) -> bool {
        plugin["type"] == PLUGIN_TYPE
    }

    pub(crate) fn has_entry(&self) -> bool {
        self.plugins.iter().any(Self::is_ours)
    }

    /// Puts `entry` where ours already is (any duplicate removed), or last: our plugin needs
    /// the IP-assigning plugins' result.
    pub(crate) fn put_entry(&mut self, entry: &Value) -> Edit {
        let Some(at) = self.plugins.iter().position(Self::is_ours) else {
            self.plugins.push(entry.clone());
            return Edit::Inserted;
        };
        let duplicates = self.plugins.iter().filter(|p| Self::is_ours(p)).count() > 1;
        if self.plugins[at] == *entry && !duplicates {
            return Edit::Unchanged;
        }
        self.plugins[at] = entry.clone();
        let after = self.plugins.split_off(at + 1);
        (self.plugins).extend(after.into_iter().filter(|plugin| !Self::is_ours(plugin)));
        Edit::Replaced
    }

    /// Removes our entries; whether there was any.
    pub(crate) fn remove_entries(&mut self) -> bool {
        let before = self.plugins.len();
        self.plugins.retain(|plugin| !Self::is_ours(plugin));
        self.plugins.len() != before
    }

    /// The list as a `.conflist`: JSON indented by 2, the keys in their order.
    pub(crate) fn render(&self) -> Vec<u8> {
        let mut list = self.fields.clone();
        list.insert("plugins".into(), Value::Array(self.plugins.clone()));
        let mut text = serde_json::to_vec_pretty(&list).expect("JSON values always serialize");
        text.push(b'\n');
        text
    }
}
