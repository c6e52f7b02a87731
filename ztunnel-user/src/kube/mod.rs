//! Enrollment the Istio way (`--enrollment kubernetes`): which pods are captured is read from
//! the Kubernetes API. A pod is in the mesh when its namespace, or the pod itself, is labelled
//! `istio.io/dataplane-mode=ambient` (`ambient`). The daemon watches the namespaces and this
//! node's pods: labelling a namespace enrolls its running pods, found from the host
//! (`sandbox`), and removing the label releases them, neither restarting any pod. A CNI ADD
//! asks `Kubernetes::admits` first, so a new pod of a labelled namespace is captured before
//! its containers start and others are left alone. Each captured pod is annotated
//! `ambient.istio.io/redirection: enabled`, by which istiod serves it over HBONE, and the
//! annotation is removed on release.

mod ambient;
mod sandbox;

pub(crate) use ambient::Skip;

use crate::api::PodSpec;
use crate::pods::Pods;
use ambient::{REDIRECTION_ANNOTATION, REDIRECTION_ENABLED};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Config};
use sandbox::Sandboxes;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// Where the processes of the host are: the DaemonSet shares the host's PID namespace.
const PROC_ROOT: &str = "/proc";
/// Where container runtimes mount the network namespaces of their sandboxes.
const NETNS_DIR: &str = "/var/run/netns";
/// How often every pod of the node is looked at again, for those whose enrollment failed
/// (or waited for the daemon to be ready).
const RESYNC: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub(crate) enum KubeError {
    #[error("reading the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no in-cluster Kubernetes config (run in a pod with a service account, or give --kubeconfig): {0}"
    )]
    InCluster(kube::config::InClusterError),
    #[error("the Kubernetes client: {0}")]
    Client(kube::Error),
    #[error("asking the Kubernetes API for {what}: {source}")]
    Api { what: String, source: kube::Error },
}

/// The Kubernetes API as enrollment reads it.
#[derive(Clone)]
pub(crate) struct Kubernetes {
    client: Client,
}

impl Kubernetes {
    /// A client of the API server `kubeconfig` names, or of the cluster the daemon's pod runs
    /// in (its service account's token and CA).
    pub(crate) async fn connect(kubeconfig: Option<&Path>) -> Result<Kubernetes, KubeError> {
        let config = match kubeconfig {
            Some(path) => {
                let file = Kubeconfig::read_from(path).map_err(|source| KubeError::Kubeconfig {
                    path: path.to_owned(),
                    source,
                })?;
                Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                    .await
                    .map_err(|source| KubeError::Kubeconfig {
                        path: path.to_owned(),
                        source,
                    })?
            }
            None => Config::incluster().map_err(KubeError::InCluster)?,
        };
        let client = Client::try_from(config).map_err(KubeError::Client)?;
        Ok(Kubernetes { client })
    }

