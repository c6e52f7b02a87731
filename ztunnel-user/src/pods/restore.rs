//! Taking over the pods a previous run enrolled, from their records: their links stayed
//! attached (refusing new connections while nobody listened), so the daemon opens their
//! listeners and map entries again and then moves the links on to its own programs. A pod
//! that cannot be served yet stays captured and waits (`waiting`); only a pod that is gone is
//! released.

use super::records::{PodRecord, PodStateError};
use super::waiting::Outcome;
use super::{EnrollError, Pods};
use crate::host::netns::Netns;
use std::collections::HashSet;

impl Pods {
    /// Takes over the pods the previous run enrolled, from their records, and the links no
    /// readable record describes. Runs once at start, before the API serves; fails only when
    /// the records cannot be listed at all.
    pub(crate) fn restore(&mut self) -> Result<(), PodStateError> {
        let (mut served, mut waiting, mut released) = (0, 0, 0);
        let mut tally = |outcome| match outcome {
            Outcome::Served => served += 1,
            Outcome::Waiting => waiting += 1,
            Outcome::Released => released += 1,
        };
        for loaded in self.states.load_all()? {
            match loaded {
                Ok(record) => tally(self.take_over(record)),
                Err(err) => {
                    // Its links, if any, stay: they are taken care of below.
                    tracing::error!(%err, "removing a pod record this daemon cannot use");
                    if let Err(err) = self.states.discard(&err) {
                        tracing::warn!(%err, "cannot remove the refused record");
                    }
                }
            }
        }
        let datapath = self.ctx.capture.datapath().clone();
        let orphans: Vec<String> = datapath
            .pinned_pods()
            .into_iter()
            .filter(|uid| !self.enrolled.contains_key(uid) && self.waiting.get(uid).is_none())
            .collect();
        let no_orphans = orphans.is_empty();
        for uid in orphans {
            tally(self.check_orphan(uid));
        }
        // A `ZT_PODS` entry no record claims is stale, unless it is a pod whose links have no
        // record: those are only known by uid, so then every entry stays.
        if no_orphans {
            self.remove_unclaimed_entries();
        }
        self.recount();
        tracing::info!(
            served,
            waiting,
            released,
            "took over the pods of the previous run"
        );
        Ok(())
    }

    /// The pod's netns, if it is still the one its record names.
    pub(super) fn reopen_netns(&self, record: &PodRecord) -> Result<Netns, EnrollError> {
        let netns = Netns::open(&record.spec.netns)?;
        let found = netns.cookie()?;
        if found != record.netns_cookie {
            return Err(EnrollError::NetnsReplaced {
                path: record.spec.netns.clone(),
                recorded: record.netns_cookie,
                found,
            });
        }
        Ok(netns)
    }

    fn remove_unclaimed_entries(&self) {
        let datapath = self.ctx.capture.datapath();
        let claimed: HashSet<u64> = self
            .enrolled
            .values()
            .map(|e| e.record.netns_cookie)
            .chain(
                self.waiting
                    .iter()
                    .filter_map(|(_, w)| Some(w.record.as_ref()?.netns_cookie)),
            )
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
