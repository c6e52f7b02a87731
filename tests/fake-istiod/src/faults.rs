//! The faults a test puts istiod in (`ztunnel_lab::istiod::Faults`), from a JSON file read
//! at each use: a file that cannot be read or parsed is logged and no fault applies.

use std::path::PathBuf;
use ztunnel_lab::istiod::{Faults, read_faults};

#[derive(Clone, Debug)]
pub struct FaultsFile(pub PathBuf);

impl FaultsFile {
    pub fn read(&self) -> Faults {
        read_faults(&self.0).unwrap_or_else(|problem| {
            tracing::warn!("faults not applied: {problem}");
            Faults::default()
        })
    }
}
