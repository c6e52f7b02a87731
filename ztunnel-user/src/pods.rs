//! Enrolled pods: what enrolling one sets up, and tearing it down again.
//!
//! Enrollment order makes capture the last step, so no connection is ever steered to a
//! listener that is not there yet: routing for delivery, listeners, the sk_lookup target, the
//! pod's map entry, the pod's record, and only then the bpf_links. Disenrollment starts by
//! removing the links and ends with the record.
//!
//! A restarted daemon takes over the pods of its previous run from their records (`restore`):
//! their links stayed attached (refusing new connections while nobody listened), so it opens
//! the listeners and map entries again and then moves the links on to its own programs.

use crate::api::{EnrolledPod, PodSpec};
use crate::cgroup::{CgroupError, find_pod_cgroup};
use crate::datapath::{DatapathError, PodLinks, detach_pod};
use crate::iptables::{self, IptablesError};
use crate::netlink::{Family, RouteSocket};
use crate::netns::{Netns, NetnsError};
use crate::pod_state::{PodRecord, PodStateError, PodStates};
use crate::proxy::{self, ListenerError, PodListeners, PodProxy, ProxyContext};
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::task::JoinSet;
use ztunnel_common::Addr;
use ztunnel_common::maps::{POD_HAS_IP4, POD_HAS_IP6, PodInfo};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("pod {0} has no IP address (the previous CNI plugin assigned none)")]
    NoAddress(String),
    #[error("pod {0} has no uid (CNI_ARGS K8S_POD_UID)")]
    NoUid(String),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("opening cgroup {path}: {source}")]
    OpenCgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("setting up delivery routing in {netns}: {source}")]
    Routing {
        netns: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Listener(#[from] ListenerError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    State(#[from] PodStateError),
    #[error(transparent)]
    Iptables(#[from] IptablesError),
    #[error(
        "network namespace {path} is no longer the pod's (cookie {found}, recorded {recorded})"
    )]
    NetnsReplaced {
        path: PathBuf,
        recorded: u64,
        found: u64,
    },
}

/// How a pod's eBPF links are put in place.
#[derive(Clone, Copy)]
enum Links<'a> {
    /// New links on the pod's cgroup (this open directory) and netns.
    Attach(&'a File),
    /// The links a previous run pinned, moved on to this daemon's programs.
    Adopt,
}

struct Enrollment {
    record: PodRecord,
    links: PodLinks,
    pod: Arc<PodProxy>,
    /// The listeners' accept loops; dropping the set stops them and closes the listeners.
    serving: JoinSet<()>,
}

pub struct Pods {
    ctx: Arc<ProxyContext>,
    cgroup_root: PathBuf,
    states: PodStates,
    enrolled: BTreeMap<String, Enrollment>,
    next_index: u32,
}

impl Pods {
    pub fn new(ctx: Arc<ProxyContext>, cgroup_root: PathBuf, states: PodStates) -> Pods {
        Pods {
            ctx,
            cgroup_root,
            states,
            enrolled: BTreeMap::new(),
            next_index: 0,
        }
    }

    /// Takes over the pods the previous run enrolled, from their records: a pod whose netns
    /// and links are still there is served again, the leftovers of any other are removed, and
    /// so are links and pod entries no record claims. Runs once at start, before the API
    /// serves; fails only when the records cannot be listed at all.
    pub fn restore(&mut self) -> Result<(), PodStateError> {
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
        let found = netns.cookie(&self.ctx.home)?;
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
        detach_pod(&self.ctx.datapath.pod_links(&record.spec.uid));
        if let Err(err) = self.ctx.datapath.remove_pod(record.netns_cookie) {
            tracing::warn!(%err, "cannot remove pod map entry");
        }
        self.forget(&record.spec.uid);
    }

