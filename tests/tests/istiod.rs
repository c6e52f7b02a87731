//! The daemons against istiod (the lab's `fake-istiod`, serving the lab's mesh file): the mesh
//! by delta xDS and the workload certificates from Istio's CA, over TLS with a bearer token;
//! a change arriving as a delta and enforced; and istiod's faults: going away (the daemons
//! keep what they hold and serve traffic) and coming back (the change made meanwhile
//! arrives), GOAWAY and ended streams (back at once), a token it refuses (not ready until it
//! is right), a resource no proxy can take (NACKed by name, its siblings applied), its CA down
//! when a node starts (HBONE waits, then works without a restart) or at a renewal (the held
//! certificate serves until it expires, then service resumes with the CA), its certificate for
//! its DNS name only (taken through the alternative name); a pod enrolled before istiod sends
//! its workload (serving as its namespace's default account until the workload arrives).

mod support;

use std::time::{Duration, Instant};
use support::*;
use ztunnel_lab::istiod::{CaAnswer, Faults};
use ztunnel_lab::mesh::MeshChanges;
use ztunnel_lab::topology::PODS;
use ztunnel_lab::{ControlPlane, DaemonOptions, Started, istiod};
use ztunnel_user::api::Direction;
use ztunnel_user::xds::client::XdsStatus;

const DENY_SA_A: &str = "policies:\n- {name: no-sa-a, namespace: demo, scope: Namespace, \
                         action: Deny, rules: [[[{principals: [{Exact: cluster.local/ns/demo/sa/sa-a}]}]]]}\n";

fn istiod_lab() -> LabSession {
    istiod_lab_with_env(Vec::new())
}

fn istiod_lab_with_env(env: Vec<(String, String)>) -> LabSession {
    LabSession::start_with(&DaemonOptions {
        control_plane: ControlPlane::Istiod,
        env,
        ..DaemonOptions::default()
    })
}

/// The stream openings each node has tried so far.
fn attempts(s: &LabSession) -> [u64; 2] {
    NODES.map(|node| xds(s, node).attempts)
}

/// Waits until every node has opened a new stream since `before` and is synced on it.
fn wait_reconnected(s: &LabSession, before: [u64; 2], within: Duration) {
    for (node, before) in NODES.into_iter().zip(before) {
        wait_xds(s, node, within, |x| {
            x.attempts > before && x.connected && x.ready
        });
    }
}

/// A new version of the mesh file: the lab's, with one more workload (`extra-1`, on no node
/// of the lab).
fn write_mesh_with_extra_workload() {
    let extra = "- {uid: extra-1, name: extra-1, namespace: demo, workloadIps: [10.244.9.9], \
                 protocol: HBONE, node: elsewhere}\n";
    let text = ztunnel_lab::mesh::mesh_config_with(&MeshChanges {
        extra_workloads: extra,
        ..MeshChanges::default()
    });
    ztunnel_lab::mesh::write_mesh_config_text(&text).expect("writing the mesh config");
}

fn deny_sa_a() -> MeshChanges<'static> {
    MeshChanges {
        sections: DENY_SA_A,
        ..MeshChanges::default()
    }
}

fn xds(s: &LabSession, node: &str) -> XdsStatus {
    status(&s.lab, node)
        .xds
        .unwrap_or_else(|| panic!("{node}'s daemon runs without xDS"))
}

