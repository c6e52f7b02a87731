//! Pods that stay captured while nobody serves them: a take-over that failed (a port taken, a
//! transient EMFILE or netlink error) or links that no readable record describes. Their links
//! and `ZT_PODS` entry stay, so their new connections are refused, never sent uncaptured;
//! the take-over is retried with backoff, and the pod is released only once it is gone (its
//! netns deleted or replaced, its cgroup removed) or the CNI plugin disenrolls it.

use super::records::PodRecord;
use super::{EnrollError, Pods};
use crate::api::{EnrolledPod, PodWaiting};
use crate::capture::{DatapathError, PodLinks, detach_pod};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The first retry's delay, doubled after each failure up to `LONGEST_RETRY`.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LONGEST_RETRY: Duration = Duration::from_secs(60);

/// Why a pod whose links have no record waits.
const NO_RECORD: &str = "its links have no readable record: captured and refused until the pod is deleted or enrolled again";

pub(super) struct Waiting {
    /// None: links whose record was unreadable.
    pub(super) record: Option<PodRecord>,
    reason: String,
    attempts: u32,
    retry_at: Instant,
}

impl Waiting {
    pub(super) fn describe(&self, uid: &str, links: PodLinks) -> EnrolledPod {
        let waiting = Some(PodWaiting {
            reason: self.reason.clone(),
            attempts: self.attempts,
        });
        match &self.record {
            Some(record) => EnrolledPod {
                name: record.spec.name.clone(),
                namespace: record.spec.namespace.clone(),
                uid: uid.to_owned(),
                container_id: record.spec.container_id.clone(),
                netns: record.spec.netns.clone(),
                cgroup: record.cgroup.clone(),
                ips: record.spec.ips.clone(),
                identity: String::new(),
                links: links.paths,
                waiting,
            },
            None => EnrolledPod {
                name: String::new(),
                namespace: String::new(),
                uid: uid.to_owned(),
                container_id: String::new(),
                netns: Default::default(),
                cgroup: Default::default(),
                ips: Vec::new(),
                identity: String::new(),
                links: links.paths,
                waiting,
            },
        }
    }
}

/// The waiting pods, by uid.
#[derive(Default)]
pub(super) struct WaitingPods {
    pods: BTreeMap<String, Waiting>,
}

impl WaitingPods {
    pub(super) fn get(&self, uid: &str) -> Option<&Waiting> {
        self.pods.get(uid)
    }

    pub(super) fn len(&self) -> usize {
        self.pods.len()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&String, &Waiting)> {
        self.pods.iter()
    }

    pub(super) fn remove(&mut self, uid: &str) -> Option<Waiting> {
        self.pods.remove(uid)
    }

    /// Records one more failed attempt for the pod `uid` and when to try again.
    fn failed(&mut self, uid: String, record: Option<PodRecord>, reason: String) {
        let attempts = self.pods.get(&uid).map_or(0, |w| w.attempts) + 1;
        let delay = FIRST_RETRY
            .saturating_mul(1 << (attempts - 1).min(16))
            .min(LONGEST_RETRY);
        let pod = record.as_ref().map_or(String::from("?"), |record| {
            format!("{}/{}", record.spec.namespace, record.spec.name)
        });
        tracing::warn!(%pod, %uid, attempts, retry_in = ?delay, %reason,
            "the pod stays captured, its new connections refused, until it can be served");
        self.pods.insert(
            uid,
            Waiting {
                record,
                reason,
                attempts,
                retry_at: Instant::now() + delay,
            },
        );
    }

    /// The pods whose retry is due.
    fn due(&self, now: Instant) -> Vec<(String, Option<PodRecord>)> {
        self.pods
            .iter()
            .filter(|(_, waiting)| waiting.retry_at <= now)
            .map(|(uid, waiting)| (uid.clone(), waiting.record.clone()))
            .collect()
    }
}

/// What became of a pod that stays captured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    Served,
    Waiting,
    Released,
}

