//! Enrolled pods: what enrolling one sets up, and tearing it down again.
//!
//! Enrollment order makes capture the last step, so no connection is ever steered to a
//! listener that is not there yet: routing for delivery, listeners, the sk_lookup target, the
//! pod's map entry, and only then the bpf_links. Disenrollment starts by removing the links.

use crate::api::{EnrolledPod, PodSpec};
use crate::cgroup::{CgroupError, find_pod_cgroup};
use crate::datapath::{DatapathError, PodLinks, detach_pod};
use crate::netlink::{Family, RouteSocket};
use crate::netns::{Netns, NetnsError};
use crate::proxy::{self, ListenerError, PodListeners, PodProxy, ProxyContext};
use std::collections::BTreeMap;
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
}

struct Enrollment {
    spec: PodSpec,
    cgroup: PathBuf,
    netns_cookie: u64,
    links: PodLinks,
    pod: Arc<PodProxy>,
    /// The listeners' accept loops; dropping the set stops them and closes the listeners.
    serving: JoinSet<()>,
}

pub struct Pods {
    ctx: Arc<ProxyContext>,
    cgroup_root: PathBuf,
    enrolled: BTreeMap<String, Enrollment>,
    next_index: u32,
}

impl Pods {
    pub fn new(ctx: Arc<ProxyContext>, cgroup_root: PathBuf) -> Pods {
        Pods {
            ctx,
            cgroup_root,
            enrolled: BTreeMap::new(),
            next_index: 0,
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
            if existing.spec.container_id == spec.container_id {
                return Ok(describe(existing));
            }
            tracing::info!(pod = %label, old = %existing.spec.container_id, "replacing the enrollment of an older sandbox");
            self.disenroll(&spec.uid.clone(), None);
        }

        let cgroup = find_pod_cgroup(&self.cgroup_root, &spec.uid)?;
        let cgroup_dir = File::open(&cgroup).map_err(|source| EnrollError::OpenCgroup {
            path: cgroup.clone(),
            source,
        })?;
        let netns = Netns::open(&spec.netns)?;
        let netns_cookie = netns.cookie(&self.ctx.home)?;
        let families = families(&spec.ips);

        self.set_delivery_routing(&netns, &families, true)?;
        let identity = self.ctx.identity_of(&spec.uid, &spec.namespace);
        let pod = Arc::new(PodProxy {
            name: spec.name.clone(),
            namespace: spec.namespace.clone(),
            label: label.clone(),
            netns,
            hbone_acceptor: self.ctx.tls.acceptor(&identity),
            identity,
        });
        let attached = self.attach(&spec, &pod, netns_cookie, &cgroup_dir);
        let (links, serving) = match attached {
            Ok(done) => done,
            Err(err) => {
                self.release_kernel_state(&spec.ips, netns_cookie);
                if let Err(cleanup) = self.set_delivery_routing(&pod.netns, &families, false) {
                    tracing::warn!(pod = %label, %cleanup, "cannot remove delivery routing");
                }
                return Err(err);
            }
        };
        self.next_index += 1;
        self.set_local(&spec.ips, Some(&pod));
        let enrollment = Enrollment {
            spec,
            cgroup,
            netns_cookie,
            links,
            pod,
            serving,
        };
        tracing::info!(pod = %label, ips = ?enrollment.spec.ips, identity = %enrollment.pod.identity, cgroup = %enrollment.cgroup.display(), "pod enrolled");
        let described = describe(&enrollment);
        self.enrolled
            .insert(enrollment.spec.uid.clone(), enrollment);
        Ok(described)
    }

    /// Listeners, map entries, links: everything after routing, undone by the caller on error.
    fn attach(
        &self,
        spec: &PodSpec,
        pod: &Arc<PodProxy>,
        netns_cookie: u64,
        cgroup_dir: &File,
    ) -> Result<(PodLinks, JoinSet<()>), EnrollError> {
        let listeners = PodListeners::open(&self.ctx, &pod.netns, &spec.ips)?;
        for (ip, listener) in &listeners.inbound {
            self.ctx.datapath.register_inbound_listener(*ip, listener)?;
        }
        self.ctx
            .datapath
            .insert_pod(netns_cookie, pod_info(&spec.ips, self.next_index))?;
        let links = self
            .ctx
            .datapath
            .attach_pod(&spec.uid, cgroup_dir, &pod.netns)?;
        Ok((
            links,
            proxy::serve(self.ctx.clone(), pod.clone(), listeners),
        ))
    }

    /// Releases the pod. `container_id` limits this to one sandbox (`None`: whichever).
    /// Returns whether anything was enrolled.
    pub fn disenroll(&mut self, uid: &str, container_id: Option<&str>) -> bool {
        let matches = self.enrolled.get(uid).is_some_and(|e| {
            container_id.is_none_or(|id| id.is_empty() || e.spec.container_id == id)
        });
        let Some(enrollment) = matches.then(|| self.enrolled.remove(uid)).flatten() else {
            return false;
        };
        detach_pod(&enrollment.links);
        self.set_local(&enrollment.spec.ips, None);
        self.release_kernel_state(&enrollment.spec.ips, enrollment.netns_cookie);
        if let Err(err) = self.set_delivery_routing(
            &enrollment.pod.netns,
            &families(&enrollment.spec.ips),
            false,
        ) {
            tracing::warn!(pod = %enrollment.pod.label, %err, "cannot remove delivery routing (netns already gone?)");
        }
        // The certificate goes with the last pod of its identity.
        let identity = &enrollment.pod.identity;
        if !self.enrolled.values().any(|e| &e.pod.identity == identity) {
            self.ctx.tls.store.forget(identity);
        }
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
            .is_some_and(|e| container_id.is_empty() || e.spec.container_id == container_id)
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
    EnrolledPod {
        name: e.spec.name.clone(),
        namespace: e.spec.namespace.clone(),
        uid: e.spec.uid.clone(),
        container_id: e.spec.container_id.clone(),
        netns: e.spec.netns.clone(),
        cgroup: e.cgroup.clone(),
        ips: e.spec.ips.clone(),
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