/// Polls `node`'s xDS status until `done` holds (at most `within`).
fn wait_xds(s: &LabSession, node: &str, within: Duration, done: impl Fn(&XdsStatus) -> bool) {
    let deadline = Instant::now() + within;
    loop {
        let status = xds(s, node);
        if done(&status) {
            return;
        }
        assert!(Instant::now() < deadline, "{node}: {status:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// istiod's log text for a stream opened by a daemon that holds every lab workload.
fn held_every_workload() -> String {
    format!("held={}", PODS.len())
}

/// The lines of istiod's log that hold `text`.
fn istiod_log_lines(text: &str) -> Vec<String> {
    std::fs::read_to_string(istiod::log_path())
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains(text))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_mesh_and_the_certificates_come_from_istiod_and_a_change_arrives_as_a_delta() {
    let s = istiod_lab();
    for node in NODES {
        let status = xds(&s, node);
        assert!(status.connected && status.ready, "{node}: {status:?}");
        // Every workload of the file, and no policy yet, as Address and Authorization.
        let held: Vec<usize> = status.types.iter().map(|t| t.resources).collect();
        assert_eq!(held, [PODS.len(), 0], "{node}: {status:?}");
        // The same on /metrics.
        let metrics = scrape(node);
        assert_eq!(sample(&metrics, "ztunnel_xds_connected", &[]), 1.0);
        let address = [("type_url", "type.googleapis.com/istio.workload.Address")];
        assert_eq!(
            sample(&metrics, "ztunnel_xds_resources", &address),
            PODS.len() as f64
        );
    }
    // Each captured pod's identity was signed by istiod's CA, asked for by its node.
    for identity in ["ns/demo/sa/sa-a", "ns/demo/sa/sa-b"] {
        assert!(
            !istiod_log_lines(&format!(
                "issued a certificate identity=spiffe://cluster.local/{identity}"
            ))
            .is_empty(),
            "istiod did not sign {identity}"
        );
    }
    let b1_app = serve("b1", APP_PORT);
    let report = send("a1", s.addr("b1", APP_PORT), 64 * KIB);
    assert_eq!(report.server.peer.ip(), s.ip("a1"));
    assert_eq!(next_report(&b1_app).bytes, 64 * KIB);

    // A policy added to the file reaches both daemons as one delta, and is enforced.
    apply_mesh(&s.lab, &deny_sa_a());
    let error = denied("a1", s.addr("b1", APP_PORT));
    assert!(!error.is_empty());
    let policies: Vec<usize> = NODES.map(|node| xds(&s, node).types[1].resources).to_vec();
    assert_eq!(policies, [1, 1]);
    // Its removal, as a removed resource.
    apply_mesh(&s.lab, &MeshChanges::default());
    send("a1", s.addr("b1", APP_PORT), 4 * KIB);
    assert_eq!(next_report(&b1_app).bytes, 4 * KIB);
}

#[test]
fn while_istiod_is_away_the_daemons_serve_what_they_hold_and_catch_up_when_it_returns() {
    let s = istiod_lab();
    let b1_app = serve("b1", APP_PORT);
    assert!(istiod::stop_istiod().expect("stopping istiod"));
    for node in NODES {
        wait_xds(&s, node, Duration::from_secs(10), |x| !x.connected);
    }
    // Nothing is lost: the mesh and the certificates held keep traffic flowing.
    send("a1", s.addr("b1", APP_PORT), 64 * KIB);
    assert_eq!(next_report(&b1_app).bytes, 64 * KIB);
    for node in NODES {
        assert!(
            daemon_ready(node),
            "{node} stopped being ready without istiod"
        );
    }

    // A change made while istiod is away arrives once it is back: the daemons reconnect on
    // their own, presenting the versions they hold, and get only the difference.
    let opened_before = istiod_log_lines("xDS stream opened").len();
    ztunnel_lab::mesh::write_mesh_config_text(&ztunnel_lab::mesh::mesh_config_with(&deny_sa_a()))
        .expect("writing the mesh config");
    istiod::start_istiod().expect("starting istiod again");
    apply_mesh(&s.lab, &deny_sa_a());
    denied("a1", s.addr("b1", APP_PORT));
    let reopened = istiod_log_lines("xDS stream opened").len() - opened_before;
    assert!(reopened >= 2, "{reopened} streams opened after the restart");
    let resubscribed = istiod_log_lines(&held_every_workload());
    assert!(
        resubscribed.len() >= 2,
        "the daemons did not present the addresses they hold: {resubscribed:?}"
    );
}

#[test]
fn a_token_istiod_refuses_keeps_the_daemon_not_ready_until_the_token_is_right() {
    let s = istiod_lab();
    ztunnel_lab::stop_daemon("node2").expect("stopping node2's daemon");
    istiod::write_daemon_token("a-stolen-token").expect("writing the token");
    ztunnel_lab::start_daemon_until("node2", Started::Answering).expect("starting node2");
    wait_xds(&s, "node2", Duration::from_secs(10), |x| {
        x.attempts >= 2 && x.last_error.is_some()
    });
    let status = xds(&s, "node2");
    let error = status.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("Unauthenticated") || error.contains("unauthenticated"),
        "{error}"
    );
    assert!(!status.ready && !daemon_ready("node2"), "{status:?}");

    // The token is read again for each attempt: the right one makes it ready, no restart.
    istiod::restore_daemon_token().expect("writing the token");
    wait_xds(&s, "node2", Duration::from_secs(40), |x| x.ready);
    eventually_within("node2 is ready", Duration::from_secs(20), || {
        daemon_ready("node2")
    });
    let b1_app = serve("b1", APP_PORT);
    send("a1", s.addr("b1", APP_PORT), 4 * KIB);
    assert_eq!(next_report(&b1_app).bytes, 4 * KIB);
}

fn daemon_ready(node: &str) -> bool {
    ztunnel_lab::daemon_not_ready(node)
        .unwrap_or_else(|e| panic!("{node}: {e}"))
        .is_none()
}

#[test]
fn after_goaway_or_an_ended_stream_the_daemons_are_back_at_once_with_their_state() {
    let s = istiod_lab();
    let before = attempts(&s);
    istiod::goaway().expect("GOAWAY");
    // A routine end: reconnected without a backoff (10 ms at the first failure).
    wait_reconnected(&s, before, Duration::from_secs(2));
    let before = attempts(&s);
    istiod::drop_streams().expect("ending the streams");
    wait_reconnected(&s, before, Duration::from_secs(2));
    // Each came back with the versions it held: nothing to send but the first responses.
    assert!(istiod_log_lines(&held_every_workload()).len() >= 4);
    apply_mesh(&s.lab, &deny_sa_a());
    denied("a1", s.addr("b1", APP_PORT));
}

#[test]
fn a_resource_no_proxy_can_take_is_nacked_by_name_and_its_siblings_are_applied() {
    let s = istiod_lab();
    istiod::set_faults(&Faults {
        bad_address: true,
        ..Faults::default()
    })
    .expect("setting the faults");
    // One more workload in the same version of the file as the bad Address.
    write_mesh_with_extra_workload();
    for node in NODES {
        wait_xds(&s, node, Duration::from_secs(10), |x| {
            x.types[0].last_nack.is_some()
        });
        let status = xds(&s, node);
        let nack = status.types[0].last_nack.clone().unwrap();
        assert!(nack.message.contains(istiod::BAD_ADDRESS), "{nack:?}");
        // The lab's workloads and the new one are held; the bad one is not.
        assert_eq!(status.types[0].resources, PODS.len() + 1, "{status:?}");
        let workloads = mesh_status(&s.lab, node).workloads;
        assert!(
            workloads
                .iter()
                .any(|w| w.uid == "Kubernetes//Pod/demo/extra-1"),
            "{node}: {workloads:?}"
        );
        assert!(status.ready, "a NACK made {node} not ready");
    }
}

#[test]
fn with_the_ca_down_as_a_node_starts_hbone_waits_and_works_once_it_is_back() {
    let s = istiod_lab();
    let b1_app = serve("b1", APP_PORT);
    istiod::set_faults(&Faults {
        ca: CaAnswer::Refuse,
        ..Faults::default()
    })
    .expect("setting the faults");
    ztunnel_lab::stop_daemon("node2").expect("stopping node2's daemon");
    ztunnel_lab::start_daemon_until("node2", Started::Answering).expect("starting node2");
    wait_xds(&s, "node2", Duration::from_secs(10), |x| x.ready);
    // b1 is served again (taken over), but without a certificate its HBONE cannot be.
    eventually_within("node2 takes b1 over", Duration::from_secs(20), || {
        status(&s.lab, "node2").pods.iter().any(|p| p.name == "b1")
    });
    denied("a1", s.addr("b1", APP_PORT));
    assert!(!istiod_log_lines("refused (a fault)").is_empty());

    istiod::set_faults(&Faults::default()).expect("clearing the faults");
    eventually_within("a1 -> b1 works", Duration::from_secs(60), || {
        let to = s.addr("b1", APP_PORT);
        ztunnel_lab::send_from("a1", to, 4 * KIB, None, Duration::from_secs(5)).is_ok()
    });
    assert_eq!(next_report(&b1_app).bytes, 4 * KIB);
}

#[test]
fn a_certificate_for_istiods_dns_name_only_is_taken_through_the_alternative_name() {
    let name = "istiod.istio-system.svc";
    let s = istiod_lab_with_env(
        ["ALT_XDS_HOSTNAME", "ALT_CA_HOSTNAME"]
            .map(|variable| (variable.to_owned(), name.to_owned()))
            .to_vec(),
    );
    // The daemons dial istiod by its address; its new certificate no longer names it.
    istiod::set_faults(&Faults {
        serving_names: Some(vec![name.to_owned()]),
        ..Faults::default()
    })
    .expect("setting the faults");
    let before = attempts(&s);
    istiod::goaway().expect("GOAWAY");
    wait_reconnected(&s, before, Duration::from_secs(5));

    // A certificate for another name is refused, and the daemon says why.
    istiod::set_faults(&Faults {
        serving_names: Some(vec!["istiod.elsewhere.svc".to_owned()]),
        ..Faults::default()
    })
    .expect("setting the faults");
    istiod::goaway().expect("GOAWAY");
    wait_xds(&s, "node1", Duration::from_secs(10), |x| {
        !x.connected
            && x.last_error
                .as_deref()
                .is_some_and(|e| e.contains("not valid for name"))
    });
}

#[test]
fn with_the_ca_down_at_renewal_the_held_certificate_serves_and_a_new_one_comes_with_the_ca() {
    let s = LabSession::start_with(&DaemonOptions {
        control_plane: ControlPlane::Istiod,
        cert_lifetime_secs: Some(10),
        ..DaemonOptions::default()
    });
    let b1_app = serve("b1", APP_PORT);
    istiod::set_faults(&Faults {
        ca: CaAnswer::Refuse,
        ..Faults::default()
    })
    .expect("setting the faults");
    let sa_a = "spiffe://cluster.local/ns/demo/sa/sa-a";
    // The expiry of the sa-a certificate `node` holds, as its status shows it.
    let held = |node| {
        certificate_expiries(&s.lab, node)
            .into_iter()
            .find_map(|(identity, expires)| (identity == sa_a).then_some(expires))
    };
    let expiry = held("node1").expect("node1 holds sa-a's certificate");
    // Its renewal at half life is refused...
    let refused = format!("refused (a fault) identity={sa_a}");
    eventually_within("sa-a's renewal is refused", Duration::from_secs(15), || {
        !istiod_log_lines(&refused).is_empty()
    });
    // ...and the certificate held still serves.
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    assert!(now() + 1 < expiry, "too late to check the held certificate");
    send("a1", s.addr("b1", APP_PORT), 4 * KIB);
    assert_eq!(next_report(&b1_app).bytes, 4 * KIB);

    // Kept, not dropped, while the retries fail.
    assert_eq!(held("node1"), Some(expiry));
    while now() <= expiry {
        std::thread::sleep(Duration::from_millis(200));
    }

    // The CA back: a retry gets a new certificate, and a1 -> b1 works with it.
    istiod::set_faults(&Faults::default()).expect("clearing the faults");
    eventually_within("a new certificate", Duration::from_secs(40), || {
        held("node1").is_some_and(|expires| expires > expiry)
    });
    send("a1", s.addr("b1", APP_PORT), 4 * KIB);
    assert_eq!(next_report(&b1_app).bytes, 4 * KIB);
}

#[test]
fn a_pod_enrolled_before_istiod_knows_it_takes_its_identity_when_its_workload_arrives() {
    let s = istiod_lab();
    let b1_app = serve("b1", APP_PORT);
    let b1_uid = "Kubernetes//Pod/demo/b1";
    let has_b1 = |node| {
        mesh_status(&s.lab, node)
            .workloads
            .iter()
            .any(|w| w.uid == b1_uid)
    };
    // istiod has not seen b1 yet (withheld from the file's next version on).
    istiod::set_faults(&Faults {
        withheld_workloads: vec!["demo/b1".to_owned()],
        ..Faults::default()
    })
    .expect("setting the faults");
    write_mesh_with_extra_workload();
    eventually("b1's workload is withdrawn", || {
        NODES.iter().all(|node| !has_b1(node))
    });

    // b1 enrolled again meanwhile: without a workload, its namespace's default account.
    let b1 = s.lab.pod("b1").expect("b1");
    disenroll(&s.lab, "node2", &b1.uid, &b1.container_id);
    let enrolled = enroll_again(&s.lab, "node2", "b1");
    assert_eq!(
        enrolled.identity,
        "spiffe://cluster.local/ns/demo/sa/default"
    );
    // A connection into b1 made meanwhile (node1 knows no b1: it goes in plaintext).
    let to = s.addr("b1", APP_PORT);
    let open = send_pausing(
        "a1",
        to,
        MIB,
        Duration::from_secs(5),
        Duration::from_secs(10),
    );
    eventually("the connection into b1 is open", || {
        connections(&s.lab, "node2").iter().any(|c| c.open)
    });

    // Its workload arrives: b1 serves as sa-b, which is what node1 expects of it.
    istiod::set_faults(&Faults::default()).expect("clearing the faults");
    ztunnel_lab::mesh::write_mesh_config().expect("writing the mesh config");
    let b1_identity = || {
        status(&s.lab, "node2")
            .pods
            .into_iter()
            .find(|p| p.name == "b1")
            .map(|p| p.identity)
    };
    eventually("b1 serves as sa-b", || {
        b1_identity().as_deref() == Some("spiffe://cluster.local/ns/demo/sa/sa-b")
    });
    assert!(daemon_log("node2").contains("pod joined to its workload"));
    assert!(
        open.join().unwrap().is_err(),
        "the connection made as default ended"
    );
    assert!(next_report(&b1_app).bytes < MIB);
    eventually_within("a1 -> b1 works", Duration::from_secs(20), || {
        ztunnel_lab::send_from("a1", to, 4 * KIB, None, Duration::from_secs(5)).is_ok()
    });
    assert_eq!(next_report(&b1_app).bytes, 4 * KIB);
    let inbound = closed_connections(&s.lab, "node2", Direction::Inbound);
    let carried = inbound.last().expect("node2 recorded the connection");
    assert_eq!(
        carried.destination_identity,
        "spiffe://cluster.local/ns/demo/sa/sa-b"
    );
}
