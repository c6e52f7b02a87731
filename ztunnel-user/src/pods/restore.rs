//! Taking over the pods a previous run enrolled, from their records: their links stayed
//! attached (refusing new connections while nobody listened), so the daemon opens their
//! listeners and map entries again and then moves the links on to its own programs; what
//! cannot be taken over is released.

use super::records::{PodRecord, PodStateError};
use super::{EnrollError, Pods};
use crate::api::EnrolledPod;
use crate::capture::{Links, detach_pod};
use crate::host::netns::Netns;
use std::collections::HashSet;

impl Pods {
    /// Takes over the pods the previous run enrolled, from their records: a pod whose netns
    /// and links are still there is served again, the leftovers of any other are removed, and
    /// so are links and pod entries no record claims. Runs once at start, before the API
    /// serves; fails only when the records cannot be listed at all.
    pub(crate) fn restore(&mut self) -> Result<(), PodStateError> {
        let (mut adopted, mut released, mut refused) = (0, 0, 0);
        for loaded in self.states.load_all()? {
            let record = match loaded {
                Ok(record) => record,
                Err(err) => {
                    tracing::error!(%err, "removing a pod record this daemon cannot use; the pod's links, if any, are removed below");
                    if let Err(err) = self.states.discard(&err) {
                        tracing::warn!(%err, "cannot remove the refused record");
                    }
                    refused += 1;
                    continue;
                }
            };
            let label = format!("{}/{}", record.spec.namespace, record.spec.name);
            match self.adopt(record.clone()) {
                Ok(_) => adopted += 1,
                Err(err) => {
                    tracing::warn!(pod = %label, %err, "cannot take the pod over; removing what its enrollment left");
                    self.release_leftovers(&record);
                    released += 1;
                }
            }
        }
        self.release_unclaimed();
        tracing::info!(
            adopted,
            released,
            refused,
            "took over the pods of the previous run"
        );
        Ok(())
    }

    fn adopt(&mut self, record: PodRecord) -> Result<EnrolledPod, EnrollError> {
        let netns = Netns::open(&record.spec.netns)?;
        let found = netns.cookie()?;
        if found != record.netns_cookie {
            return Err(EnrollError::NetnsReplaced {
                path: record.spec.netns.clone(),
                recorded: record.netns_cookie,
                found,
            });
        }
        self.start(record, netns, Links::Adopt)
    }

    /// What a recorded pod that cannot be taken over leaves: its links, its map entry and its
    /// record. Its old listeners died with the previous run (closed sockets leave the sockhash
    /// by themselves); a failed `start` has undone its own steps; and a netns that is gone or
    /// no longer the pod's is left alone.
    fn release_leftovers(&self, record: &PodRecord) {
        let datapath = self.ctx.capture.datapath();
        detach_pod(&datapath.pod_links(&record.spec.uid));
        if let Err(err) = datapath.remove_pod(record.netns_cookie) {
            tracing::warn!(%err, "cannot remove pod map entry");
        }
        self.forget(&record.spec.uid);
    }

    /// Links and `ZT_PODS` entries of pods no record claims (a record refused as corrupt, or
    /// state from before records existed): nothing would serve those pods.
    fn release_unclaimed(&self) {
        let datapath = self.ctx.capture.datapath();
        for uid in datapath.pinned_pods() {
            if !self.enrolled.contains_key(&uid) {
                tracing::warn!(%uid, "removing the links of a pod no record describes");
                detach_pod(&datapath.pod_links(&uid));
            }
        }
        let claimed: HashSet<u64> = self
            .enrolled
            .values()
            .map(|e| e.record.netns_cookie)
            .collect();
        for cookie in datapath.pod_cookies() {
            if !claimed.contains(&cookie)
                && let Err(err) = datapath.remove_pod(cookie)
            {
                tracing::warn!(cookie, %err, "cannot remove an unclaimed pod map entry");
            }
        }
    }
}
