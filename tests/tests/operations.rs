//! Operating the proxy on a running lab: Istio's metrics from both reporters and the kernel's
//! counters on `/metrics`, access logs, the admin API and the CLI, readiness, and graceful
//! drain.

mod support;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};
use support::*;
use ztunnel_lab::mesh::MeshChanges;
use ztunnel_lab::topology::{MESH_CONFIG, PODS, node_spec};
use ztunnel_lab::{DaemonOptions, Started};

/// A port a policy denies, and one nothing listens on.
const DENIED_PORT: u16 = 9090;
const CLOSED_PORT: u16 = 7070;

#[test]
fn metrics_and_access_logs_report_both_sides_and_the_kernel() {
    let s = LabSession::start();
    let b1 = serve("b1", APP_PORT);
    let (before1, before2) = (scrape("node1"), scrape("node2"));
    let events = |text: &str, event: &str| {
        sample(text, "ztunnel_datapath_events_total", &[("event", event)])
    };

    // Over HBONE: a1 (sa-a, node1) -> b1 (sa-b, node2).
    let report = send("a1", s.addr("b1", APP_PORT), 64 * KIB);
    let reply_bytes = next_report(&b1).bytes; // what b1 got; its JSON reply goes back
    assert_eq!(reply_bytes, 64 * KIB);
    let from_b1 = closed_connections(&s.lab, "node1", ztunnel_user::api::Direction::Outbound)
        .iter()
        .find(|c| c.source == report.local)
        .expect("a1's outbound record")
        .bytes_received;
    // Plaintext: u1 (not in the mesh) -> b1.
    send("u1", s.addr("b1", APP_PORT), 16 * KIB);
    next_report(&b1);
    closed_connections(&s.lab, "node2", ztunnel_user::api::Direction::Inbound);

    let (after1, after2) = (scrape("node1"), scrape("node2"));
    let mesh = [
        ("source_workload", "a1"),
        ("source_workload_namespace", "demo"),
        ("source_principal", "spiffe://cluster.local/ns/demo/sa/sa-a"),
        ("destination_workload", "b1"),
        ("destination_workload_namespace", "demo"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/demo/sa/sa-b",
        ),
        ("request_protocol", "tcp"),
        ("response_flags", "-"),
        ("connection_security_policy", "mutual_tls"),
    ];
    for (text, reporter) in [(&after1, "source"), (&after2, "destination")] {
        let labels = [&mesh[..], &[("reporter", reporter)]].concat();
        let metric = |name| sample(text, name, &labels);
        assert_eq!(
            metric("istio_tcp_connections_opened_total"),
            1.0,
            "{reporter}"
        );
        assert_eq!(
            metric("istio_tcp_connections_closed_total"),
            1.0,
            "{reporter}"
        );
        assert_eq!(
            metric("istio_tcp_received_bytes_total"),
            (64 * KIB) as f64,
            "{reporter}: bytes a1 sent"
        );
        assert_eq!(
            metric("istio_tcp_sent_bytes_total"),
            from_b1 as f64,
            "{reporter}: bytes b1 sent back"
        );
    }
    let plaintext = [
        ("reporter", "destination"),
        ("source_workload", "u1"),
        ("source_workload_namespace", "legacy"),
        ("source_principal", "unknown"),
        ("destination_workload", "b1"),
        ("connection_security_policy", "unknown"),
    ];
    assert_eq!(
        sample(&after2, "istio_tcp_connections_closed_total", &plaintext),
        1.0
    );
    assert_eq!(
        sample(&after2, "istio_tcp_received_bytes_total", &plaintext),
        (16 * KIB) as f64
    );

    // The kernel's counters: a1's connect() captured, u1's SYN steered to b1's proxy.
    assert_eq!(
        events(&after1, "outbound_captured") - events(&before1, "outbound_captured"),
        1.0
    );
    assert_eq!(
        events(&after2, "inbound_steered") - events(&before2, "inbound_steered"),
        1.0
    );
    // The node's own state.
    assert_eq!(sample(&after1, "ztunnel_enrolled_pods", &[]), 2.0);
    assert_eq!(
        sample(
            &after1,
            "ztunnel_hbone_open",
            &[("side", "client"), ("kind", "connections")]
        ),
        1.0,
        "a1's pooled connection to b1 stays open"
    );
    let expiry = sample(
        &after1,
        "ztunnel_certificate_expiration_timestamp_seconds",
        &[("identity", "spiffe://cluster.local/ns/demo/sa/sa-a")],
    );
    assert!(
        expiry > ztunnel_user::host::process::unix_now() as f64,
        "{expiry}"
    );
    assert!(sample(&after1, "process_resident_memory_bytes", &[]) > 1e6);
    assert!(after1.contains("# TYPE istio_tcp_connections_opened counter"));
    assert_eq!(
        curl("node1", &["http://127.0.0.1:15020/stats/prometheus"])
            .unwrap()
            .lines()
            .next(),
        after1.lines().next(),
        "both paths serve the metrics"
    );

    // One access log line per connection end, on each side (the daemons log to their files;
    // lines are written in batches, a few milliseconds late).
    let log = |node: &str| std::fs::read_to_string(node_spec(node).unwrap().log_path()).unwrap();
    eventually("the access log lines are written", || {
        log("node1").contains("connection complete") && log("node2").contains("src.workload=u1")
    });
    let outbound = log("node1")
        .lines()
        .filter(|l| l.contains("connection complete direction=outbound pod=demo/a1 "))
        .map(str::to_owned)
        .collect::<Vec<_>>();
    assert_eq!(outbound.len(), 1, "{outbound:?}");
    for field in [
        format!("src.addr={}", report.local),
        format!("dst.addr={}", s.addr("b1", APP_PORT)),
        "src.identity=spiffe://cluster.local/ns/demo/sa/sa-a".to_owned(),
        "dst.workload=b1".to_owned(),
        format!("bytes_sent={} bytes_received={from_b1}", 64 * KIB),
    ] {
        assert!(outbound[0].contains(&field), "{field} in {}", outbound[0]);
    }
    let inbound = log("node2");
    assert!(inbound.contains("connection complete direction=inbound pod=demo/b1 "));
    assert!(inbound.contains("src.workload=u1 src.namespace=legacy src.identity=unknown"));

    // Without --ebpf-log the programs log nothing.
    for node in NODES {
        assert!(
            !log(node).contains(ztunnel_common::EBPF_LOG_TARGET),
            "{node} logged eBPF lines without --ebpf-log"
        );
    }
}

