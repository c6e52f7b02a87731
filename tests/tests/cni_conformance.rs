//! The CNI plugin against a real daemon, invoked by the lab exactly as a runtime does.
//! (The plugin's behaviour without a daemon and on malformed input is covered by
//! `ztunnel-user/tests/cni_plugin.rs`.)

mod support;

use std::time::Duration;
use support::*;
use ztunnel_lab::LabError;
use ztunnel_user::api::{self, PodSpec, Request, Response};

fn plugin_error_code(result: ztunnel_lab::Result<impl std::fmt::Debug>) -> u32 {
    match result {
        Err(LabError::Plugin { code, .. }) => code,
        other => panic!("expected a CNI plugin error, got {other:?}"),
    }
}

#[test]
fn add_check_del_against_a_running_daemon() {
    let s = LabSession::start();
    let links = our_link_count();

    ztunnel_lab::cni_check("a1").expect("CHECK of an enrolled pod succeeds");
    ztunnel_lab::cni_check("u1").expect("CHECK of an excluded pod passes");

    // The daemon answers a repeated enrollment of the same sandbox (a runtime retrying an ADD
    // whose answer it lost) without creating anything new. (A repeated CNI ADD through the
    // chain is refused by ptp itself, whose interface already exists.)
    let a1 = s.lab.pod("a1").unwrap();
    let socket = &s.lab.node("node1").unwrap().api_socket;
    let spec = PodSpec {
        name: a1.name.clone(),
        namespace: a1.namespace.clone(),
        uid: a1.uid.clone(),
        container_id: a1.container_id.clone(),
        netns: a1.netns.clone(),
        ips: a1.ips(),
    };
    match api::call(
        socket,
        &Request::Enroll { pod: spec },
        Duration::from_secs(10),
    ) {
        Ok(Response::Enrolled { pod }) => assert_eq!(pod.links.len(), HOOKS_PER_POD),
        other => panic!("repeated enrollment: {other:?}"),
    }
    assert_eq!(
        our_link_count(),
        links,
        "a repeated enrollment creates no new links"
    );

    // The daemon lost the pod (as after a restart): CHECK reports it as not captured.
    disenroll(&s.lab, "node1", &a1.uid, &a1.container_id);
    assert_eq!(plugin_error_code(ztunnel_lab::cni_check("a1")), 999);

    ztunnel_lab::cni_del("a1").expect("DEL of a pod the daemon does not know succeeds");
    ztunnel_lab::cni_del("a1").expect("a second DEL succeeds too");
    eventually("a1's links are released", || {
        our_link_count() == links - HOOKS_PER_POD
    });
}

#[test]
fn add_without_a_daemon_fails_and_leaves_the_pod_uncaptured() {
    let s = LabSession::start();
    ztunnel_lab::cni_del("a2").expect("DEL of a2");
    ztunnel_lab::kill_daemon("node1").expect("kill node1 daemon");

    assert_eq!(
        plugin_error_code(ztunnel_lab::cni_add("a2")),
        11,
        "try again later"
    );
    let a2 = s.lab.pod("a2").unwrap();
    assert!(
        !s.lab
            .node("node1")
            .unwrap()
            .bpffs
            .join("pods")
            .join(&a2.uid)
            .exists()
    );
    // DEL with the daemon gone still succeeds, so pod deletion is never blocked.
    ztunnel_lab::cni_del("a2").expect("DEL without a daemon");
}
