//! Attacks a hostile tenant can try, from inside an enrolled pod or from the network, each
//! reproduced on the lab before its fix (issue 18): the tests fail against a daemon without the
//! fix (`ZTUNNEL_DAEMON_BIN_DIR` runs another build's).

mod support;

use std::net::SocketAddrV4;
use std::time::Duration;
use support::*;
use ztunnel_lab::mesh::MeshChanges;
use ztunnel_lab::{DaemonOptions, HeldConnections, Opening, PodServer, send_bound_from};
use ztunnel_user::api::Direction;

/// a1 cannot have its connection carried under a2's identity (another service account) by
/// connecting to a2's outbound port, nor reuse the original destination of a connection
/// capture recorded while the daemon was down. Before the fix that entry stayed, keyed by a1's
/// address and port alone, and whichever 15001 the next connection from that address and port
/// reached took it: a2's carried it to b1 as `sa-victim`.
#[test]
fn a_pod_cannot_send_under_another_pods_identity() {
    let s = LabSession::start();
    let changes = MeshChanges {
        service_accounts: &[("a2", "sa-victim")],
        ..MeshChanges::default()
    };
    apply_mesh(&s.lab, &changes);
    let _b1 = serve("b1", APP_PORT);
    let a1_port = SocketAddrV4::new(*s.addr("a1", 0).ip(), 40000);

    // While node1's daemon is down, a1's captured connection is refused...
    ztunnel_lab::stop_daemon("node1").expect("stopping node1's daemon");
    let refused = send_bound_from("a1", a1_port, s.addr("b1", APP_PORT), KIB, QUICK);
    assert!(
        refused.is_err(),
        "carried with the daemon down: {refused:?}"
    );
    ztunnel_lab::start_daemon("node1").expect("restarting node1's daemon");

    // ... and from the same address and port, a1 now goes to a2's outbound listener: captured
    // like any connection of a1's and refused, being for a proxy port.
    let stolen = send_bound_from("a1", a1_port, s.addr("a2", 15001), KIB, QUICK);
    assert!(
        stolen.is_err(),
        "a1's connection to a2's outbound port was carried: {stolen:?}"
    );
    assert_eq!(refused_now("node1", "to_proxy_port"), 1.0);
    // To its own 15001 (its own address is not captured), the recorded destination is gone.
    let own = send_bound_from("a1", a1_port, s.addr("a1", 15001), KIB, QUICK);
    assert!(own.is_err(), "a1's stale destination was used: {own:?}");
    assert_eq!(refused_now("node1", "no_original_destination"), 1.0);
    let as_victim: Vec<_> = connections(&s.lab, "node2")
        .into_iter()
        .filter(|c| c.source_identity.contains("sa-victim"))
        .collect();
    assert!(as_victim.is_empty(), "b1 was reached as a2: {as_victim:?}");

    // a2's own connections still go out as a2.
    send("a2", s.addr("b1", APP_PORT), KIB);
    let inbound = closed_connections(&s.lab, "node2", Direction::Inbound);
    assert!(
        inbound
            .iter()
            .any(|c| c.source_identity.ends_with("/sa/sa-victim") && c.error.is_none()),
        "{inbound:?}"
    );
}

/// A pod's process cannot take the proxy's ports in its netns. Before the fix, one listening
/// on 15006 while the daemon was down made the take-over fail, and the daemon released the
/// pod: from then on its connections left uncaptured.
#[test]
fn a_pod_cannot_squat_the_proxy_ports_to_escape_capture() {
    let s = LabSession::start();
    let b1 = serve("b1", APP_PORT);
    ztunnel_lab::stop_daemon("node1").expect("stopping node1's daemon");
    for port in ztunnel_common::ports::POD_PORTS {
        let squatter = PodServer::start("a1", port);
        assert!(
            squatter.is_err(),
            "a1's process listens on the proxy's {port}"
        );
    }
    ztunnel_lab::start_daemon("node1").expect("restarting node1's daemon");
    assert!(counters(&s.lab, "node1")["bind_refused_pod_port"] >= 3);

    // The pod is taken over and its connections are captured.
    let pods = status(&s.lab, "node1").pods;
    let a1 = pods
        .iter()
        .find(|p| p.name == "a1")
        .expect("a1 is enrolled");
    assert_eq!(a1.waiting, None);
    send("a1", s.addr("b1", APP_PORT), KIB);
    next_report(&b1);
    assert_eq!(
        closed_connections(&s.lab, "node1", Direction::Outbound).len(),
        1
    );
    // The app's own ports are the app's.
    let _app = PodServer::start("a1", 15020).expect("a1's app listens on 15020");
}