    /// Whether a pod a CNI ADD is making is in the mesh, by its own and its namespace's labels
    /// as the API server has them now (the sandbox is not running yet, so nothing else of it
    /// is known).
    pub(crate) async fn admits(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Result<(), Skip>, KubeError> {
        let pod = Api::<Pod>::namespaced(self.client.clone(), namespace)
            .get(name)
            .await
            .map_err(|source| KubeError::Api {
                what: format!("pod {namespace}/{name}"),
                source,
            })?;
        let labels = Api::<Namespace>::all(self.client.clone())
            .get_opt(namespace)
            .await
            .map_err(|source| KubeError::Api {
                what: format!("namespace {namespace}"),
                source,
            })?
            .and_then(|namespace| namespace.metadata.labels);
        Ok(ambient::enrolled_by_labels(&pod, labels.as_ref()))
    }

    /// Sets or removes the annotation by which istiod knows the pod is captured.
    async fn mark(&self, pod: &Pod, redirected: bool) -> Result<(), KubeError> {
        let (namespace, name) = (
            pod.metadata.namespace.as_deref().unwrap_or_default(),
            pod.metadata.name.as_deref().unwrap_or_default(),
        );
        let value = redirected.then_some(REDIRECTION_ENABLED);
        let patch =
            serde_json::json!({"metadata": {"annotations": {REDIRECTION_ANNOTATION: value}}});
        Api::<Pod>::namespaced(self.client.clone(), namespace)
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map_err(|source| KubeError::Api {
                what: format!("annotating pod {}", label_of(pod)),
                source,
            })?;
        Ok(())
    }
}

/// What the daemon around enrollment tells it.
pub(crate) struct Hooks {
    /// Whether pods may be enrolled now (the mesh config is in force).
    pub(crate) ready: Box<dyn Fn() -> bool + Send + Sync>,
    /// Called once the namespaces and the node's pods were listed whole.
    pub(crate) listed: Box<dyn FnOnce() + Send + Sync>,
}

/// One change the watches saw (boxed: a pod is kilobytes).
enum Change {
    Namespace(Box<Result<Event<Namespace>, watcher::Error>>),
    Pod(Box<Result<Event<Pod>, watcher::Error>>),
}

/// A resource's objects as its watch has them, with a relist in progress on the side.
struct Listing<K> {
    objects: HashMap<String, K>,
    relisting: Option<HashMap<String, K>>,
    listed: bool,
}

impl<K> Default for Listing<K> {
    fn default() -> Self {
        Listing {
            objects: HashMap::new(),
            relisting: None,
            listed: false,
        }
    }
}

impl<K> Listing<K> {
    /// Takes one event in; the keys of the objects it may have changed (all of them after a
    /// relist).
    fn apply(&mut self, event: Event<K>, key: impl Fn(&K) -> String) -> Vec<String> {
        match event {
            Event::Apply(object) => {
                let key = key(&object);
                self.objects.insert(key.clone(), object);
                vec![key]
            }
            Event::Delete(object) => {
                let key = key(&object);
                self.objects.remove(&key);
                vec![key]
            }
            Event::Init => {
                self.relisting = Some(HashMap::new());
                Vec::new()
            }
            Event::InitApply(object) => {
                let relisting = self.relisting.get_or_insert_default();
                relisting.insert(key(&object), object);
                Vec::new()
            }
            Event::InitDone => {
                let listed = self.relisting.take().unwrap_or_default();
                let mut keys: HashSet<String> = self.objects.keys().cloned().collect();
                keys.extend(listed.keys().cloned());
                self.objects = listed;
                self.listed = true;
                keys.into_iter().collect()
            }
        }
    }
}

/// Keeps this node's enrollments what the API's labels say.
pub(crate) struct Reconciler {
    kube: Kubernetes,
    node: String,
    pods: Arc<Mutex<Pods>>,
    ready: Box<dyn Fn() -> bool + Send + Sync>,
    /// Taken when both watches have listed.
    listed: Option<Box<dyn FnOnce() + Send + Sync>>,
    namespaces: Listing<Namespace>,
    /// This node's pods by uid.
    node_pods: Listing<Pod>,
}

impl Reconciler {
    pub(crate) fn new(
        kube: Kubernetes,
        node: String,
        pods: Arc<Mutex<Pods>>,
        hooks: Hooks,
    ) -> Reconciler {
        let Hooks { ready, listed } = hooks;
        Reconciler {
            kube,
            node,
            pods,
            ready,
            listed: Some(listed),
            namespaces: Listing::default(),
            node_pods: Listing::default(),
        }
    }

