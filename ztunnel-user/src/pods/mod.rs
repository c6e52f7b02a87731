//! Enrolled pods: what enrolling one sets up, and tearing it down again; their records in the
//! state directory (`records`), finding their cgroups (`cgroup`), taking over the pods of a
//! previous run (`restore`), and the pods that stay captured while that fails (`waiting`).
//!
//! Enrollment order makes capture the last step, so no connection is ever steered to a
//! listener that is not there yet: routing for delivery, listeners, the sk_lookup target, the
//! pod's map entry, the pod's record, and only then the bpf_links. Disenrollment starts by
//! removing the links and ends with the record.
//!
//! A pod once captured is never released by a failure: it fails closed, captured with its
//! connections refused, until it is served again or the pod is gone.

mod cgroup;
pub(crate) mod records;
mod restore;
mod waiting;

pub(crate) use cgroup::pod_uid_of_cgroup_name;

use crate::api::{EnrolledPod, PodSpec};
use crate::capture::{CaptureError, CapturedPod, DatapathError, PodLinks};
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
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::task::JoinSet;
use waiting::{Waiting, WaitingPods};

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

impl EnrollError {
    /// The pod itself is gone (its netns deleted or replaced, its cgroup removed): nothing of
    /// it is left to capture.
    fn pod_is_gone(&self) -> bool {
        let not_found = |err: &std::io::Error| err.kind() == std::io::ErrorKind::NotFound;
        match self {
            EnrollError::NetnsReplaced { .. } => true,
            EnrollError::Netns(NetnsError::Open { source, .. })
            | EnrollError::OpenCgroup { source, .. } => not_found(source),
            EnrollError::Capture(CaptureError::Datapath(DatapathError::LinkTargetGone {
                ..
            })) => true,
            _ => false,
        }
    }
}

/// Where a captured pod is.
enum Found {
    Serving,
    Waiting,
}

/// What a failed start leaves of the pod.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OnFailure {
    /// Nothing: the pod was not captured before.
    Undo,
    /// Its links, `ZT_PODS` entry and record: it was captured before, and stays captured.
    StayCaptured,
}

/// How many pods are served and how many wait, for `/metrics`.
#[derive(Default)]
pub(crate) struct PodCounts {
    serving: AtomicUsize,
    waiting: AtomicUsize,
}

impl PodCounts {
    pub(crate) fn serving(&self) -> usize {
        self.serving.load(Ordering::Relaxed)
    }

    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
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
    waiting: WaitingPods,
    counts: Arc<PodCounts>,
    next_index: u32,
}

impl Pods {
    /// Pods whose cgroups the kubelet creates under `cgroup_root`.
    pub(crate) fn new(
        ctx: Arc<ProxyContext>,
        states: PodStates,
        cgroup_root: PathBuf,
        counts: Arc<PodCounts>,
    ) -> Pods {
        Pods {
            cgroup_root,
            ctx,
            states,
            enrolled: BTreeMap::new(),
            waiting: WaitingPods::default(),
            counts,
            next_index: 0,
        }
    }

    /// Publishes the pod counts; called after every change.
    fn recount(&self) {
        let counts = &self.counts;
        counts.serving.store(self.enrolled.len(), Ordering::Relaxed);
        counts.waiting.store(self.waiting.len(), Ordering::Relaxed);
    }

    fn forget(&self, uid: &str) {
        if let Err(err) = self.states.remove(uid) {
            tracing::warn!(%uid, %err, "cannot remove the pod record");
        }
    }

    /// Captures the pod. Enrolling the same sandbox again is a no-op (or, for a sandbox that
    /// waits, an immediate retry); a new sandbox of the same pod replaces the old one.
    pub(crate) fn enroll(&mut self, spec: PodSpec) -> Result<EnrolledPod, EnrollError> {
        let enrolled = self.try_enroll(spec);
        self.recount();
        enrolled
    }

    fn try_enroll(&mut self, spec: PodSpec) -> Result<EnrolledPod, EnrollError> {
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
            self.release(&spec.uid.clone(), None);
        }
        if let Some(Waiting {
            record: Some(record),
            ..
        }) = self.waiting.get(&spec.uid)
            && record.spec.container_id != spec.container_id
        {
            tracing::info!(pod = %label, old = %record.spec.container_id, "replacing a waiting older sandbox");
            self.release(&spec.uid.clone(), None);
        }