/// The label values that say what happened: the service a client addressed, the flags of a
/// denied and of a failed connection on both reporters, and both reporters on one node for
/// same-node traffic.
#[test]
fn metric_labels_name_the_service_the_outcome_and_both_reporters() {
    let s = LabSession::start();
    let _b1 = serve("b1", APP_PORT);
    let _a2 = serve("a2", APP_PORT);
    let vip = Ipv4Addr::new(10, 96, 0, 10);
    apply_mesh(
        &s.lab,
        &MeshChanges {
            workload_fields: &[("b1", ECHO_ENDPOINT)],
            sections: &format!(
                "{services}policies:
- name: no-9090
  namespace: demo
  scope: Namespace
  action: Deny
  rules:
  - - - destinationPorts: [{DENIED_PORT}]
",
                services = echo_service(vip, ""),
            ),
            ..MeshChanges::default()
        },
    );
    send("a1", SocketAddrV4::new(vip, 80), KIB);
    send("a1", s.addr("a2", APP_PORT), KIB);
    denied("a1", s.addr("b1", DENIED_PORT));
    // Nothing listens on b1's port 7070: its proxy cannot connect.
    denied("a1", s.addr("b1", CLOSED_PORT));
    // Every record is closed before the scrape (the metrics count closed connections).
    eventually("the records are closed", || {
        [("node1", 4), ("node2", 3)].iter().all(|(node, closed)| {
            connections(&s.lab, node).iter().filter(|c| !c.open).count() >= *closed
        })
    });
    let (node1, node2) = (scrape("node1"), scrape("node2"));
    let closed = |text: &str, labels: &[(&str, &str)]| {
        sample(text, "istio_tcp_connections_closed_total", labels)
    };

    let to_service = [
        ("reporter", "source"),
        ("destination_workload", "b1"),
        ("destination_service", "echo.demo.svc.cluster.local"),
        ("destination_service_name", "echo"),
        ("destination_service_namespace", "demo"),
        ("response_flags", "-"),
    ];
    assert_eq!(closed(&node1, &to_service), 1.0, "{node1}");

    // a1 -> a2 on node1: one node reports both ends.
    for reporter in ["source", "destination"] {
        let same_node = [
            ("reporter", reporter),
            ("source_workload", "a1"),
            ("destination_workload", "a2"),
            ("source_principal", "spiffe://cluster.local/ns/demo/sa/sa-a"),
            ("connection_security_policy", "mutual_tls"),
            ("response_flags", "-"),
        ];
        assert_eq!(closed(&node1, &same_node), 1.0, "{reporter}: {node1}");
    }
    assert_eq!(
        closed(
            &node2,
            &[("source_workload", "a1"), ("destination_workload", "a2")]
        ),
        0.0
    );

    // The denial and the failure, as each side saw them.
    for (flags, destination_port) in [("DENY", DENIED_PORT), ("CONNECT", CLOSED_PORT)] {
        for (node, text, reporter) in [
            ("node1", &node1, "source"),
            ("node2", &node2, "destination"),
        ] {
            let labels = [
                ("reporter", reporter),
                ("source_workload", "a1"),
                ("destination_workload", "b1"),
                ("response_flags", flags),
            ];
            assert_eq!(
                closed(text, &labels),
                1.0,
                "{node}: {flags} (port {destination_port}): {text}"
            );
        }
    }
}