impl Pods {
    /// Retries every waiting pod whose time has come.
    pub(crate) fn retry_waiting(&mut self) {
        for (uid, record) in self.waiting.due(Instant::now()) {
            match record {
                Some(record) => {
                    self.take_over(record);
                }
                None => {
                    self.check_orphan(uid);
                }
            }
        }
        self.recount();
    }

    /// Serves again a pod that is captured already (by a previous run, or before a failure),
    /// from its record.
    pub(super) fn take_over(&mut self, record: PodRecord) -> Outcome {
        let started = self
            .reopen_netns(&record)
            .and_then(|netns| self.start(record.clone(), netns, super::OnFailure::StayCaptured));
        self.settle(record, started).0
    }

    /// After an attempt to serve a captured pod: served, waiting for the next attempt, or
    /// released if the pod is gone.
    pub(super) fn settle(
        &mut self,
        record: PodRecord,
        started: Result<EnrolledPod, EnrollError>,
    ) -> (Outcome, Result<EnrolledPod, EnrollError>) {
        let uid = record.spec.uid.clone();
        let outcome = match &started {
            Ok(_) => {
                if let Some(waited) = self.waiting.remove(&uid) {
                    tracing::info!(%uid, attempts = waited.attempts, "the waiting pod is served again");
                }
                Outcome::Served
            }
            Err(err) if err.pod_is_gone() => {
                tracing::info!(%uid, %err, "the pod is gone; removing what its enrollment left");
                self.waiting.remove(&uid);
                self.release_leftovers(&record);
                Outcome::Released
            }
            Err(err) => {
                self.waiting.failed(uid, Some(record), err.to_string());
                Outcome::Waiting
            }
        };
        (outcome, started)
    }

    /// Links that no record describes: moved on to this daemon's programs while their pod is
    /// there (so it stays captured and refused), removed once its cgroup or netns is gone.
    pub(super) fn check_orphan(&mut self, uid: String) -> Outcome {
        let datapath = self.ctx.capture.datapath();
        match datapath.relink_pod(&uid) {
            Err(DatapathError::LinkTargetGone { path }) => {
                tracing::info!(%uid, link = %path.display(), "the pod of links without a record is gone; removing them");
                detach_pod(&datapath.pod_links(&uid));
                self.waiting.remove(&uid);
                Outcome::Released
            }
            Ok(()) => {
                self.waiting.failed(uid, None, NO_RECORD.to_owned());
                Outcome::Waiting
            }
            Err(err) => {
                self.waiting
                    .failed(uid, None, format!("{NO_RECORD} ({err})"));
                Outcome::Waiting
            }
        }
    }

    /// Releases a waiting pod: the CNI plugin disenrolled it, or a newer sandbox replaces it.
    pub(super) fn release_waiting(&mut self, uid: &str) {
        let Some(waiting) = self.waiting.remove(uid) else {
            return;
        };
        match waiting.record {
            Some(record) => self.release_leftovers(&record),
            None => detach_pod(&self.pinned_links(uid)),
        }
        tracing::info!(%uid, "released a waiting pod");
    }

    /// What a recorded pod leaves when it is released without being served: its links, its
    /// map entry and its record. Its listeners, if it ever had any here, are closed (closed
    /// sockets leave the sockhash by themselves).
    pub(super) fn release_leftovers(&self, record: &PodRecord) {
        let datapath = self.ctx.capture.datapath();
        detach_pod(&datapath.pod_links(&record.spec.uid));
        if let Err(err) = datapath.remove_pod(record.netns_cookie) {
            tracing::warn!(%err, "cannot remove pod map entry");
        }
        self.forget(&record.spec.uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_a_minute() {
        let mut waiting = WaitingPods::default();
        let mut delays = Vec::new();
        for _ in 0..9 {
            let before = Instant::now();
            waiting.failed("uid-1".into(), None, NO_RECORD.into());
            let pod = waiting.get("uid-1").unwrap();
            delays.push((pod.retry_at - before).as_secs());
        }
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(waiting.get("uid-1").unwrap().attempts, 9);
        assert!(waiting.due(Instant::now()).is_empty());
        let later = Instant::now() + LONGEST_RETRY;
        assert_eq!(waiting.due(later), [("uid-1".to_owned(), None)]);
    }
}
