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
use kernel::{KernelMaps, Staged, WorkloadMap};
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
        let next = updated.config;
        let staged = kernel.stage(&current, &next, &applied.touched);
        // The usual way: write what changed. Without the plaintext rules in the kernel, a
        // policy change tries them again in full.
        let retry_rules = !kernel.rules_written() && applied.touched.policies > 0;
        let written = !reconcile
            && !retry_rules
            && {
                let diff = kernel.diff(&current, &next, &staged);
                maps.write(&diff)
                .inspect_err(|err| tracing::warn!(%err, "cannot write the changes to the kernel maps; writing them whole"))
                .is_ok()
            };
        let rules = if written {
            kernel.rules_written()
        } else {
            match write_whole(&kernel, &current, &next, &staged, maps) {
                Ok(rules) => rules,
                Err(err) => {
                    kernel.discard(staged);
                    return Err(err);
                }
            }
        };
        kernel.commit(staged, rules);
        for field in next.accepted_not_used_since(&current) {
            tracing::warn!(
                field,
                "accepted, not used: this build reads the field but does not act on it yet (see accepted_not_used in /config_dump)"
            );
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
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
            policies: config.policies.len(),
            workloads: self
                .kernel
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .indexed(&config),
        }
    }
}

/// Makes `maps` hold the whole view of `next` with `staged` (they may hold part of a failed
/// write): with the plaintext rules if the kernel takes them, else without, else the view of
/// `current` again. Returns whether the rules are written.
fn write_whole<M: KernelMaps>(
    kernel: &WorkloadMap,
    current: &MeshConfig,
    next: &MeshConfig,
    staged: &Staged,
    maps: &M,
) -> Result<bool, M::Error> {
    let Err(err) = maps.sync(&kernel.full(next, Some(staged), true)) else {
        return Ok(true);
    };
    tracing::error!(%err, "cannot write the plaintext rules to the kernel; the proxy alone enforces policies");
    let Err(err) = maps.sync(&kernel.full(next, Some(staged), false)) else {
        return Ok(false);
    };
    let in_force = kernel.full(current, None, kernel.rules_written());
    if let Err(again) = maps.sync(&in_force) {
        tracing::error!(err = %again, "cannot put the kernel maps back to the config in force");
    }
    Err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use authz::Policy;
    use config::Workload;
    use kernel::memory::{MapFull, MemoryMaps};
    use std::sync::atomic::Ordering;

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
        let (held, expected) = (maps.held(), fresh.held());
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
        assert_eq!(maps.held().workloads.len(), 10_000);
        assert!(!maps.held().plaintext_rules.is_empty());
        maps.keys_written.store(0, Ordering::Relaxed);

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
        assert_eq!(maps.keys_written.load(Ordering::Relaxed), 1);
        assert_maps_hold_the_config(&mesh, &maps);

        // A policy change rewrites what the 10 local workloads hold, nothing else.
        maps.keys_written.store(0, Ordering::Relaxed);
        mesh.apply(|_| vec![deny(9091)], &maps).unwrap();
        let rules_per_workload = maps.held().plaintext_rules.len() / 10;
        assert!(maps.keys_written.load(Ordering::Relaxed) <= 10 * (1 + rules_per_workload));
        assert_maps_hold_the_config(&mesh, &maps);

        // Nothing changed, nothing written.
        maps.keys_written.store(0, Ordering::Relaxed);
        let config = mesh.current();
        let same = config.workload_by_uid("w1").unwrap().clone();
        mesh.apply(|_| vec![Change::Workload(Arc::new(same))], &maps)
            .unwrap();
        assert_eq!(maps.keys_written.load(Ordering::Relaxed), 0);
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
        maps.refuse_rules.store(true, Ordering::Relaxed);
        mesh.apply(|_| vec![deny(9091)], &maps).unwrap();
        assert!(maps.held().plaintext_rules.is_empty());
        let flags = mesh
            .status()
            .workloads
            .iter()
            .map(|w| w.flags)
            .fold(0, |a, f| a | f);
        assert_eq!(flags & ztunnel_common::maps::WORKLOAD_PLAINTEXT_RULES, 0);

        maps.refuse_rules.store(false, Ordering::Relaxed);
        mesh.apply(|_| vec![deny(9092)], &maps).unwrap();
        assert!(!maps.held().plaintext_rules.is_empty());
        assert_maps_hold_the_config(&mesh, &maps);

        maps.refuse_workloads.store(true, Ordering::Relaxed);
        let before = maps.held();
        let refused = mesh.apply(|_| vec![workload(20_000, false)], &maps);
        assert_eq!(refused.unwrap_err(), MapFull("ZT_WORKLOADS"));
        assert!(mesh.current().workload_by_uid("w20000").is_none());
        assert_eq!(maps.held(), before);
    }
}
