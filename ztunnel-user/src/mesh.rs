//! The mesh config in force, and applying a new one: the kernel's maps first, then an atomic
//! swap for userspace (every connection takes one `Arc` of the config and uses it throughout).

use crate::config::MeshConfig;
use crate::config::reload::{ConfigFile, ConfigStatus};
use crate::datapath::{Datapath, DatapathError, MeshMaps};
use crate::workload_map::{IndexedWorkload, WorkloadMap};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex, RwLock};
use ztunnel_common::maps::WORKLOAD_PLAINTEXT_RULES;

/// What the API reports about the config in force.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MeshStatus {
    pub config: ConfigStatus,
    pub services: usize,
    pub policies: usize,
    /// Every workload with the indices the kernel knows it by.
    pub workloads: Vec<IndexedWorkload>,
}

pub struct Mesh {
    current: RwLock<Arc<MeshConfig>>,
    file: Option<Arc<ConfigFile>>,
    kernel: Mutex<(WorkloadMap, Vec<IndexedWorkload>)>,
}

impl Mesh {
    /// Starts from `config` (read from `file`, if any) and writes it to the kernel.
    pub fn new(
        config: MeshConfig,
        file: Option<Arc<ConfigFile>>,
        node: &str,
        datapath: &Datapath,
    ) -> Result<Mesh, DatapathError> {
        let mesh = Mesh {
            current: RwLock::new(Arc::new(MeshConfig::default())),
            file,
            kernel: Mutex::new((WorkloadMap::new(node), Vec::new())),
        };
        mesh.apply(config, datapath)?;
        Ok(mesh)
    }

    /// The config in force.
    pub fn current(&self) -> Arc<MeshConfig> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Writes `config` to the kernel, then puts it in force. If the kernel refuses the
    /// plaintext rules (a full map), they are left out: the proxy still enforces every policy.
    pub fn apply(&self, config: MeshConfig, datapath: &Datapath) -> Result<(), DatapathError> {
        let mut kernel = self.kernel.lock().unwrap_or_else(|p| p.into_inner());
        let (maps, mut indexed) = kernel.0.view(&config);
        if let Err(err) = datapath.sync_mesh(&maps) {
            tracing::error!(%err, "cannot write the plaintext rules to the kernel; the proxy alone enforces policies");
            datapath.sync_mesh(&without_plaintext_rules(maps))?;
            for workload in &mut indexed {
                workload.flags &= !WORKLOAD_PLAINTEXT_RULES;
            }
        }
        kernel.1 = indexed;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        Ok(())
    }

    pub fn file(&self) -> Option<Arc<ConfigFile>> {
        self.file.clone()
    }

    pub fn status(&self) -> MeshStatus {
        let config = self.current();
        MeshStatus {
            config: self
                .file
                .as_ref()
                .map_or_else(ConfigFile::no_file_status, |f| f.status()),
            services: config.services.len(),
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

fn without_plaintext_rules(mut maps: MeshMaps) -> MeshMaps {
    maps.plaintext_rules.clear();
    for entry in maps.workloads.values_mut() {
        entry.flags &= !WORKLOAD_PLAINTEXT_RULES;
    }
    maps
}