    /// Watches namespaces and this node's pods for as long as the daemon runs; the watches
    /// reconnect on their own (with backoff) when the API server goes away.
    pub(crate) async fn run(mut self) {
        let client = self.kube.client.clone();
        let namespaces = watcher::watcher(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .map(|change| Change::Namespace(Box::new(change)));
        let on_node = watcher::Config::default().fields(&format!("spec.nodeName={}", self.node));
        let pods = watcher::watcher(Api::<Pod>::all(client), on_node)
            .default_backoff()
            .map(|change| Change::Pod(Box::new(change)));
        let mut changes = std::pin::pin!(futures_util::stream::select(namespaces, pods));
        let mut resync = tokio::time::interval(RESYNC);
        loop {
            tokio::select! {
                change = changes.next() => match change {
                    Some(change) => self.take(change).await,
                    None => return,
                },
                _ = resync.tick() => self.reconcile_all().await,
            }
        }
    }

    async fn take(&mut self, change: Change) {
        let uids = match change {
            Change::Namespace(change) => match *change {
                Ok(event) => self.namespace_changed(event),
                Err(err) => return watch_failed(&err),
            },
            Change::Pod(change) => match *change {
                Ok(event) => self
                    .node_pods
                    .apply(event, |pod| pod.metadata.uid.clone().unwrap_or_default()),
                Err(err) => return watch_failed(&err),
            },
        };
        if self.namespaces.listed && self.node_pods.listed {
            if let Some(listed) = self.listed.take() {
                tracing::info!(
                    namespaces = self.namespaces.objects.len(),
                    pods = self.node_pods.objects.len(),
                    node = %self.node,
                    "kubernetes: namespaces and this node's pods listed"
                );
                listed();
                return self.reconcile_all().await;
            }
            self.reconcile(&uids).await;
        }
    }

    /// Takes a namespace's event in; the uids of this node's pods in the namespaces it changed.
    fn namespace_changed(&mut self, event: Event<Namespace>) -> Vec<String> {
        let changed = self
            .namespaces
            .apply(event, |ns| ns.metadata.name.clone().unwrap_or_default());
        let changed: HashSet<&str> = changed.iter().map(String::as_str).collect();
        let in_changed =
            |pod: &Pod| changed.contains(pod.metadata.namespace.as_deref().unwrap_or_default());
        let pods = self.node_pods.objects.iter();
        pods.filter(|(_, pod)| in_changed(pod))
            .map(|(uid, _)| uid.clone())
            .collect()
    }

    /// Reconciles this node's pods, and the enrolled pods the API no longer has (deleted
    /// while its watch was down).
    async fn reconcile_all(&self) {
        let enrolled = self.pods.lock().await.list();
        let mut uids: HashSet<String> = enrolled.into_iter().map(|pod| pod.uid).collect();
        uids.extend(self.node_pods.objects.keys().cloned());
        self.reconcile(&uids.into_iter().collect::<Vec<_>>()).await;
    }

    /// Enrolls, releases or marks each pod of `uids` as its labels say; a pod the API no
    /// longer has on this node is released.
    async fn reconcile(&self, uids: &[String]) {
        if !(self.namespaces.listed && self.node_pods.listed) {
            return;
        }
        // Read from the host once for all the pods that need it, and only then.
        let mut sandboxes = None;
        for uid in uids {
            self.reconcile_pod(uid, &mut sandboxes).await;
        }
    }

    async fn reconcile_pod(&self, uid: &str, sandboxes: &mut Option<Sandboxes>) {
        let Some(pod) = self.node_pods.objects.get(uid) else {
            if self.pods.lock().await.disenroll(uid, None) {
                tracing::info!(%uid, "kubernetes: released a pod no longer on this node");
            }
            return;
        };
        let enrolled = self.pods.lock().await.is_enrolled(uid, "");
        let label = label_of(pod);
        let namespace_labels = (pod.metadata.namespace.as_ref())
            .and_then(|ns| self.namespaces.objects.get(ns))
            .and_then(|ns| ns.metadata.labels.as_ref());
        match (ambient::captured_addresses(pod, namespace_labels), enrolled) {
            (Ok(ips), false) => {
                if !(self.ready)() {
                    return;
                }
                let sandboxes = match sandboxes {
                    Some(found) => found,
                    None => match Sandboxes::scan(Path::new(PROC_ROOT), Path::new(NETNS_DIR)) {
                        Ok(found) => sandboxes.insert(found),
                        Err(err) => {
                            tracing::warn!(%err, "kubernetes: cannot read {PROC_ROOT}");
                            return;
                        }
                    },
                };
                if self.enroll(pod, uid, ips, sandboxes).await {
                    tracing::info!(pod = %label, "kubernetes: enrolled a running pod");
                    self.mark(pod, true).await;
                }
            }
            (Ok(_), true) => self.mark(pod, true).await,
            // Its CNI ADD enrolled it before the kubelet reported its address.
            (Err(Skip::NoAddress), _) => {}
            (Err(skip), true) => {
                if self.pods.lock().await.disenroll(uid, None) {
                    tracing::info!(pod = %label, reason = %skip, "kubernetes: released");
                }
                self.mark(pod, false).await;
            }
            (Err(_), false) => self.mark(pod, false).await,
        }
    }

    /// Enrolls a running pod through its sandbox on the host; whether it is enrolled now.
    async fn enroll(
        &self,
        pod: &Pod,
        uid: &str,
        ips: Vec<std::net::IpAddr>,
        sandboxes: &Sandboxes,
    ) -> bool {
        let Some(sandbox) = sandboxes.get(uid) else {
            tracing::warn!(pod = %label_of(pod), "kubernetes: no process of the pod on this host yet; retrying");
            return false;
        };
        let spec = PodSpec {
            netns: sandboxes.netns_path(Path::new(PROC_ROOT), sandbox),
            container_id: sandbox.container_id.clone(),
            uid: uid.to_owned(),
            ips,
            name: pod.metadata.name.clone().unwrap_or_default(),
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        };
        match self.pods.lock().await.enroll(spec) {
            Ok(_) => true,
            Err(err) => {
                tracing::warn!(pod = %label_of(pod), %err, "kubernetes: enrollment failed; retrying");
                false
            }
        }
    }

    /// Brings the pod's annotation in line with its capture, when it is not already.
    async fn mark(&self, pod: &Pod, redirected: bool) {
        if ambient::is_marked_redirected(pod) == redirected {
            return;
        }
        if let Err(err) = self.kube.mark(pod, redirected).await {
            tracing::warn!(pod = %label_of(pod), %err, "kubernetes: annotation not changed; retrying");
        }
    }
}

/// The watch retries on its own, with backoff.
fn watch_failed(err: &watcher::Error) {
    tracing::warn!(%err, "kubernetes: watch failed; retrying");
}

/// `namespace/name`, for the log.
fn label_of(pod: &Pod) -> String {
    let metadata = &pod.metadata;
    format!(
        "{}/{}",
        metadata.namespace.as_deref().unwrap_or_default(),
        metadata.name.as_deref().unwrap_or_default()
    )
}
