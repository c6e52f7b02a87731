//! Enrollment by label (`ZTUNNEL_ENROLLMENT=kubernetes`), against the lab's Kubernetes API
//! (`fake-kube-apiserver`): labelling a namespace captures its running pods without
//! restarting them, removing the label releases them, and a pod started in a labelled
//! namespace is captured by its CNI ADD, before it runs.

mod support;

use std::collections::BTreeSet;
use support::*;
use ztunnel_lab::DaemonOptions;
use ztunnel_lab::kube::{self, label_ambient};
use ztunnel_lab::topology::pod_spec;
use ztunnel_user::api::Direction;

fn kubernetes_lab() -> LabSession {
    LabSession::start_with(&DaemonOptions {
        kubernetes: true,
        ..DaemonOptions::default()
    })
}

/// The pods both daemons have enrolled.
fn enrolled(s: &LabSession) -> BTreeSet<String> {
    ["node1", "node2"]
        .iter()
        .flat_map(|node| status(&s.lab, node).pods)
        .map(|pod| pod.name)
        .collect()
}

fn names(pods: &[&str]) -> BTreeSet<String> {
    pods.iter().map(|name| (*name).to_owned()).collect()
}

/// The processes in the pod's cgroup: its sandbox, as long as the pod was not restarted.
fn pod_processes(pod: &str) -> String {
    let cgroup = pod_spec(pod).unwrap().cgroup_path().join("cgroup.procs");
    std::fs::read_to_string(cgroup).unwrap()
}

fn marked(pod: &str) -> bool {
    kube::is_marked_redirected(pod_spec(pod).unwrap()).unwrap()
}

/// One transfer from a1 to b1; whether node1's daemon proxied it.
fn a1_to_b1_is_proxied(s: &LabSession) -> bool {
    let proxied_before = closed_connections(&s.lab, "node1", Direction::Outbound).len();
    let server = serve("b1", APP_PORT);
    let report = send("a1", s.addr("b1", APP_PORT), MIB);
    let seen = next_report(&server);
    assert_eq!((seen.bytes, seen.sha256), (MIB, report.sent_sha256));
    closed_connections(&s.lab, "node1", Direction::Outbound).len() > proxied_before
}

#[test]
fn a_labelled_namespace_is_captured_and_released_without_restarting_its_pods() {
    let s = kubernetes_lab();
    assert!(enrolled(&s).is_empty(), "no namespace is labelled yet");
    assert!(!a1_to_b1_is_proxied(&s));
    let sandboxes: Vec<String> = ["a1", "a2", "b1"].map(pod_processes).into();

    label_ambient("demo", true).unwrap();
    eventually("a1, a2 and b1 are enrolled", || {
        enrolled(&s) == names(&["a1", "a2", "b1"])
    });
    eventually("the API marks them captured", || {
        ["a1", "a2", "b1"].iter().all(|pod| marked(pod))
    });
    assert!(!marked("u1"), "legacy is not labelled");
    assert!(
        a1_to_b1_is_proxied(&s),
        "a1's connection goes through the mesh"
    );
    let inbound = closed_connections(&s.lab, "node2", Direction::Inbound);
    assert_eq!(
        inbound.len(),
        1,
        "b1's node took it in over HBONE: {inbound:?}"
    );

    label_ambient("demo", false).unwrap();
    eventually("the pods are released", || enrolled(&s).is_empty());
    eventually("the API no longer marks them", || {
        ["a1", "a2", "b1"].iter().all(|pod| !marked(pod))
    });
    assert!(!a1_to_b1_is_proxied(&s), "a1 talks to b1 directly again");
    assert_eq!(
        ["a1", "a2", "b1"].map(pod_processes).to_vec(),
        sandboxes,
        "no pod was restarted"
    );
}

#[test]
fn a_pod_opts_out_and_a_new_pod_is_captured_by_its_cni_add() {
    let s = kubernetes_lab();
    let a2 = pod_spec("a2").unwrap();
    // a2 opts out before its namespace is labelled: only a1 and b1 are taken.
    let opt_out = serde_json::json!({"metadata": {"labels": {kube::DATAPLANE_MODE: "none"}}});
    kube::patch_pod(a2, &opt_out).unwrap();
    label_ambient("demo", true).unwrap();
    eventually("a1 and b1 are enrolled", || {
        enrolled(&s) == names(&["a1", "b1"])
    });
    assert!(!marked("a2"));
    // Its sandbox made again: the CNI ADD succeeds, and leaves it out.
    ztunnel_lab::cni_del("a2").unwrap();
    ztunnel_lab::cni_add("a2").unwrap();
    assert_eq!(enrolled(&s), names(&["a1", "b1"]));

    // a2 goes, and comes back as a new pod without the opt-out: pending in the API until its
    // sandbox's CNI ADD, which captures it before anything in it runs.
    kube::delete_pod(a2).unwrap();
    ztunnel_lab::cni_del("a2").unwrap();
    kube::create_pod(a2, &[]).unwrap();
    let added = ztunnel_lab::cni_add("a2").unwrap();
    let node1 = status(&s.lab, "node1");
    let enrolled_a2 = node1.pods.iter().find(|pod| pod.name == "a2");
    assert_eq!(
        enrolled_a2.map(|pod| pod.container_id.as_str()),
        Some(a2.container_id().as_str()),
        "captured by the CNI ADD itself: {:?}",
        node1.pods
    );
    kube::report_running(a2, &added.ips()).unwrap();
    eventually("the API marks a2 captured", || marked("a2"));
}
