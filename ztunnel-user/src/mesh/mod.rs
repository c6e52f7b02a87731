//! The mesh as this node knows it: the config in force (workloads, services, policies:
//! `config`), Istio's authorization semantics (`authz`), the kernel's view of the config
//! (`kernel`), and applying a new config: the kernel's maps first, then an atomic swap for
//! userspace (every connection takes one `Arc` of the config and uses it throughout).

pub mod authz;
pub mod config;
pub(crate) mod kernel;

pub use kernel::IndexedWorkload;

use config::reload::{ConfigFile, ConfigStatus};
use config::{Change, MeshConfig, Refused, Touched};
use kernel::{KernelMaps, WorkloadMap};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex, RwLock};

/// What is wrong with one entry of a config, naming the field.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FieldError(String);

impl FieldError {
    pub(crate) fn new(problem: impl Into<String>) -> FieldError {
        FieldError(problem.into())
    }
}

/// What the API reports about the config in force.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MeshStatus {
    pub config: ConfigStatus,
    pub services: usize,
    pub policies: usize,
    /// Every workload with the indices the kernel knows it by.
    pub workloads: Vec<IndexedWorkload>,
}

pub(crate) struct Mesh {
    current: RwLock<Arc<MeshConfig>>,
    file: Option<Arc<ConfigFile>>,
    /// Held while a batch is applied, so batches from any source take turns.
    kernel: Mutex<WorkloadMap>,
}

/// What applying a batch of changes did.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    pub(crate) touched: Touched,
    pub(crate) refused: Vec<Refused>,
}

impl Mesh {
    /// Starts from the `changes` `source` makes to an empty model, and makes the kernel's
    /// `maps` hold its view (replacing whatever an earlier run left there).
    pub(crate) fn new<M: KernelMaps>(
        source: impl FnOnce(&MeshConfig) -> Vec<Change>,
        file: Option<Arc<ConfigFile>>,
        node: &str,
        maps: &M,
    ) -> Result<Mesh, M::Error> {
        let mesh = Mesh {
            current: RwLock::new(Arc::new(MeshConfig::default())),
            file,
            kernel: Mutex::new(WorkloadMap::new(node)),
        };
        mesh.update(source, maps, true)?;
        Ok(mesh)
    }

    /// The config in force.
    pub(crate) fn current(&self) -> Arc<MeshConfig> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Makes the changes `source` derives from the config in force: the kernel's `maps` take
    /// the view of what changed, then the result is put in force. If the kernel refuses the
    /// plaintext rules (a full map), they are left out: the proxy still enforces every
    /// policy. If it refuses the rest, the config in force stays, in the kernel too.
    pub(crate) fn apply<M: KernelMaps>(
        &self,
        source: impl FnOnce(&MeshConfig) -> Vec<Change>,
        maps: &M,
    ) -> Result<Applied, M::Error> {
        self.update(source, maps, false)
    }

