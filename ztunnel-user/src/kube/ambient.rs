//! Which pods Istio's ambient mode captures: those of a namespace labelled
//! `istio.io/dataplane-mode=ambient`, or labelled so themselves, unless the pod opts out with
//! `istio.io/dataplane-mode=none`; never a pod on the host's network (its netns is the node's)
//! nor one with a sidecar (its own proxy captures it). The same rules as Istio's node agent.

use k8s_openapi::api::core::v1::Pod;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

/// The label that enrolls a namespace or a pod, and with `none` opts a pod out.
pub(crate) const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
const AMBIENT: &str = "ambient";
const NONE: &str = "none";
/// istiod serves a pod over HBONE only when its node proxy marked it so.
pub(crate) const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
pub(crate) const REDIRECTION_ENABLED: &str = "enabled";
/// Set by Istio's sidecar injector on every pod it injected.
const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
const SIDECAR_CONTAINER: &str = "istio-proxy";

/// Why a pod on this node is not captured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Skip {
    NotAmbient,
    OptedOut,
    HostNetwork,
    Sidecar,
    /// Succeeded, failed, or being deleted.
    Finished,
    /// Its sandbox has no address yet (the CNI ADD, which enrolls it, is still to come).
    NoAddress,
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Skip::NotAmbient => {
                "neither it nor its namespace is labelled istio.io/dataplane-mode=ambient"
            }
            Skip::OptedOut => "it is labelled istio.io/dataplane-mode=none",
            Skip::HostNetwork => "it uses the host's network",
            Skip::Sidecar => "it has an Istio sidecar",
            Skip::Finished => "it has finished or is being deleted",
            Skip::NoAddress => "it has no IP address yet",
        })
    }
}

