//! Kernel maps in memory for the tests of what feeds them: keys written and deleted as the
//! kernel's maps take them, a map that refuses writes when told to (as a full one does), and a
//! count of the keys each write names.

use super::{KernelMaps, MapsDiff, MeshMaps};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// A map refused a write.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0} is full")]
pub(crate) struct MapFull(pub(crate) &'static str);

#[derive(Default)]
pub(crate) struct MemoryMaps {
    pub(crate) maps: Mutex<MeshMaps>,
    pub(crate) keys_written: AtomicUsize,
    pub(crate) refuse_rules: AtomicBool,
    pub(crate) refuse_workloads: AtomicBool,
}

impl MemoryMaps {
    /// What the maps hold now.
    pub(crate) fn held(&self) -> MeshMaps {
        self.maps.lock().unwrap().clone()
    }

    /// Counts the keys a write names, unless a map it writes to refuses.
    fn check(&self, rules: usize, workloads: usize) -> Result<(), MapFull> {
        if self.refuse_rules.load(Ordering::Relaxed) && rules > 0 {
            return Err(MapFull("ZT_PLAINTEXT_RULES"));
        }
        if self.refuse_workloads.load(Ordering::Relaxed) && workloads > 0 {
            return Err(MapFull("ZT_WORKLOADS"));
        }
        self.keys_written
            .fetch_add(rules + workloads, Ordering::Relaxed);
        Ok(())
    }
}

impl KernelMaps for MemoryMaps {
    type Error = MapFull;

    fn sync(&self, maps: &MeshMaps) -> Result<(), MapFull> {
        self.check(maps.plaintext_rules.len(), maps.workloads.len())?;
        *self.maps.lock().unwrap() = maps.clone();
        Ok(())
    }

    fn write(&self, diff: &MapsDiff) -> Result<(), MapFull> {
        let written = |values: &mut dyn Iterator<Item = bool>| values.filter(|v| *v).count();
        self.check(
            written(&mut diff.plaintext_rules.values().map(Option::is_some)),
            written(&mut diff.workloads.values().map(Option::is_some)),
        )?;
        let mut maps = self.maps.lock().unwrap();
        for (key, value) in &diff.workloads {
            match value {
                Some(entry) => maps.workloads.insert(*key, *entry),
                None => maps.workloads.remove(key),
            };
        }
        for (key, value) in &diff.plaintext_rules {
            match value {
                Some(verdict) => maps.plaintext_rules.insert(*key, *verdict),
                None => maps.plaintext_rules.remove(key),
            };
        }
        Ok(())
    }
}
