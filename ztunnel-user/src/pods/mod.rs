//! Enrolled pods: what enrolling one sets up, and tearing it down again; their records in the
//! state directory (`records`), finding their cgroups (`cgroup`), and taking over the pods of
//! a previous run (`restore`).
//!
//! Enrollment order makes capture the last step, so no connection is ever steered to a
//! listener that is not there yet: routing for delivery, listeners, the sk_lookup target, the
//! pod's map entry, the pod's record, and only then the bpf_links. Disenrollment starts by
//! removing the links and ends with the record.

mod cgroup;
pub(crate) mod records;
mod restore;

use crate::api::{EnrolledPod, PodSpec};
use crate::capture::{CaptureError, CapturedPod, Links, PodLinks};
use crate::delivery::routing::{self, RoutingError};
use crate::host::netns::{Netns, NetnsError};
use crate::proxy::listeners::{ListenerError, PodListeners};
use crate::proxy::{PodProxy, ProxyContext};
use cgroup::{CgroupError, find_pod_cgroup};
use records::{PodRecord, PodStateError, PodStates};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::task::JoinSet;

#[derive(Debug, thiserror::Error)]
pub(crate) enum EnrollError {
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
    #[error(transparent)]
    Routing(#[from] RoutingError),
    #[error(transparent)]
    Listener(#[from] ListenerError),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    State(#[from] PodStateError),
    #[error(
        "network namespace {path} is no longer the pod's (cookie {found}, recorded {recorded})"
    )]
    NetnsReplaced {
        path: PathBuf,
        recorded: u64,
        found: u64,
    },
}

struct Enrollment {
    record: PodRecord,
    links: PodLinks,
    pod: Arc<PodProxy>,
    /// The listeners' accept loops; dropping the set stops them and closes the listeners.
    serving: JoinSet<()>,
    /// The pod's index in `ZT_PODS`.
    index: u32,
}

impl Enrollment {
    fn captured(&self) -> CapturedPod<'_> {
        captured(&self.record, &self.pod.netns, self.index)
    }
}

fn captured<'a>(record: &'a PodRecord, netns: &'a Netns, index: u32) -> CapturedPod<'a> {
    CapturedPod {
        uid: &record.spec.uid,
        ips: &record.spec.ips,
        netns,
        netns_cookie: record.netns_cookie,
        index,
    }
}

pub(crate) struct Pods {
    ctx: Arc<ProxyContext>,
    cgroup_root: PathBuf,
    states: PodStates,
    enrolled: BTreeMap<String, Enrollment>,
    next_index: u32,
}

impl Pods {
    /// Pods whose cgroups the kubelet creates under `cgroup_root`.
    pub(crate) fn new(ctx: Arc<ProxyContext>, states: PodStates, cgroup_root: PathBuf) -> Pods {
        Pods {
            cgroup_root,
            ctx,
            states,
            enrolled: BTreeMap::new(),
            next_index: 0,
        }
    }

    fn forget(&self, uid: &str) {
        if let Err(err) = self.states.remove(uid) {
            tracing::warn!(%uid, %err, "cannot remove the pod record");
        }
    }

    /// Captures the pod. Enrolling the same sandbox again is a no-op; a new sandbox of the same
    /// pod replaces the old one.
    pub(crate) fn enroll(&mut self, spec: PodSpec) -> Result<EnrolledPod, EnrollError> {
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
        let netns_cookie = netns.cookie()?;
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
        routing::install(&netns, &spec.ips)?;
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
        let index = self.next_index;
        let (pinned, serving) = match self.capture(&record, &pod, index, links) {
            Ok(done) => done,
            Err(err) => {
                self.ctx
                    .capture
                    .clear(&captured(&record, &pod.netns, index));
                if let Err(cleanup) = routing::remove(&pod.netns, &spec.ips) {
                    tracing::warn!(pod = %label, %cleanup, "cannot remove delivery routing");
                }
                return Err(err);
            }
        };
        self.next_index += 1;
        self.ctx.local_pods.set(&spec.ips, Some(&pod));
        let enrollment = Enrollment {
            record,
            links: pinned,
            pod,
            serving,
            index,
        };
        tracing::info!(pod = %label, ips = ?enrollment.record.spec.ips, identity = %enrollment.pod.identity,
            cgroup = %enrollment.record.cgroup.display(), adopted = matches!(links, Links::Adopt), "pod enrolled");
        let described = describe(&enrollment);
        self.enrolled
            .insert(enrollment.record.spec.uid.clone(), enrollment);
        Ok(described)
    }

    /// Listeners, map entries, record and capture: everything after routing, undone by the
    /// caller on error (the record by this function).
    fn capture(
        &self,
        record: &PodRecord,
        pod: &Arc<PodProxy>,
        index: u32,
        links: Links<'_>,
    ) -> Result<(PodLinks, JoinSet<()>), EnrollError> {
        let listeners = PodListeners::open(&self.ctx, &pod.netns, &record.spec.ips)?;
        let captured = captured(record, &pod.netns, index);
        self.ctx.capture.prepare(&captured, &listeners.inbound)?;
        let links = match links {
            Links::Attach(_) => {
                // The record first: pinned links never outlive the record that names them.
                self.states.save(record)?;
                self.ctx
                    .capture
                    .start(&captured, links)
                    .inspect_err(|_| self.forget(&record.spec.uid))?
            }
            // A failed take-over is released by `restore`, record and all.
            Links::Adopt => self.ctx.capture.start(&captured, links)?,
        };
        Ok((links, listeners.serve(self.ctx.clone(), pod.clone())))
    }

    /// Releases the pod. `container_id` limits this to one sandbox (`None`: whichever).
    /// Returns whether anything was enrolled.
    pub(crate) fn disenroll(&mut self, uid: &str, container_id: Option<&str>) -> bool {
        let matches = self.enrolled.get(uid).is_some_and(|e| {
            container_id.is_none_or(|id| id.is_empty() || e.record.spec.container_id == id)
        });
        let Some(enrollment) = matches.then(|| self.enrolled.remove(uid)).flatten() else {
            return false;
        };
        let spec = &enrollment.record.spec;
        let captured = enrollment.captured();
        self.ctx.capture.stop(&captured, &enrollment.links);
        enrollment.pod.release();
        self.ctx.local_pods.set(&spec.ips, None);
        self.ctx.capture.clear(&captured);
        if let Err(err) = routing::remove(&enrollment.pod.netns, &spec.ips) {
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
    pub(crate) fn stop_serving(&mut self) {
        for enrollment in self.enrolled.values_mut() {
            enrollment.serving.abort_all();
        }
    }

    pub(crate) fn is_enrolled(&self, uid: &str, container_id: &str) -> bool {
        self.enrolled
            .get(uid)
            .is_some_and(|e| container_id.is_empty() || e.record.spec.container_id == container_id)
    }

    pub(crate) fn list(&self) -> Vec<EnrolledPod> {
        self.enrolled.values().map(describe).collect()
    }
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
        links: e.links.paths.clone(),
    }
}