        let cgroup = find_pod_cgroup(&self.cgroup_root, &spec.uid)?;
        let netns = Netns::open(&spec.netns)?;
        let netns_cookie = netns.cookie()?;
        let record = PodRecord {
            spec,
            cgroup,
            netns_cookie,
        };
        // Links pinned already (a waiting pod, or links whose record was lost) keep the pod
        // captured whatever happens here.
        let on_failure = if self.waiting.get(&record.spec.uid).is_some()
            || !self.pinned_links(&record.spec.uid).paths.is_empty()
        {
            OnFailure::StayCaptured
        } else {
            OnFailure::Undo
        };
        match on_failure {
            OnFailure::Undo => self.start(record, netns, on_failure),
            OnFailure::StayCaptured => {
                let started = self.start(record.clone(), netns, on_failure);
                self.settle(record, started).1
            }
        }
    }

    fn pinned_links(&self, uid: &str) -> PodLinks {
        self.ctx.capture.datapath().pod_links(uid)
    }

    /// Serves the pod: routing, listeners, map entries, capture. A failure undoes the steps
    /// taken, but for a pod that stays captured leaves its map entry and record.
    fn start(
        &mut self,
        record: PodRecord,
        netns: Netns,
        on_failure: OnFailure,
    ) -> Result<EnrolledPod, EnrollError> {
        let cgroup = File::open(&record.cgroup).map_err(|source| EnrollError::OpenCgroup {
            path: record.cgroup.clone(),
            source,
        })?;
        let spec = &record.spec;
        routing::install(&netns, &spec.ips)?;
        let config = self.ctx.mesh.current();
        let identity = self
            .ctx
            .identity_of(&config, &spec.uid, &spec.namespace, &spec.name);
        // Inbound handshakes only read the store: fetch the pod's certificate now.
        self.ctx.tls.store.prefetch(&identity);
        let share = self.ctx.admission.pod_share();
        let pod = Arc::new(PodProxy::new(spec, netns, share, &self.ctx.tls, identity));
        let index = self.next_index;
        let (pinned, serving) = match self.capture(&record, &pod, index, &cgroup) {
            Ok(done) => done,
            Err(err) => {
                // The inbound listeners, if registered, left the sockhash as they closed.
                if on_failure == OnFailure::Undo {
                    self.ctx
                        .capture
                        .clear(&captured(&record, &pod.netns, index));
                    self.forget(&spec.uid);
                }
                if let Err(cleanup) = routing::remove(&pod.netns, &spec.ips) {
                    tracing::warn!(pod = %pod.label, %cleanup, "cannot remove delivery routing");
                }
                self.ctx.release_identity(&pod.identity());
                return Err(err);
            }
        };
        self.next_index += 1;
        self.ctx.local_pods.set(&spec.ips, Some(&pod));
        // A change applied since `config` did not see the pod among the local ones.
        if !Arc::ptr_eq(&config, &self.ctx.mesh.current()) {
            self.ctx.rejoin(&pod);
        }
        let enrollment = Enrollment {
            record,
            links: pinned,
            pod,
            serving,
            index,
        };
        tracing::info!(pod = %enrollment.pod.label, ips = ?enrollment.record.spec.ips, identity = %enrollment.pod.identity(),
            cgroup = %enrollment.record.cgroup.display(), "pod enrolled");
        let described = describe(&enrollment);
        self.enrolled
            .insert(enrollment.record.spec.uid.clone(), enrollment);
        Ok(described)
    }

    /// Listeners, map entries, record and capture: everything after routing, undone by the
    /// caller on error.
    fn capture(
        &self,
        record: &PodRecord,
        pod: &Arc<PodProxy>,
        index: u32,
        cgroup: &File,
    ) -> Result<(PodLinks, JoinSet<()>), EnrollError> {
        let listeners = PodListeners::open(&self.ctx, &pod.netns, &record.spec.ips)?;
        let captured = captured(record, &pod.netns, index);
        self.ctx.capture.prepare(&captured, &listeners.inbound)?;
        // The record first: pinned links never outlive the record that names them.
        self.states.save(record)?;
        let links = self.ctx.capture.start(&captured, cgroup)?;
        Ok((links, listeners.serve(self.ctx.clone(), pod.clone())))
    }

    /// Releases the pod, served or waiting. `container_id` limits this to one sandbox
    /// (`None`: whichever). Returns whether anything was enrolled.
    pub(crate) fn disenroll(&mut self, uid: &str, container_id: Option<&str>) -> bool {
        let released = self.release(uid, container_id);
        self.recount();
        released
    }

    fn release(&mut self, uid: &str, container_id: Option<&str>) -> bool {
        match self.find(uid, container_id) {
            Some(Found::Serving) => self.release_served(uid),
            Some(Found::Waiting) => self.release_waiting(uid),
            None => return false,
        }
        true
    }

    /// Where the pod's sandbox `container_id` (`None` or empty: any) is, if captured. A pod
    /// waiting without a record could be any sandbox.
    fn find(&self, uid: &str, container_id: Option<&str>) -> Option<Found> {
        let sandbox =
            |id: &str| container_id.is_none_or(|wanted| wanted.is_empty() || wanted == id);
        if let Some(enrollment) = self.enrolled.get(uid) {
            return sandbox(&enrollment.record.spec.container_id).then_some(Found::Serving);
        }
        let waiting = self.waiting.get(uid)?;
        let record = waiting.record.as_ref();
        record
            .is_none_or(|record| sandbox(&record.spec.container_id))
            .then_some(Found::Waiting)
    }

    fn release_served(&mut self, uid: &str) {
        let Some(enrollment) = self.enrolled.remove(uid) else {
            return;
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
        self.ctx.release_identity(&enrollment.pod.identity());
        self.forget(&spec.uid);
        self.ctx.connections.forget_pod(&enrollment.pod.label);
        tracing::info!(pod = %enrollment.pod.label, "pod disenrolled");
    }

    /// Closes every pod's listeners (drain): new connections are refused by the kernel from
    /// now on, as while the daemon is down; open ones go on. The pods stay enrolled.
    pub(crate) fn stop_serving(&mut self) {
        for enrollment in self.enrolled.values_mut() {
            enrollment.serving.abort_all();
        }
    }

    /// Whether the sandbox is captured (served, or waiting to be).
    pub(crate) fn is_enrolled(&self, uid: &str, container_id: &str) -> bool {
        self.find(uid, Some(container_id)).is_some()
    }

    /// The served pods, then the waiting ones.
    pub(crate) fn list(&self) -> Vec<EnrolledPod> {
        let serving = self.enrolled.values().map(describe);
        let waiting = self
            .waiting
            .iter()
            .map(|(uid, waiting)| waiting.describe(uid, self.pinned_links(uid)));
        serving.chain(waiting).collect()
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
        identity: e.pod.identity().to_string(),
        links: e.links.paths.clone(),
        waiting: None,
    }
}