    /// Links and `ZT_PODS` entries of pods no record claims (a record refused as corrupt, or
    /// state from before records existed): nothing would serve those pods.
    fn release_unclaimed(&self) {
        let datapath = &self.ctx.datapath;
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

    fn forget(&self, uid: &str) {
        if let Err(err) = self.states.remove(uid) {
            tracing::warn!(%uid, %err, "cannot remove the pod record");
        }
    }

    /// Captures the pod. Enrolling the same sandbox again is a no-op; a new sandbox of the same
    /// pod replaces the old one.
    pub fn enroll(&mut self, spec: PodSpec) -> Result<EnrolledPod, EnrollError> {
        let label = format!("{}/{}", spec.namespace, spec.name);
        if spec.uid.is_empty() {
            return Err(EnrollError::NoUid(label));
        }
        if spec.ips.is_empty() {
            return Err(EnrollError::NoAddress(label));
        }
        if let Some(existing) = self.enrolled.get(&spec.uid) {
            if existing.record.spec.container_id == spec.container_id {
                return Ok(describe(existing));
            }
            tracing::info!(pod = %label, old = %existing.record.spec.container_id, "replacing the enrollment of an older sandbox");
            self.disenroll(&spec.uid.clone(), None);
        }

        let cgroup = find_pod_cgroup(&self.cgroup_root, &spec.uid)?;
        let cgroup_dir = File::open(&cgroup).map_err(|source| EnrollError::OpenCgroup {
            path: cgroup.clone(),
            source,
        })?;
        let netns = Netns::open(&spec.netns)?;
        let netns_cookie = netns.cookie(&self.ctx.home)?;
        let record = PodRecord {
            spec,
            cgroup,
            netns_cookie,
        };
        self.start(record, netns, Links::Attach(&cgroup_dir))
    }

    /// Serves the pod: routing, listeners, map entries, capture. Any failure undoes the steps
    /// taken.
    fn start(
        &mut self,
        record: PodRecord,
        netns: Netns,
        links: Links<'_>,
    ) -> Result<EnrolledPod, EnrollError> {
        let spec = &record.spec;
        let label = format!("{}/{}", spec.namespace, spec.name);
        let families = families(&spec.ips);
        self.set_delivery_routing(&netns, &families, true)?;
        let identity = self.ctx.identity_of(&spec.uid, &spec.namespace);
        let pod = Arc::new(PodProxy {
            name: spec.name.clone(),
            namespace: spec.namespace.as_str().into(),
            label: label.as_str().into(),
            netns,
            hbone_acceptor: self.ctx.tls.acceptor(&identity),
            identity: Arc::new(identity),
            released: tokio_util::sync::CancellationToken::new(),
        });
        let (pinned, serving) = match self.attach(&record, &pod, links) {
            Ok(done) => done,
            Err(err) => {
                self.release_kernel_state(&spec.ips, record.netns_cookie);
                if let Err(cleanup) = self.set_delivery_routing(&pod.netns, &families, false) {
                    tracing::warn!(pod = %label, %cleanup, "cannot remove delivery routing");
                }
                return Err(err);
            }
        };
        self.next_index += 1;
        self.set_local(&spec.ips, Some(&pod));
        let enrollment = Enrollment {
            record,
            links: pinned,
            pod,
            serving,
        };
        tracing::info!(pod = %label, ips = ?enrollment.record.spec.ips, identity = %enrollment.pod.identity,
            cgroup = %enrollment.record.cgroup.display(), adopted = matches!(links, Links::Adopt), "pod enrolled");
        let described = describe(&enrollment);
        self.enrolled
            .insert(enrollment.record.spec.uid.clone(), enrollment);
        Ok(described)
    }

    /// Listeners, map entries, record and links: everything after routing, undone by the
    /// caller on error (the record and the links by this function).
    fn attach(
        &self,
        record: &PodRecord,
        pod: &Arc<PodProxy>,
        links: Links<'_>,
    ) -> Result<(PodLinks, JoinSet<()>), EnrollError> {
        let spec = &record.spec;
        let listeners = PodListeners::open(&self.ctx, &pod.netns, &spec.ips)?;
        if self.ctx.capture == proxy::Capture::Iptables {
            // The rules stay in the netns across restarts; installing replaces ours.
            self.states.save(record)?;
            iptables::install(&pod.netns, &spec.ips, &self.ctx.exclusions)
                .inspect_err(|_| self.forget(&spec.uid))?;
            return Ok((
                self.ctx.datapath.pod_links(&spec.uid),
                proxy::serve(self.ctx.clone(), pod.clone(), listeners),
            ));
        }
        for (ip, listener) in &listeners.inbound {
            self.ctx.datapath.register_inbound_listener(*ip, listener)?;
        }
        self.ctx
            .datapath
            .insert_pod(record.netns_cookie, pod_info(&spec.ips, self.next_index))?;
        let links = match links {
            Links::Attach(cgroup_dir) => {
                // The record first: pinned links never outlive the record that names them.
                self.states.save(record)?;
                self.ctx
                    .datapath
                    .attach_pod(&spec.uid, cgroup_dir, &pod.netns)
                    .inspect_err(|_| self.forget(&spec.uid))?
            }
            // A failed take-over is released by `restore`, record and all.
            Links::Adopt => self.ctx.datapath.adopt_pod(&spec.uid)?,
        };
        Ok((
            links,
            proxy::serve(self.ctx.clone(), pod.clone(), listeners),
        ))
    }

    /// Releases the pod. `container_id` limits this to one sandbox (`None`: whichever).
    /// Returns whether anything was enrolled.
    pub fn disenroll(&mut self, uid: &str, container_id: Option<&str>) -> bool {
        let matches = self.enrolled.get(uid).is_some_and(|e| {
            container_id.is_none_or(|id| id.is_empty() || e.record.spec.container_id == id)
        });
        let Some(enrollment) = matches.then(|| self.enrolled.remove(uid)).flatten() else {
            return false;
        };
        let spec = &enrollment.record.spec;
        detach_pod(&enrollment.links);
        enrollment.pod.release();
        if self.ctx.capture == proxy::Capture::Iptables
            && let Err(err) = iptables::remove(&enrollment.pod.netns)
        {
            tracing::warn!(pod = %enrollment.pod.label, %err, "cannot remove the capture rules (netns already gone?)");
        }
        self.set_local(&spec.ips, None);
        self.release_kernel_state(&spec.ips, enrollment.record.netns_cookie);
        if let Err(err) =
            self.set_delivery_routing(&enrollment.pod.netns, &families(&spec.ips), false)
        {
            tracing::warn!(pod = %enrollment.pod.label, %err, "cannot remove delivery routing (netns already gone?)");
        }
        // The certificate goes with the last pod of its identity.
        let identity = &enrollment.pod.identity;
        if !self.enrolled.values().any(|e| &e.pod.identity == identity) {
            self.ctx.tls.store.forget(identity);
        }
        self.forget(&spec.uid);
        tracing::info!(pod = %enrollment.pod.label, "pod disenrolled");
        true
    }

    /// Closes every pod's listeners (drain): new connections are refused by the kernel from
    /// now on, as while the daemon is down; open ones go on. The pods stay enrolled.
    pub fn stop_serving(&mut self) {
        for enrollment in self.enrolled.values_mut() {
            enrollment.serving.abort_all();
        }
    }

    pub fn is_enrolled(&self, uid: &str, container_id: &str) -> bool {
        self.enrolled
            .get(uid)
            .is_some_and(|e| container_id.is_empty() || e.record.spec.container_id == container_id)
    }

    pub fn list(&self) -> Vec<EnrolledPod> {
        self.enrolled.values().map(describe).collect()
    }

    /// Adds the pod to (or removes its addresses from) the proxy's same-node table.
    fn set_local(&self, ips: &[IpAddr], pod: Option<&Arc<PodProxy>>) {
        let mut local = self
            .ctx
            .local_pods
            .write()
            .unwrap_or_else(|p| p.into_inner());
        for ip in ips {
            match pod {
                Some(pod) => local.insert(*ip, pod.clone()),
                None => local.remove(ip),
            };
        }
    }

    fn release_kernel_state(&self, ips: &[IpAddr], netns_cookie: u64) {
        let datapath = &self.ctx.datapath;
        if let Err(err) = datapath.remove_pod(netns_cookie) {
            tracing::warn!(%err, "cannot remove pod map entry");
        }
        for ip in ips {
            if let Err(err) = datapath.unregister_inbound_listener(*ip) {
                tracing::warn!(%ip, %err, "cannot unregister inbound listener");
            }
        }
    }

    fn set_delivery_routing(
        &self,
        netns: &Netns,
        families: &[Family],
        install: bool,
    ) -> Result<(), EnrollError> {
        let mark = ztunnel_common::ports::DELIVERY_MARK;
        let routing = || -> std::io::Result<()> {
            let mut socket = RouteSocket::open()?;
            for &family in families {
                if install {
                    socket.install_delivery_routing(family, mark)?;
                } else {
                    socket.remove_delivery_routing(family, mark)?;
                }
            }
            if install {
                // Accepted sockets take the SYN's mark, so the app's replies to a transparent
                // delivery socket are marked and routed back to the proxy; the kernel's own
                // answers (a RST from a closed port) reflect the mark too, so a refused
                // delivery fails at once instead of the RST leaving the pod.
                std::fs::write("/proc/sys/net/ipv4/tcp_fwmark_accept", "1")?;
                std::fs::write("/proc/sys/net/ipv4/fwmark_reflect", "1")?;
            }
            Ok(())
        };
        netns
            .run_in(&self.ctx.home, routing)?
            .map_err(|source| EnrollError::Routing {
                netns: netns.path().display().to_string(),
                source,
            })
    }
}

fn families(ips: &[IpAddr]) -> Vec<Family> {
    let mut families = Vec::new();
    if ips.iter().any(IpAddr::is_ipv4) {
        families.push(Family::V4);
    }
    if ips.iter().any(IpAddr::is_ipv6) {
        families.push(Family::V6);
    }
    families
}

/// The kernel's view of a pod: its first address of each family.
fn pod_info(ips: &[IpAddr], pod_index: u32) -> PodInfo {
    let mut info = PodInfo {
        pod_index,
        ..Default::default()
    };
    if let Some(ip4) = ips.iter().find(|ip| ip.is_ipv4()) {
        info.ip4 = Addr::from(*ip4);
        info.flags |= POD_HAS_IP4;
    }
    if let Some(ip6) = ips.iter().find(|ip| ip.is_ipv6()) {
        info.ip6 = Addr::from(*ip6);
        info.flags |= POD_HAS_IP6;
    }
    info
}

fn describe(e: &Enrollment) -> EnrolledPod {
    let spec = &e.record.spec;
    EnrolledPod {
        name: spec.name.clone(),
        namespace: spec.namespace.clone(),
        uid: spec.uid.clone(),
        container_id: spec.container_id.clone(),
        netns: spec.netns.clone(),
        cgroup: e.record.cgroup.clone(),
        ips: spec.ips.clone(),
        identity: e.pod.identity.to_string(),
        links: e.links.paths.iter().map(|p| p.to_path_buf()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_info_takes_one_address_per_family() {
        let ips: Vec<IpAddr> = vec![
            "10.244.1.2".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            "10.244.1.9".parse().unwrap(),
        ];
        let info = pod_info(&ips, 7);
        assert!(info.has_ip4() && info.has_ip6());
        assert_eq!(info.ip4, Addr::from(ips[0]));
        assert_eq!(info.ip6, Addr::from(ips[1]));
        assert_eq!(info.pod_index, 7);
        assert_eq!(families(&ips), vec![Family::V4, Family::V6]);
    }
}
