//! What a pod or a peer may take of the node. Every connection the proxy accepts is admitted
//! against the node's file-descriptor budget (RLIMIT_NOFILE less a reserve for the daemon's
//! own files) and against its pod's share of that budget; an HBONE connection that has not
//! authenticated yet also against the caps on those, per source address and overall. Over a
//! cap, a connection is refused (closed at once), counted and logged once per interval, and
//! everyone else goes on being served.
//!
//! A connection is charged the descriptors it may hold at most: its own socket and the one it
//! opens (a plaintext delivery or direct upstream; a pooled HBONE connection is never more
//! than one per outbound connection). What is charged is therefore a bound on what is open.

use crate::api::Limits;
use crate::settings::Settings;
use crate::telemetry::refusals::Refusal;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Descriptors kept out of the budget, at least: the daemon's own files, the API and HTTP
/// listeners, each pod's netns handle and listeners, the config reloads, the CNI calls.
const MIN_RESERVE: u64 = 1024;
/// Or this fraction of the limit, where that is more.
const RESERVE_DIVISOR: u64 = 20;

impl Limits {
    /// The limits for a process allowed `open_files` descriptors.
    pub(crate) fn new(open_files: u64, settings: &Settings) -> Limits {
        let reserve = (open_files / RESERVE_DIVISOR).max(MIN_RESERVE);
        let budget = usize::try_from(open_files.saturating_sub(reserve)).unwrap_or(usize::MAX);
        Limits {
            open_files,
            fd_budget: budget,
            pod_fds: budget / 100 * usize::from(settings.pod_share_percent),
            unauthenticated: settings.max_unauthenticated.min(budget / 2),
            unauthenticated_per_source: settings.max_unauthenticated_per_source,
            handshake_timeout_secs: settings.handshake_timeout_secs,
        }
    }
}

/// The node's budget and what is charged to it.
pub(crate) struct Admission {
    limits: Limits,
    used: AtomicUsize,
    handshakes: Arc<SourceCaps>,
}

impl Admission {
    pub(crate) fn new(limits: Limits) -> Arc<Admission> {
        let handshakes = SourceCaps::new(limits.unauthenticated, limits.unauthenticated_per_source);
        Arc::new(Admission {
            limits,
            used: AtomicUsize::new(0),
            handshakes,
        })
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// How long a connection may take to authenticate.
    pub(crate) fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.limits.handshake_timeout_secs)
    }

    /// Descriptors charged now.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Connections that have not authenticated yet.
    pub(crate) fn unauthenticated(&self) -> usize {
        self.handshakes.total()
    }

    /// A pod's share of the budget.
    pub(crate) fn pod_share(self: &Arc<Self>) -> Arc<Share> {
        Arc::new(Share {
            admission: self.clone(),
            used: AtomicUsize::new(0),
            limit: self.limits.pod_fds,
        })
    }

    /// The node's own share (the HTTP endpoints): the whole budget.
    pub(crate) fn node_share(self: &Arc<Self>) -> Arc<Share> {
        Arc::new(Share {
            admission: self.clone(),
            used: AtomicUsize::new(0),
            limit: usize::MAX,
        })
    }

    /// A place among the connections that are still authenticating, until the returned value
    /// is dropped.
    pub(crate) fn begin_handshake(&self, source: IpAddr) -> Result<Entered, Refusal> {
        self.handshakes.enter(source).map_err(|cap| match cap {
            CapHit::Total => Refusal::Unauthenticated,
            CapHit::PerSource => Refusal::UnauthenticatedPerSource,
        })
    }
}

/// Caps on connections of one kind at a time: node-wide and from one source address.
pub(crate) struct SourceCaps {
    total: usize,
    per_source: usize,
    open: Mutex<OpenBySource>,
}

#[derive(Default)]
struct OpenBySource {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// Which cap a connection hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CapHit {
    Total,
    PerSource,
}

impl SourceCaps {
    pub(crate) fn new(total: usize, per_source: usize) -> Arc<SourceCaps> {
        Arc::new(SourceCaps {
            total,
            per_source,
            open: Mutex::default(),
        })
    }

    /// Counts a connection from `source` in, until the returned value is dropped.
    pub(crate) fn enter(self: &Arc<Self>, source: IpAddr) -> Result<Entered, CapHit> {
        let mut open = self.lock();
        if open.total >= self.total {
            return Err(CapHit::Total);
        }
        let from_source = open.by_source.entry(source).or_default();
        if *from_source >= self.per_source {
            return Err(CapHit::PerSource);
        }
        *from_source += 1;
        open.total += 1;
        Ok(Entered {
            caps: self.clone(),
            source,
        })
    }

