//! The maps a previous run pinned: adopted when every one has the layout these programs were
//! built for, else replaced; and the bpffs the pins live on.

use super::DatapathError;
use crate::host::mounts::{Filesystem, is_on};
use crate::settings::MapCapacity;
use aya::maps::{MapError, MapInfo};
use std::path::Path;
use ztunnel_common::maps::names;

/// What `load` found in `maps/`.
pub(super) enum PinnedMaps {
    Absent,
    /// Every map is pinned with the layout the programs expect.
    Fitting,
    /// What does not fit, one entry per map.
    Unfit(Vec<String>),
}

/// The shape of a map, as the kernel created it: what the programs were verified against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MapLayout {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
}

impl MapLayout {
    fn of_definition(map: &aya_obj::Map) -> MapLayout {
        MapLayout {
            map_type: map.map_type(),
            key_size: map.key_size(),
            value_size: map.value_size(),
            max_entries: map.max_entries(),
            flags: map.map_flags(),
        }
    }

    fn of_pin(path: &Path) -> Result<MapLayout, MapError> {
        let info = MapInfo::from_pin(path)?;
        Ok(MapLayout {
            map_type: info.map_type()? as u32,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        })
    }
}

impl std::fmt::Display for MapLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {}, key {} B, value {} B, {} entries, flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// Compares the maps pinned in `dir` with the definitions in `object`, sized by `capacities`
/// where the settings size them. Pins of maps these programs do not have (an upgrade removed
/// them) are removed.
///
/// A map pinned with another capacity than the setting is unfit like one of another layout,
/// and replaced with the rest: the daemon starts, its new maps are filled from scratch (pods,
/// listeners, the mesh config's view; only the counters start again from zero) and the pods
/// move on to them as after an upgrade. Refusing to start would leave every pod of the node
/// refused until an operator removed the pins by hand, for a change the operator asked for.
pub(super) fn check_pinned_maps(
    dir: &Path,
    object: &aya_obj::Object,
    capacities: &[MapCapacity],
) -> PinnedMaps {
    remove_unknown_pins(dir);
    let mut found = 0;
    let mut problems = Vec::new();
    for name in names::ALL {
        let path = dir.join(name);
        if !path.exists() {
            problems.push(format!("{name} is not pinned"));
            continue;
        }
        found += 1;
        let Some(definition) = object.maps.get(name) else {
            problems.push(format!("{name} is not in the eBPF object"));
            continue;
        };
        let mut wanted = MapLayout::of_definition(definition);
        if let Some(capacity) = capacities.iter().find(|capacity| capacity.map == name) {
            wanted.max_entries = capacity.entries;
        }
        if let Some(problem) = layout_problem(name, MapLayout::of_pin(&path), wanted) {
            problems.push(problem);
        }
    }
    match (found, problems.is_empty()) {
        (0, _) => PinnedMaps::Absent,
        (_, true) => PinnedMaps::Fitting,
        (_, false) => PinnedMaps::Unfit(problems),
    }
}

/// Why a pinned map cannot serve programs that expect `wanted`, if it cannot.
fn layout_problem(
    name: &str,
    pinned: Result<MapLayout, MapError>,
    wanted: MapLayout,
) -> Option<String> {
    match pinned {
        Ok(pinned) if pinned == wanted => None,
        Ok(pinned) => Some(format!(
            "{name} is pinned as {pinned}, the programs need {wanted}"
        )),
        Err(err) => Some(format!("{name} is pinned but unreadable as a map: {err}")),
    }
}

fn remove_unknown_pins(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let known = entry
            .file_name()
            .to_str()
            .is_some_and(|name| names::ALL.contains(&name));
        if known {
            continue;
        }
        tracing::warn!(path = %path.display(), "removing a pin these programs do not use");
        if let Err(err) = remove_pins(&path) {
            tracing::warn!(%err, "cannot remove the unused pin");
        }
    }
}

pub(super) fn ensure_bpffs(dir: &Path) -> Result<(), DatapathError> {
    // The pin directory's parent may not exist yet; check the closest existing ancestor.
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let on_bpffs = is_on(existing, Filesystem::Bpffs).map_err(|source| DatapathError::Fs {
        what: "statfs",
        path: existing.to_owned(),
        source,
    })?;
    if on_bpffs {
        Ok(())
    } else {
        Err(DatapathError::NotBpffs(dir.to_owned()))
    }
}

/// Removes a pin or a tree of pins; unpinning a link detaches it.
pub(super) fn remove_pins(path: &Path) -> Result<(), DatapathError> {
    let removed = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(err) => Err(err),
    };
    match removed {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(DatapathError::Fs {
            what: "removing",
            path: path.to_owned(),
            source: err,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_map_fits_only_with_the_same_layout() {
        let wanted = MapLayout {
            map_type: 1,
            key_size: 8,
            value_size: 40,
            max_entries: 4096,
            flags: 0,
        };
        assert_eq!(layout_problem("ZT_PODS", Ok(wanted), wanted), None);
        let grown = MapLayout {
            value_size: 44,
            ..wanted
        };
        assert_eq!(
            layout_problem("ZT_PODS", Ok(grown), wanted).unwrap(),
            "ZT_PODS is pinned as type 1, key 8 B, value 44 B, 4096 entries, flags 0x0, \
             the programs need type 1, key 8 B, value 40 B, 4096 entries, flags 0x0"
        );
        let unreadable = layout_problem(
            "ZT_PODS",
            Err(MapError::InvalidName { name: "x".into() }),
            wanted,
        );
        assert!(
            unreadable
                .unwrap()
                .starts_with("ZT_PODS is pinned but unreadable as a map")
        );
    }

    #[test]
    fn the_programs_define_every_map_the_daemon_pins() {
        for programs in [super::super::PROGRAMS, super::super::PROGRAMS_LOGGING] {
            let object = aya_obj::Object::parse(programs).unwrap();
            for name in names::ALL {
                assert!(object.maps.contains_key(name), "{name}");
            }
        }
    }
}