#[test]
fn ebpf_log_shows_the_capture_decisions() {
    let s = LabSession::start_with(&DaemonOptions {
        ebpf_log: true,
        ..DaemonOptions::default()
    });
    let b1 = serve("b1", APP_PORT);
    let b1_addr = s.addr("b1", APP_PORT);
    let report = send("a1", b1_addr, KIB);
    next_report(&b1);
    let plaintext = send("u1", b1_addr, KIB);
    next_report(&b1);

    // The programs' lines, as the daemon's log has them (IPv4 in its v4-mapped form, as the
    // programs hold every address).
    let lines = |node: &str| -> Vec<String> {
        let prefix = format!("DEBUG {}: ", ztunnel_common::EBPF_LOG_TARGET);
        daemon_log(node)
            .lines()
            .filter_map(|line| line.split_once(&prefix).map(|(_, rest)| rest.to_owned()))
            .collect()
    };
    let v4 = |addr: std::net::SocketAddr| format!("::ffff:{}:{}", addr.ip(), addr.port());
    // a1's connect() on node1, captured to a1's proxy port...
    let captured = format!(
        "connect to ::ffff:{b1_addr} captured: sent to ::ffff:{}:15001 (socket cookie ",
        s.ip("a1")
    );
    // ...and u1's SYN on node2, steered to b1's proxy.
    let steered = format!(
        "connection from {} to ::ffff:{b1_addr} steered to the proxy's 15006",
        v4(plaintext.local)
    );
    eventually("the daemons log the programs' decisions", || {
        lines("node1")
            .iter()
            .any(|line| line.starts_with(&captured))
            && lines("node2").iter().any(|line| line == &steered)
    });
    // sock_ops recorded a1's original destination under its client address.
    let recorded = format!(
        "original destination ::ffff:{b1_addr} recorded for client {}",
        v4(report.local)
    );
    assert!(
        lines("node1")
            .iter()
            .any(|line| line.starts_with(&recorded)),
        "{recorded} in {:#?}",
        lines("node1")
    );
}