    fn total(&self) -> usize {
        self.lock().total
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OpenBySource> {
        // Plain counts: a panic elsewhere cannot leave them half-updated.
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A connection counted by `SourceCaps`, counted out when dropped.
pub(crate) struct Entered {
    caps: Arc<SourceCaps>,
    source: IpAddr,
}

impl Drop for Entered {
    fn drop(&mut self) {
        let mut open = self.caps.lock();
        open.total -= 1;
        if let Some(from_source) = open.by_source.get_mut(&self.source) {
            *from_source -= 1;
            if *from_source == 0 {
                open.by_source.remove(&self.source);
            }
        }
    }
}

/// Adds `amount` to `counter` if that keeps it within `limit`.
fn take(counter: &AtomicUsize, amount: usize, limit: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
            used.checked_add(amount).filter(|after| *after <= limit)
        })
        .is_ok()
}

/// One pod's use of the budget (or the node's own).
pub(crate) struct Share {
    admission: Arc<Admission>,
    used: AtomicUsize,
    limit: usize,
}

impl Share {
    /// Charges a new connection's socket to this share and to the node, until the returned
    /// value is dropped (with the connection).
    pub(crate) fn admit(self: &Arc<Self>) -> Result<Admitted, Refusal> {
        self.take_one()?;
        Ok(Admitted {
            share: self.clone(),
            fds: 1,
        })
    }

    fn take_one(&self) -> Result<(), Refusal> {
        let node = &self.admission;
        if !take(&node.used, 1, node.limits.fd_budget) {
            return Err(Refusal::FdBudget);
        }
        if !take(&self.used, 1, self.limit) {
            node.used.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::PodShare);
        }
        Ok(())
    }
}

/// A connection's charge, given back when dropped.
pub(crate) struct Admitted {
    share: Arc<Share>,
    fds: usize,
}

impl Admitted {
    /// Charges the connection's second socket (its upstream, or its delivery to the app).
    /// Charged as it is made rather than at accept: a connection carried over HBONE has none.
    pub(crate) fn charge_upstream(&mut self) -> Result<(), Refusal> {
        self.share.take_one()?;
        self.fds += 1;
        Ok(())
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.share.used.fetch_sub(self.fds, Ordering::AcqRel);
        self.share
            .admission
            .used
            .fetch_sub(self.fds, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(open_files: u64, args: &[&str]) -> Arc<Admission> {
        let mut argv = vec!["--node", "n"];
        argv.extend(args);
        Admission::new(Limits::new(open_files, &crate::settings::parse(&argv)))
    }

    #[test]
    fn the_budget_keeps_a_reserve() {
        let small = Limits::new(4096, &crate::settings::parse(&["--node", "n"]));
        assert_eq!(small.fd_budget, 4096 - 1024);
        assert_eq!(small.pod_fds, 3072 / 100 * 50);
        let large = admission(1 << 20, &[]);
        assert_eq!(large.limits().fd_budget, (1 << 20) - (1 << 20) / 20);
        // Never more unauthenticated connections than half the budget.
        assert_eq!(admission(2048, &[]).limits().unauthenticated, 512);
    }

    #[test]
    fn a_pod_cannot_take_more_than_its_share_and_others_still_can() {
        let node = admission(4096, &["--pod-share-percent", "10"]);
        let (greedy, other) = (node.pod_share(), node.pod_share());
        let limit = node.limits().pod_fds;
        let held: Vec<Admitted> = (0..limit / 2)
            .map(|_| {
                let mut admitted = greedy.admit().unwrap();
                admitted.charge_upstream().unwrap();
                admitted
            })
            .collect();
        assert_eq!(greedy.admit().err(), Some(Refusal::PodShare));
        assert_eq!(node.used(), limit);
        let mut admitted = other.admit().unwrap();
        admitted.charge_upstream().unwrap();
        drop(held);
        assert_eq!(node.used(), 2);
        let again = greedy.admit().unwrap();
        drop((admitted, again));
        assert_eq!(node.used(), 0);
    }

    #[test]
    fn the_node_budget_holds_whatever_the_shares() {
        let node = admission(4096, &["--pod-share-percent", "100"]);
        let pods: Vec<Arc<Share>> = (0..4).map(|_| node.pod_share()).collect();
        let mut held = Vec::new();
        for pod in pods.iter().cycle() {
            match pod.admit() {
                Ok(admitted) => held.push(admitted),
                Err(refusal) => {
                    assert_eq!(refusal, Refusal::FdBudget);
                    break;
                }
            }
        }
        assert_eq!(held.len(), node.limits().fd_budget);
        // A refused charge leaves nothing behind.
        assert_eq!(pods[0].admit().err(), Some(Refusal::FdBudget));
        assert_eq!(node.used(), node.limits().fd_budget);
    }

    #[test]
    fn handshakes_are_capped_per_source_and_overall() {
        let node = admission(
            1 << 20,
            &[
                "--max-unauthenticated",
                "3",
                "--max-unauthenticated-per-source",
                "2",
            ],
        );
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = node.begin_handshake(a).unwrap();
        let _second = node.begin_handshake(a).unwrap();
        assert_eq!(
            node.begin_handshake(a).err(),
            Some(Refusal::UnauthenticatedPerSource)
        );
        let _third = node.begin_handshake(b).unwrap();
        assert_eq!(
            node.begin_handshake(b).err(),
            Some(Refusal::Unauthenticated)
        );
        drop(first);
        assert_eq!(node.unauthenticated(), 2);
        let _again = node.begin_handshake(a).unwrap();
        assert_eq!(node.unauthenticated(), 3);
    }
}
