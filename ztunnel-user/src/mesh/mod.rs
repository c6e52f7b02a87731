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
use kernel::{MeshMaps, WorkloadMap};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex, RwLock};
use ztunnel_common::maps::WORKLOAD_PLAINTEXT_RULES;

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
    kernel: Mutex<(WorkloadMap, Vec<IndexedWorkload>)>,
}

/// What applying a batch of changes did.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    pub(crate) touched: Touched,
    pub(crate) refused: Vec<Refused>,
}

impl Mesh {
    /// Starts from the `changes` `source` makes to an empty model, and has `write` put its
    /// kernel view into the kernel's maps (replacing whatever an earlier run left there).
    pub(crate) fn new<E: std::fmt::Display>(
        source: impl FnOnce(&MeshConfig) -> Vec<Change>,
        file: Option<Arc<ConfigFile>>,
        node: &str,
        write: impl Fn(&MeshMaps) -> Result<(), E>,
    ) -> Result<Mesh, E> {
        let mesh = Mesh {
            current: RwLock::new(Arc::new(MeshConfig::default())),
            file,
            kernel: Mutex::new((WorkloadMap::new(node), Vec::new())),
        };
        mesh.update(source, write, true)?;
        Ok(mesh)
    }

    /// The config in force.
    pub(crate) fn current(&self) -> Arc<MeshConfig> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Makes the changes `source` derives from the config in force: has `write` put the kernel
    /// view of the result into the kernel's maps, then puts it in force. If the kernel refuses
    /// the plaintext rules (a full map), they are left out: the proxy still enforces every
    /// policy. If it refuses the rest, the config in force stays.
    pub(crate) fn apply<E: std::fmt::Display>(
        &self,
        source: impl FnOnce(&MeshConfig) -> Vec<Change>,
        write: impl Fn(&MeshMaps) -> Result<(), E>,
    ) -> Result<Applied, E> {
        self.update(source, write, false)
    }

    /// `apply`, or with `always_write` the kernel written even when nothing changed.
    fn update<E: std::fmt::Display>(
        &self,
        source: impl FnOnce(&MeshConfig) -> Vec<Change>,
        write: impl Fn(&MeshMaps) -> Result<(), E>,
        always_write: bool,
    ) -> Result<Applied, E> {
        let mut kernel = self.kernel.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.current();
        let updated = current.updated(source(&current));
        let applied = Applied {
            touched: updated.touched,
            refused: updated.refused,
        };
        if applied.touched.is_empty() && !always_write {
            return Ok(applied);
        }
        let (maps, mut indexed) = kernel.0.view(&updated.config);
        if let Err(err) = write(&maps) {
            tracing::error!(%err, "cannot write the plaintext rules to the kernel; the proxy alone enforces policies");
            write(&maps.without_plaintext_rules())?;
            for workload in &mut indexed {
                workload.flags &= !WORKLOAD_PLAINTEXT_RULES;
            }
        }
        kernel.1 = indexed;
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
                .1
                .clone(),
        }
    }
}