#[test]
fn the_admin_api_and_the_cli_show_the_running_node() {
    let s = LabSession::start();
    let _b1 = serve("b1", APP_PORT);
    send("a1", s.addr("b1", APP_PORT), KIB);

    let status = cli("node1", &["status"]);
    assert!(status.starts_with("node node1: ready\n"), "{status}");
    assert!(
        status.contains(&format!("mesh config {MESH_CONFIG}")),
        "{status}"
    );
    assert!(status.contains("outbound_captured"), "{status}");

    let pods = cli("node1", &["pods"]);
    for expected in [
        "demo/a1",
        "demo/a2",
        "spiffe://cluster.local/ns/demo/sa/sa-a",
        "sk_lookup,sock_ops,bind6,bind4,connect6,connect4",
    ] {
        assert!(pods.contains(expected), "{expected} in\n{pods}");
    }
    let pods: serde_json::Value =
        serde_json::from_str(&cli("node1", &["pods", "-o", "json"])).unwrap();
    assert_eq!(pods.as_array().unwrap().len(), 2);

    let workloads = cli("node2", &["workloads"]);
    assert!(workloads.contains("legacy/u1"), "{workloads}");
    assert!(workloads.contains("HBONE"), "{workloads}");
    assert_eq!(
        cli("node2", &["services"]).lines().count(),
        1,
        "the lab's config has no services: only the header"
    );
    assert!(cli("node2", &["policies"]).starts_with("POLICY"));

    let certs = cli("node1", &["certs"]);
    assert!(
        certs.contains("spiffe://cluster.local/ns/demo/sa/sa-a"),
        "{certs}"
    );
    let certs: serde_json::Value =
        serde_json::from_str(&cli("node1", &["certs", "-o", "json"])).unwrap();
    assert!(certs[0]["expires_unix"].as_u64().unwrap() > ztunnel_user::host::process::unix_now());

    let connections = cli("node1", &["connections"]);
    assert!(connections.contains("outbound"), "{connections}");
    assert!(
        connections.contains(&s.addr("b1", APP_PORT).to_string()),
        "{connections}"
    );

    // The config dump has everything, and the log level changes at run time.
    let dump: serde_json::Value =
        serde_json::from_str(&curl("node1", &["http://127.0.0.1:15000/config_dump"]).unwrap())
            .unwrap();
    assert!(dump["not_ready"].is_null());
    // The settings the daemon runs with, as the lab's command line gave them.
    assert_eq!(dump["settings"]["node"], "node1");
    assert_eq!(dump["settings"]["config"], MESH_CONFIG);
    assert_eq!(dump["settings"]["capture"], "ebpf");
    assert_eq!(dump["workloads"].as_array().unwrap().len(), PODS.len());
    assert_eq!(
        dump["pods"][0]["links"].as_array().unwrap().len(),
        HOOKS_PER_POD
    );
    assert!(dump["pods"][0].get("waiting").is_none(), "{dump}");
    // A change needs a header no browser form or plain link can send (a page on the node
    // cannot stop the daemon or raise its log level).
    for path in ["/logging?level=debug", "/quitquitquit"] {
        let refused = curl(
            "node1",
            &["-X", "POST", &format!("http://127.0.0.1:15000{path}")],
        )
        .unwrap_err();
        assert!(refused.starts_with("403"), "{path}: {refused}");
    }
    assert_eq!(
        curl("node1", &["http://127.0.0.1:15000/logging"]).unwrap(),
        "log level: info\n"
    );
    let admin = ["-X", "POST", "-H", "x-ztunnel-admin: true"];
    let changed = curl(
        "node1",
        &[&admin[..], &["http://127.0.0.1:15000/logging?level=debug"]].concat(),
    )
    .unwrap();
    assert_eq!(changed, "log level: debug\n");
    let refused = curl(
        "node1",
        &[
            &admin[..],
            &["http://127.0.0.1:15000/logging?level=no=such=level"],
        ]
        .concat(),
    )
    .unwrap_err();
    assert!(refused.starts_with("400"), "{refused}");
    assert_eq!(
        curl("node1", &["http://127.0.0.1:15000/logging"]).unwrap(),
        "log level: debug\n"
    );
    // The admin API is on localhost only: not reachable on the node's underlay address.
    let underlay = node_spec("node1").unwrap().underlay_ip;
    assert!(curl("node2", &[&format!("http://{underlay}:15000/config_dump")]).is_err());
}

