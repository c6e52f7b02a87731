//! The endpoints of one service: a list sorted by uid, shared between versions of the model
//! until one changes it, then copied (that service's list, not the model). Most services have
//! a handful of endpoints, which a persistent map spent a 16-entry node on; a change to a
//! service of E endpoints costs a copy of E pointers.

use super::Workload;
use std::sync::Arc;

#[derive(Clone, Debug, Default)]
pub(super) struct Endpoints(Arc<Vec<Arc<Workload>>>);

impl Endpoints {
    fn position(&self, uid: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|w| (*w.uid).cmp(uid))
    }

    /// Adds `workload`, or replaces the one with its uid.
    pub(super) fn insert(&mut self, workload: Arc<Workload>) {
        match self.position(&workload.uid) {
            Ok(at) => Arc::make_mut(&mut self.0)[at] = workload,
            Err(at) => Arc::make_mut(&mut self.0).insert(at, workload),
        }
    }

    pub(super) fn remove(&mut self, uid: &str) {
        if let Ok(at) = self.position(uid) {
            Arc::make_mut(&mut self.0).remove(at);
        }
    }

    pub(super) fn contains(&self, uid: &str) -> bool {
        self.position(uid).is_ok()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Workload> {
        self.0.iter().map(|w| &**w)
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the two are the same list (not a copy): what a version that did not change
    /// the service shares with the one before.
    #[cfg(test)]
    pub(super) fn ptr_eq(&self, other: &Endpoints) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