    /// `apply`; with `reconcile`, the maps are made to hold the whole view, whatever they
    /// held.
    fn update<M: KernelMaps>(
        &self,
        source: impl FnOnce(&MeshConfig) -> Vec<Change>,
        maps: &M,
        reconcile: bool,
    ) -> Result<Applied, M::Error> {
        let mut kernel = self.kernel.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.current();
        let updated = current.updated(source(&current));
        let applied = Applied {
            touched: updated.touched,
            refused: updated.refused,
        };
        if applied.touched.is_empty() && !reconcile {
            return Ok(applied);
        }
        let staged = kernel.stage(&updated.config, &applied.touched);
        // The usual way: write what changed. Without the plaintext rules in the kernel, a
        // policy change tries them again in full.
        let retry_rules = !kernel.rules_written() && applied.touched.policies > 0;
        let written = !reconcile
            && !retry_rules
            && {
                let diff = kernel.diff(&staged);
                match maps.write(&diff) {
                    Ok(()) => true,
                    Err(err) => {
                        tracing::warn!(%err, "cannot write the changes to the kernel maps; writing them whole");
                        false
                    }
                }
            };
        if written {
            let rules = kernel.rules_written();
            kernel.commit(staged, rules);
        } else {
            // Whole: the maps may hold part of a failed write.
            let rules = match maps.sync(&kernel.full(Some(&staged), true)) {
                Ok(()) => true,
                Err(err) => {
                    tracing::error!(%err, "cannot write the plaintext rules to the kernel; the proxy alone enforces policies");
                    if let Err(err) = maps.sync(&kernel.full(Some(&staged), false)) {
                        kernel.discard(staged);
                        let in_force = kernel.full(None, kernel.rules_written());
                        if let Err(again) = maps.sync(&in_force) {
                            tracing::error!(err = %again, "cannot put the kernel maps back to the config in force");
                        }
                        return Err(err);
                    }
                    false
                }
            };
            kernel.commit(staged, rules);
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(updated.config);
        Ok(applied)
    }

    pub(crate) fn status(&self) -> MeshStatus {
        let config = self.current();
        MeshStatus {
            config: self
                .file
                .as_ref()
                .map_or_else(ConfigStatus::default, |f| f.status()),
            services: config.service_count(),
            policies: config.policies.all().len(),
            workloads: self
                .kernel
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .indexed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use authz::Policy;
    use config::Workload;
    use kernel::{MapsDiff, MeshMaps};
    use std::cell::{Cell, RefCell};

    /// Maps in memory that behave as the kernel's (keys written and deleted, a map that
    /// refuses writes when told to), counting the keys each write names.
    #[derive(Default)]
    struct MemoryMaps {
        maps: RefCell<MeshMaps>,
        keys_written: Cell<usize>,
        refuse_rules: Cell<bool>,
        refuse_workloads: Cell<bool>,
    }

    impl MemoryMaps {
        fn check(&self, rules: usize, workloads: usize) -> Result<(), String> {
            if self.refuse_rules.get() && rules > 0 {
                return Err("ZT_PLAINTEXT_RULES is full".into());
            }
            if self.refuse_workloads.get() && workloads > 0 {
                return Err("ZT_WORKLOADS is full".into());
            }
            self.keys_written
                .set(self.keys_written.get() + rules + workloads);
            Ok(())
        }
    }

    impl KernelMaps for MemoryMaps {
        type Error = String;

        fn sync(&self, maps: &MeshMaps) -> Result<(), String> {
            self.check(maps.plaintext_rules.len(), maps.workloads.len())?;
            *self.maps.borrow_mut() = maps.clone();
            Ok(())
        }

        fn write(&self, diff: &MapsDiff) -> Result<(), String> {
            let written = |values: Vec<bool>| values.into_iter().filter(|v| *v).count();
            self.check(
                written(diff.plaintext_rules.values().map(Option::is_some).collect()),
                written(diff.workloads.values().map(Option::is_some).collect()),
            )?;
            let mut maps = self.maps.borrow_mut();
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

    /// Workload `w<i>` at 10.x.y.z; the first `local` on node `here`, in namespace `demo`.
    fn workload(i: u32, local: bool) -> Change {
        let node = if local { "here" } else { "elsewhere" };
        let text = format!(
            "{{uid: w{i}, name: w{i}, namespace: demo, workloadIps: [10.{}.{}.{}], protocol: HBONE, node: {node}}}",
            i >> 16,
            (i >> 8) & 255,
            i & 255
        );
        Change::Workload(Arc::new(
            serde_yaml_ng::from_str::<Workload>(&text).unwrap(),
        ))
    }

    fn deny(port: u16) -> Change {
        let text = format!(
            "{{name: no-{port}, namespace: demo, scope: Namespace, action: Deny, rules: [[[{{destinationPorts: [{port}]}}]]]}}"
        );
        Change::Policy(Arc::new(serde_yaml_ng::from_str::<Policy>(&text).unwrap()))
    }

    /// A mesh of 10,000 workloads (10 on this node) and one policy, and its maps.
    fn large_mesh() -> (Mesh, MemoryMaps) {
        let maps = MemoryMaps::default();
        let mut changes: Vec<Change> = (0..10_000).map(|i| workload(i, i < 10)).collect();
        changes.push(deny(9090));
        let mesh = Mesh::new(|_| changes, None, "here", &maps).unwrap();
        (mesh, maps)
    }

    /// What a daemon starting now with the config in force would write: the maps must hold it.
    fn assert_maps_hold_the_config(mesh: &Mesh, maps: &MemoryMaps) {
        let config = mesh.current();
        let fresh = MemoryMaps::default();
        let changes = config
            .sorted_workloads()
            .into_iter()
            .map(|w| Change::Workload(Arc::new(w)))
            .chain(
                config
                    .policies
                    .all()
                    .iter()
                    .map(|p| Change::Policy(p.clone())),
            )
            .collect();
        Mesh::new(|_| changes, None, "here", &fresh).unwrap();
        let (held, expected) = (maps.maps.borrow(), fresh.maps.borrow());
        assert_eq!(held.workloads.len(), expected.workloads.len());
        assert_eq!(held.plaintext_rules, expected.plaintext_rules);
        // Indices may differ from a fresh start's; flags and identities' sharing may not.
        for (addr, entry) in &expected.workloads {
            assert_eq!(held.workloads[addr].flags, entry.flags);
        }
    }

    #[test]
    fn one_change_at_ten_thousand_workloads_writes_only_its_keys() {
        let (mesh, maps) = large_mesh();
        assert_eq!(maps.maps.borrow().workloads.len(), 10_000);
        assert!(!maps.maps.borrow().plaintext_rules.is_empty());
        maps.keys_written.set(0);

        // w5000 moves to another address: its old key goes, its new one is written.
        let Change::Workload(moved) = workload(5000, false) else {
            unreachable!()
        };
        let mut moved = Workload::clone(&moved);
        moved.workload_ips = vec!["10.200.0.1".parse().unwrap()];
        let applied = mesh
            .apply(|_| vec![Change::Workload(Arc::new(moved))], &maps)
            .unwrap();
        assert_eq!(applied.touched.workloads, ["w5000"]);
        assert_eq!(maps.keys_written.get(), 1);
        assert_maps_hold_the_config(&mesh, &maps);

        // A policy change rewrites what the 10 local workloads hold, nothing else.
        maps.keys_written.set(0);
        mesh.apply(|_| vec![deny(9091)], &maps).unwrap();
        let rules_per_workload = maps.maps.borrow().plaintext_rules.len() / 10;
        assert!(maps.keys_written.get() <= 10 * (1 + rules_per_workload));
        assert_maps_hold_the_config(&mesh, &maps);

        // Nothing changed, nothing written.
        maps.keys_written.set(0);
        let config = mesh.current();
        let same = config.workload_by_uid("w1").unwrap().clone();
        mesh.apply(|_| vec![Change::Workload(Arc::new(same))], &maps)
            .unwrap();
        assert_eq!(maps.keys_written.get(), 0);
    }

    /// A workload that leaves and one that comes in one batch never share an index: the
    /// kernel's keys of the one leaving cannot be taken for the other's. Its index is free
    /// for the next batch.
    #[test]
    fn indices_freed_in_a_batch_are_handed_out_in_later_ones() {
        let maps = MemoryMaps::default();
        let mesh = Mesh::new(|_| vec![workload(1, true)], None, "here", &maps).unwrap();
        let index = |uid: &str| {
            mesh.status()
                .workloads
                .iter()
                .find(|w| w.uid == uid)
                .map(|w| w.workload_index)
        };
        let first = index("w1").unwrap();
        mesh.apply(
            |_| vec![Change::RemoveWorkload("w1".into()), workload(2, true)],
            &maps,
        )
        .unwrap();
        assert_ne!(index("w2"), Some(first));
        mesh.apply(|_| vec![workload(3, true)], &maps).unwrap();
        assert_eq!(index("w3"), Some(first));
        assert_maps_hold_the_config(&mesh, &maps);
    }

    /// Plaintext rules the kernel refuses are left out (flags too) and tried again at the
    /// next policy change; a workload write it refuses leaves the config in force, in the
    /// maps as well.
    #[test]
    fn refused_writes_leave_the_rules_to_the_proxy_or_keep_the_config_in_force() {
        let (mesh, maps) = large_mesh();
        maps.refuse_rules.set(true);
        mesh.apply(|_| vec![deny(9091)], &maps).unwrap();
        assert!(maps.maps.borrow().plaintext_rules.is_empty());
        let flags = mesh
            .status()
            .workloads
            .iter()
            .map(|w| w.flags)
            .fold(0, |a, f| a | f);
        assert_eq!(flags & ztunnel_common::maps::WORKLOAD_PLAINTEXT_RULES, 0);

        maps.refuse_rules.set(false);
        mesh.apply(|_| vec![deny(9092)], &maps).unwrap();
        assert!(!maps.maps.borrow().plaintext_rules.is_empty());
        assert_maps_hold_the_config(&mesh, &maps);

        maps.refuse_workloads.set(true);
        let before = maps.maps.borrow().clone();
        let refused = mesh.apply(|_| vec![workload(20_000, false)], &maps);
        assert_eq!(refused.unwrap_err(), "ZT_WORKLOADS is full");
        assert!(mesh.current().workload_by_uid("w20000").is_none());
        assert_eq!(*maps.maps.borrow(), before);
    }
}