/// An app listening on one of the proxy's well-known port numbers (15020 here) is an app like
/// any other: captured and authorized. Before the fix, every proxy port number was exempt
/// from capture for every destination, so a deny-all policy left it open.
#[test]
fn an_app_on_a_proxy_port_number_is_under_policy() {
    let s = LabSession::start();
    let app = serve("b1", ztunnel_common::ports::METRICS);
    apply_mesh(
        &s.lab,
        &MeshChanges {
            workload_fields: &[("b1", "  authorizationPolicies: [demo/b1-closed]\n")],
            sections: "policies:
- name: b1-closed
  namespace: demo
  scope: WorkloadSelector
  action: Deny
  rules:
  - []
",
            ..MeshChanges::default()
        },
    );
    for client in ["a1", "u1"] {
        denied(client, s.addr("b1", ztunnel_common::ports::METRICS));
    }
    assert!(
        app.next_report(Duration::from_millis(500)).is_err(),
        "a denied connection reached the app"
    );
}

/// The proxy's deliveries to an app whose accept queue is full: the kernel drops SYNs (the
/// proxy's socket sends them again) or answers with a SYN cookie (the handshake's last ACK
/// then goes through the listener lookup again). Before the fix, the first SYN consumed the
/// delivery's announcement, and what came after was steered into the proxy's own inbound
/// listener (reset, or proxied a second time); the announcement withdrawn when connect
/// returned still lost the cookie's ACKs.
#[test]
fn deliveries_past_a_full_accept_queue_reach_the_app() {
    let s = LabSession::start();
    // The queue holds two connections; the app accepts after two seconds. Two more clients
    // overflow it; with more, the listener holds more half-open requests than
    // max(8, backlog) / 2, and the kernel then gives up on them after fewer SYN-ACK
    // retransmissions (about 3 s), resetting whichever the stalled app had not taken by then.
    const CLIENTS: usize = 4;
    let app = PodServer::start_stalled("b1", APP_PORT, 1, Duration::from_secs(2))
        .expect("a stalled app on b1");
    let to = s.addr("b1", APP_PORT);
    let senders: Vec<_> = (0..CLIENTS)
        .map(|_| {
            std::thread::spawn(move || {
                ztunnel_lab::send_from("a1", to, KIB, None, Duration::from_secs(20))
            })
        })
        .collect();
    for sender in senders {
        sender
            .join()
            .unwrap()
            .expect("delivered past the full queue");
    }
    for _ in 0..CLIENTS {
        let report = app.next_report(QUICK).expect("the app's report");
        assert_eq!(report.peer.ip(), s.ip("a1"));
    }
    let overflows = run_in("b1", &["nstat", "-az", "TcpExtListenOverflows"]);
    let dropped: u64 = overflows
        .lines()
        .find_map(|line| {
            line.strip_prefix("TcpExtListenOverflows")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .expect("nstat's TcpExtListenOverflows");
    assert!(dropped >= 1, "no SYN met the full queue:\n{overflows}");
    // Each connection reached b1 once, over HBONE as a1.
    let inbound = closed_connections(&s.lab, "node2", Direction::Inbound);
    assert_eq!(inbound.len(), CLIENTS, "{inbound:#?}");
    assert!(
        inbound
            .iter()
            .all(|c| c.source_identity.ends_with("/sa/sa-a")),
        "{inbound:#?}"
    );
}

/// Silent connections cannot take a node's mesh down. Before the fix, u1 (not enrolled)
/// opening connections to b1's HBONE port and sending nothing brought node2's daemon to its
/// open-files limit: from then on it accepted nothing, for any pod, and a2 -> b1 failed. Now
/// each source may have only so many connections authenticating, the rest are refused and
/// counted, and those that stay silent are closed at the handshake timeout; the same for the
/// HTTP endpoints.
#[test]
fn silent_connections_cannot_take_a_node_down() {
    const OPEN_FILES: u64 = 4096;
    const FLOOD: usize = 4500;
    const HTTP_FLOOD: usize = 100;
    let s = LabSession::start_with(&DaemonOptions {
        open_files: Some(OPEN_FILES),
        ..DaemonOptions::default()
    });
    let _b1 = serve("b1", APP_PORT);
    let hold = Duration::from_secs(120);
    let open_within = Duration::from_secs(60);
    let hbone = HeldConnections::open(
        "u1",
        s.addr("b1", 15008),
        FLOOD,
        Opening::Silent,
        hold,
        open_within,
    )
    .expect("u1's flood of b1's HBONE port");
    let node2 = s.lab.node("node2").expect("node2").underlay_ip;
    let readiness = SocketAddrV4::new(node2, 15021);
    let http = HeldConnections::open(
        "u1",
        readiness,
        HTTP_FLOOD,
        Opening::Silent,
        hold,
        open_within,
    )
    .expect("u1's flood of node2's readiness port");
    assert_eq!(hbone.report.connections + hbone.report.failed, FLOOD);

    // Everyone else is still served: a2 -> b1 over HBONE, readiness from the node itself.
    send("a2", s.addr("b1", APP_PORT), KIB);
    assert_eq!(
        curl("node2", &["http://127.0.0.1:15021/healthz/ready"]),
        Ok("ready\n".to_owned())
    );
    // Within its budget, and the flood refused and counted.
    let pid = ztunnel_lab::daemon_pid("node2").expect("node2's daemon");
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let dump: serde_json::Value =
        serde_json::from_str(&curl("node2", &["http://127.0.0.1:15000/config_dump"]).unwrap())
            .unwrap();
    let budget = dump["limits"]["fd_budget"].as_u64().expect("the budget") as usize;
    assert!(open < budget, "{open} files open, budget {budget}");
    let per_source = dump["limits"]["unauthenticated_per_source"]
        .as_f64()
        .unwrap();
    let refused = refused_now("node2", "unauthenticated_per_source");
    assert!(refused >= FLOOD as f64 - 2.0 * per_source, "{refused}");
    let refused = refused_now("node2", "http_connections_per_source");
    assert!(refused >= HTTP_FLOOD as f64 / 2.0, "{refused}");

    // The silent ones that were let in are closed at the handshake timeout.
    eventually_within(
        "the silent connections are closed",
        Duration::from_secs(30),
        || sample(&scrape("node2"), "ztunnel_unauthenticated_connections", &[]) == 0.0,
    );
    assert!(refused_now("node2", "handshake_timeout") >= 1.0);
    drop((hbone, http));
}

/// A peer that vanishes without a FIN or RST is found dead: the connections the proxies hold
/// for an app's flow have keepalive, the one a1's proxy accepted from the app (set on the
/// listener, inherited by what it accepts) and the HBONE connection b1's proxy accepted. The
/// delivery into b1's app runs over b1's loopback, where no peer vanishes silently: none.
#[test]
fn the_proxies_hold_the_apps_connections_with_keepalive() {
    let s = LabSession::start();
    let b1_app = serve("b1", APP_PORT);
    let to = s.addr("b1", APP_PORT);
    let pause = Duration::from_secs(3);
    let sender = send_pausing("a1", to, MIB, pause, Duration::from_secs(30));
    let accepted_from_app = format!("( sport = :{} )", ztunnel_common::ports::OUTBOUND);
    let accepted_hbone = format!("( sport = :{} )", ztunnel_common::ports::HBONE);
    let delivered_to_app = format!("( dport = :{APP_PORT} )");
    eventually("both proxies hold the connection", || {
        !established("a1", &accepted_from_app).is_empty()
            && !established("b1", &delivered_to_app).is_empty()
    });
    for (pod, filter) in [("a1", &accepted_from_app), ("b1", &accepted_hbone)] {
        let sockets = established(pod, filter);
        assert!(
            !sockets.is_empty() && sockets.iter().all(|s| s.contains("timer:(keepalive")),
            "{pod}: {sockets:?}"
        );
    }
    let deliveries = established("b1", &delivered_to_app);
    assert!(
        deliveries.iter().all(|s| !s.contains("keepalive")),
        "{deliveries:?}"
    );
    sender.join().unwrap().expect("a1's transfer");
    assert_eq!(next_report(&b1_app).bytes, MIB);
}

/// The established TCP sockets in `pod`'s netns that `filter` (an `ss` filter) selects, with
/// their timers.
fn established(pod: &str, filter: &str) -> Vec<String> {
    let listing = run_in(pod, &["ss", "-tnoH", "state", "established", filter]);
    listing.lines().map(str::to_owned).collect()
}

/// The count of `reason` refusals on `node` now.
fn refused_now(node: &str, reason: &str) -> f64 {
    sample(
        &scrape(node),
        "ztunnel_connections_refused_total",
        &[("reason", reason)],
    )
}

/// Only root may use a daemon's API socket, where pods are enrolled and released. Before the
/// fix, the socket's mode alone kept other users out: once it was loosened (a chmod, a mount
/// into a pod), any user could release a pod from capture.
#[test]
fn only_root_may_use_the_api_socket() {
    use std::os::unix::fs::PermissionsExt;
    let s = LabSession::start();
    let socket = &s.lab.node("node1").expect("node1").api_socket;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let a1 = s.lab.pod("a1").expect("a1");
    let release = serde_json::json!({
        "op": "disenroll",
        "uid": a1.uid,
        "container_id": a1.container_id,
    });
    // A one-line client as user nobody.
    let client = "import socket, sys\n\
                  s = socket.socket(socket.AF_UNIX)\n\
                  s.connect(sys.argv[1])\n\
                  s.sendall(sys.argv[2].encode() + b'\\n')\n\
                  print(s.makefile().readline())";
    let output = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["/usr/bin/python3", "-c", client])
        .arg(socket)
        .arg(release.to_string())
        .output()
        .expect("running the client as nobody");
    let reply = String::from_utf8_lossy(&output.stdout);
    assert!(
        reply.contains("only root may use the ztunnel API"),
        "{reply}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(status(&s.lab, "node1").pods.len(), 2);
}