/// Whether the pod is in the mesh by its own and its namespace's labels alone (what a CNI ADD
/// can know: the sandbox is being made, so its addresses and phase are not the API's yet).
pub(crate) fn enrolled_by_labels(
    pod: &Pod,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> Result<(), Skip> {
    if pod.spec.as_ref().and_then(|spec| spec.host_network) == Some(true) {
        return Err(Skip::HostNetwork);
    }
    if has_sidecar(pod) {
        return Err(Skip::Sidecar);
    }
    match (
        dataplane_mode(pod.metadata.labels.as_ref()),
        dataplane_mode(namespace_labels),
    ) {
        (Some(NONE), _) => Err(Skip::OptedOut),
        (Some(AMBIENT), _) | (_, Some(AMBIENT)) => Ok(()),
        _ => Err(Skip::NotAmbient),
    }
}

fn dataplane_mode(labels: Option<&BTreeMap<String, String>>) -> Option<&str> {
    labels?.get(DATAPLANE_MODE).map(String::as_str)
}

/// The addresses of a running pod the mesh captures; why not, otherwise.
pub(crate) fn captured_addresses(
    pod: &Pod,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> Result<Vec<IpAddr>, Skip> {
    enrolled_by_labels(pod, namespace_labels)?;
    let finished = pod
        .status
        .as_ref()
        .and_then(|status| status.phase.as_deref())
        .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
    if finished || pod.metadata.deletion_timestamp.is_some() {
        return Err(Skip::Finished);
    }
    let addresses = pod_addresses(pod);
    if addresses.is_empty() {
        return Err(Skip::NoAddress);
    }
    Ok(addresses)
}

fn pod_addresses(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let listed = status.pod_ips.iter().flatten().map(|ip| ip.ip.as_str());
    let mut addresses: Vec<IpAddr> = listed
        .chain(status.pod_ip.as_deref())
        .filter_map(|ip| ip.parse().ok())
        .collect();
    addresses.sort_unstable();
    addresses.dedup();
    addresses
}

fn has_sidecar(pod: &Pod) -> bool {
    let annotated = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|annotations| annotations.contains_key(SIDECAR_STATUS_ANNOTATION));
    let spec = pod.spec.as_ref();
    let containers = spec.into_iter().flat_map(|spec| {
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
    });
    annotated || containers.into_iter().any(|c| c.name == SIDECAR_CONTAINER)
}

/// Whether istiod has been told the pod is captured.
pub(crate) fn is_marked_redirected(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(REDIRECTION_ANNOTATION))
        .is_some_and(|value| value == REDIRECTION_ENABLED)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).expect("a pod")
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn running(extra_metadata: serde_json::Value, spec: serde_json::Value) -> Pod {
        let mut metadata = json!({"name": "a1", "namespace": "demo", "uid": "u1"});
        if let (Some(base), Some(extra)) = (metadata.as_object_mut(), extra_metadata.as_object()) {
            base.extend(extra.clone());
        }
        pod(json!({
            "metadata": metadata,
            "spec": spec,
            "status": {"phase": "Running", "podIP": "10.244.1.2",
                       "podIPs": [{"ip": "10.244.1.2"}, {"ip": "fd00::2"}]},
        }))
    }

    fn app() -> serde_json::Value {
        json!({"containers": [{"name": "app"}]})
    }

    #[test]
    fn a_labelled_namespace_captures_its_running_pods() {
        let ambient = labels(&[(DATAPLANE_MODE, "ambient")]);
        let addresses = captured_addresses(&running(json!({}), app()), Some(&ambient));
        assert_eq!(
            addresses,
            Ok(vec![
                "10.244.1.2".parse().unwrap(),
                "fd00::2".parse().unwrap()
            ])
        );
        assert_eq!(
            captured_addresses(&running(json!({}), app()), Some(&labels(&[]))),
            Err(Skip::NotAmbient)
        );
        assert_eq!(
            captured_addresses(&running(json!({}), app()), None),
            Err(Skip::NotAmbient)
        );
    }

    #[test]
    fn a_pod_label_opts_in_and_out() {
        let ambient = labels(&[(DATAPLANE_MODE, "ambient")]);
        let opted_out = running(json!({"labels": {DATAPLANE_MODE: "none"}}), app());
        assert_eq!(
            captured_addresses(&opted_out, Some(&ambient)),
            Err(Skip::OptedOut)
        );
        let opted_in = running(json!({"labels": {DATAPLANE_MODE: "ambient"}}), app());
        assert!(captured_addresses(&opted_in, None).is_ok());
    }

    #[test]
    fn host_network_sidecars_and_finished_pods_are_skipped() {
        let ambient = labels(&[(DATAPLANE_MODE, "ambient")]);
        let host = running(
            json!({}),
            json!({"hostNetwork": true, "containers": [{"name": "app"}]}),
        );
        assert_eq!(
            captured_addresses(&host, Some(&ambient)),
            Err(Skip::HostNetwork)
        );
        let injected = running(
            json!({}),
            json!({"containers": [{"name": "app"}, {"name": "istio-proxy"}]}),
        );
        assert_eq!(
            captured_addresses(&injected, Some(&ambient)),
            Err(Skip::Sidecar)
        );
        let native_sidecar = running(
            json!({}),
            json!({"containers": [{"name": "app"}], "initContainers": [{"name": "istio-proxy"}]}),
        );
        assert_eq!(
            captured_addresses(&native_sidecar, Some(&ambient)),
            Err(Skip::Sidecar)
        );
        let annotated = running(
            json!({"annotations": {"sidecar.istio.io/status": "{}"}}),
            app(),
        );
        assert_eq!(
            captured_addresses(&annotated, Some(&ambient)),
            Err(Skip::Sidecar)
        );
        let mut done = running(json!({}), app());
        if let Some(status) = done.status.as_mut() {
            status.phase = Some("Succeeded".to_owned());
        }
        assert_eq!(
            captured_addresses(&done, Some(&ambient)),
            Err(Skip::Finished)
        );
        let pending = pod(json!({"metadata": {"name": "p", "uid": "u"}, "spec": app(),
                                 "status": {"phase": "Pending"}}));
        assert_eq!(
            captured_addresses(&pending, Some(&ambient)),
            Err(Skip::NoAddress)
        );
        assert_eq!(enrolled_by_labels(&pending, Some(&ambient)), Ok(()));
    }

    #[test]
    fn the_redirection_annotation_is_read() {
        assert!(!is_marked_redirected(&running(json!({}), app())));
        let marked = running(
            json!({"annotations": {REDIRECTION_ANNOTATION: "enabled"}}),
            app(),
        );
        assert!(is_marked_redirected(&marked));
    }
}