#[test]
fn readiness_waits_for_the_mesh_config() {
    let _s = LabSession::start();
    let ready = |node: &str| curl(node, &["http://127.0.0.1:15021/healthz/ready"]);
    assert_eq!(ready("node2"), Ok("ready\n".to_owned()));

    // node2's daemon starts while the config file is missing (b1 is deleted first, so that it
    // can be added again below).
    ztunnel_lab::cni_del("b1").unwrap();
    ztunnel_lab::stop_daemon("node2").unwrap();
    let kept = format!("{MESH_CONFIG}.kept");
    std::fs::rename(MESH_CONFIG, &kept).unwrap();
    ztunnel_lab::start_daemon_until("node2", Started::Answering).unwrap();
    let missing = ready("node2").unwrap_err();
    assert!(
        missing.starts_with("503: not ready: waiting for the mesh config"),
        "{missing}"
    );
    let status = cli("node2", &["status"]);
    assert!(status.starts_with("node node2: NOT READY"), "{status}");
    // Enrolling a pod now would give it the wrong identity: the CNI plugin is refused.
    let refused = ztunnel_lab::cni_add("b1").unwrap_err().to_string();
    assert!(refused.contains("not ready"), "{refused}");
    // As a runtime does after a failed ADD.
    ztunnel_lab::cni_del("b1").unwrap();

    // The file comes back: ready within a poll or two, and enrollment works again.
    std::fs::rename(&kept, MESH_CONFIG).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ready("node2").is_err() {
        assert!(Instant::now() < deadline, "node2 did not become ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    ztunnel_lab::cni_add("b1").unwrap();
    assert!(cli("node2", &["pods"]).contains("demo/b1"));
}

#[test]
fn drain_lets_open_streams_finish_and_refuses_new_connections() {
    let s = LabSession::start();
    let b1 = serve("b1", APP_PORT);
    let to = s.addr("b1", APP_PORT);
    // A transfer that holds its connection open for 3 s halfway through.
    let transfer = send_pausing(
        "a1",
        to,
        4 * MIB,
        Duration::from_secs(3),
        Duration::from_secs(30),
    );
    eventually("the transfer is open at b1", || {
        connections(&s.lab, "node2").iter().any(|c| c.open)
    });
    let stopping = std::thread::spawn(|| ztunnel_lab::stop_daemon("node2"));
    eventually("node2's daemon drains", || {
        daemon_log("node2").contains("draining;")
    });
    // Draining: not ready, and every new connection is refused (b1's listeners are closed,
    // the kernel answers), while the open transfer goes on.
    let readiness = curl("node2", &["http://127.0.0.1:15021/healthz/ready"]);
    assert!(
        readiness.as_ref().is_err_and(|e| e.starts_with("503")),
        "{readiness:?}"
    );
    for _ in 0..3 {
        // node1's proxy finds node2's HBONE listener closed and resets a1's connection at
        // once (a timeout would mean something still took it).
        denied("a1", to);
    }
    let report = transfer
        .join()
        .unwrap()
        .expect("the open transfer finished intact");
    assert_eq!(report.server.bytes, 4 * MIB);
    stopping
        .join()
        .unwrap()
        .expect("node2's daemon exited once the transfer was done");
    // b1 got the transfer, and nothing else.
    let mut received = Vec::new();
    while let Ok(report) = b1.next_report(Duration::from_millis(500)) {
        received.push(report.bytes);
    }
    assert_eq!(received, [4 * MIB]);
    let log = std::fs::read_to_string(node_spec("node2").unwrap().log_path()).unwrap();
    assert!(log.contains("drained: every connection finished"), "{log}");
}

/// `/quitquitquit` drains as SIGTERM does, and the drain lasts `--drain-timeout-secs` at most:
/// a transfer still open then is cut, and the daemon exits at the deadline, not when the
/// transfer would have ended.
#[test]
fn quitquitquit_drains_until_the_drain_timeout_then_cuts_what_is_open() {
    let s = LabSession::start_with(&DaemonOptions {
        env: vec![("ZTUNNEL_DRAIN_TIMEOUT_SECS".into(), "1".into())],
        ..DaemonOptions::default()
    });
    let b1 = serve("b1", APP_PORT);
    let to = s.addr("b1", APP_PORT);
    let pid = ztunnel_lab::daemon_pid("node2").expect("node2's daemon");
    // Paused far longer than the drain may last.
    let transfer = send_pausing(
        "a1",
        to,
        4 * MIB,
        Duration::from_secs(8),
        Duration::from_secs(10),
    );
    eventually("the transfer is open at b1", || {
        connections(&s.lab, "node2").iter().any(|c| c.open)
    });
    let admin = ["-X", "POST", "-H", "x-ztunnel-admin: true"];
    curl(
        "node2",
        &[&admin[..], &["http://127.0.0.1:15000/quitquitquit"]].concat(),
    )
    .expect("/quitquitquit");
    eventually_within(
        "node2's daemon exits at the drain deadline, the transfer still paused",
        Duration::from_secs(5),
        || ztunnel_lab::daemon_pid("node2") != Some(pid),
    );
    let log = std::fs::read_to_string(node_spec("node2").unwrap().log_path()).unwrap();
    assert!(log.contains("reason=\"/quitquitquit\""), "{log}");
    assert!(
        log.contains(
            "drain deadline reached; closing the connections still open connections=1 hbone=1"
        ),
        "{log}"
    );
    // b1 got the first half only, and a1's sender learns its connection is gone.
    let report = b1
        .next_report(Duration::from_secs(5))
        .expect("b1's report of the cut connection");
    assert_eq!(report.bytes, 2 * MIB);
    let cut = transfer.join().unwrap();
    assert!(cut.is_err(), "{cut:?}");
}

/// A config file that is there but invalid when the daemon starts: up, not ready, saying which
/// entry and field are wrong, until the file is fixed.
#[test]
fn an_invalid_mesh_config_at_start_keeps_the_daemon_not_ready_until_fixed() {
    let _s = LabSession::start();
    let ready = |node: &str| curl(node, &["http://127.0.0.1:15021/healthz/ready"]);
    ztunnel_lab::stop_daemon("node2").unwrap();
    let good = std::fs::read_to_string(MESH_CONFIG).unwrap();
    let bad = good.replacen("protocol: HBONE", "protocol: SOMETIMES", 1);
    assert_ne!(bad, good);
    ztunnel_lab::mesh::write_mesh_config_text(&bad).unwrap();
    ztunnel_lab::start_daemon_until("node2", Started::Answering).unwrap();
    let refused = ready("node2").unwrap_err();
    assert!(refused.starts_with("503: not ready"), "{refused}");
    let status: serde_json::Value =
        serde_json::from_str(&cli("node2", &["status", "-o", "json"])).unwrap();
    let rejected = status["mesh"]["config"]["rejected"]
        .as_str()
        .unwrap_or_default();
    assert!(
        rejected.contains("workloads[0].protocol") && rejected.contains("SOMETIMES"),
        "{status}"
    );

    ztunnel_lab::mesh::write_mesh_config_text(&good).unwrap();
    eventually("node2 is ready with the fixed file", || {
        ready("node2").is_ok()
    });
}
