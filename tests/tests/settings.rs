//! Settings that change what the daemon captures and reports, end to end: exclusions by port
//! and CIDR, the access log's format and destination, the capacity of the workloads' kernel
//! map, and a mesh config that is invalid (not missing) at start.

mod support;

use std::time::Duration;
use support::*;
use ztunnel_lab::DaemonOptions;
use ztunnel_lab::mesh::{MeshChanges, mesh_config_with, write_mesh_config_text};
use ztunnel_user::api::Direction;

const EXCLUDED_PORT: u16 = 9090;
const EXCLUDED_INBOUND_PORT: u16 = 9091;
/// `--max-workload-addresses` for the capacity test: room for the lab's workloads (14
/// addresses: seven pods, dual stack) and a few.
const WORKLOAD_CAPACITY: usize = 24;

fn with_env(env: &[(&str, &str)]) -> DaemonOptions {
    DaemonOptions {
        env: env
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect(),
        ..DaemonOptions::default()
    }
}

/// What the daemons' exclusions leave alone goes straight to its destination: no proxy, no
/// record, the kernel's counter says why; everything else is still proxied. Outbound and
/// inbound exclusions are separate, as Istio's: a port excluded outbound is still captured
/// at a destination pod.
#[test]
fn excluded_ports_and_cidrs_skip_capture() {
    // node2's own address: a destination outside the mesh that answers (its readiness port).
    let node2 = ztunnel_lab::topology::node_spec("node2")
        .expect("node2")
        .underlay_ip;
    let cidr = format!("{node2}/32");
    let s = LabSession::start_with(&with_env(&[
        ("ZTUNNEL_EXCLUDE_PORTS", &EXCLUDED_PORT.to_string()),
        ("ZTUNNEL_EXCLUDE_CIDRS", &cidr),
        (
            "ZTUNNEL_EXCLUDE_INBOUND_PORTS",
            &EXCLUDED_INBOUND_PORT.to_string(),
        ),
    ]));
    let _b1_excluded = serve("b1", EXCLUDED_PORT);
    let _b1_inbound = serve("b1", EXCLUDED_INBOUND_PORT);
    let _b1 = serve("b1", APP_PORT);

    // Outbound by port, outbound by CIDR, inbound by port.
    send("a1", s.addr("b1", EXCLUDED_PORT), KIB);
    let readiness = format!("http://{node2}:15021/healthz/ready");
    assert_eq!(
        run_in("a1", &["curl", "-sS", "--max-time", "5", &readiness]),
        "ready\n"
    );
    send("u1", s.addr("b1", EXCLUDED_INBOUND_PORT), KIB);
    // a1's proxy carried nothing; b1's port 9090 is not excluded inbound, so a1's connection
    // arrived there in plaintext, with no identity, where HBONE would have carried sa-a.
    let node1 = connections(&s.lab, "node1");
    assert!(node1.is_empty(), "node1 proxied {node1:?}");
    let node2 = connections(&s.lab, "node2");
    assert_eq!(node2.len(), 1, "{node2:?}");
    assert_eq!(
        node2[0].original_destination,
        s.addr("b1", EXCLUDED_PORT).into()
    );
    assert_eq!(node2[0].source_identity, "unknown");
    let (node1, node2) = (counters(&s.lab, "node1"), counters(&s.lab, "node2"));
    assert_eq!(node1["outbound_bypass_excluded_port"], 1);
    assert_eq!(node1["outbound_bypass_excluded_cidr"], 1);
    assert_eq!(node2["inbound_bypass_excluded_port"], 1);

    // Everything else is still captured.
    send("a1", s.addr("b1", APP_PORT), KIB);
    send("u1", s.addr("b1", APP_PORT), KIB);
    assert_eq!(
        closed_connections(&s.lab, "node1", Direction::Outbound).len(),
        1
    );
    // With a1's plaintext one to 9090 above.
    assert_eq!(
        closed_connections(&s.lab, "node2", Direction::Inbound).len(),
        3
    );
}

/// JSON lines to a file, or nothing at all.
#[test]
fn access_logs_go_where_and_as_they_are_told() {
    let file = "/run/ztunnel-lab/access.log";
    let s = LabSession::start_with(&with_env(&[
        ("ZTUNNEL_ACCESS_LOG_FORMAT", "json"),
        ("ZTUNNEL_ACCESS_LOG", file),
    ]));
    let _b1 = serve("b1", APP_PORT);
    send("a1", s.addr("b1", APP_PORT), KIB);
    let logged = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).expect("a JSON line"))
            .collect()
    };
    eventually("both sides logged the connection", || logged().len() == 2);
    let entries = logged();
    assert!(
        entries.iter().all(|e| e["bytes_sent"] == KIB),
        "{entries:?}"
    );
    let mut directions: Vec<&str> = entries
        .iter()
        .map(|e| e["direction"].as_str().unwrap())
        .collect();
    directions.sort();
    assert_eq!(directions, ["inbound", "outbound"]);
    // Not in the daemons' own logs.
    for node in NODES {
        assert!(!daemon_log(node).contains("connection complete"));
    }
    drop(s);

    let s = LabSession::start_with(&with_env(&[("ZTUNNEL_ACCESS_LOG_FORMAT", "off")]));
    let _b1 = serve("b1", APP_PORT);
    send("a1", s.addr("b1", APP_PORT), KIB);
    assert_eq!(
        closed_connections(&s.lab, "node2", Direction::Inbound).len(),
        1
    );
    std::thread::sleep(Duration::from_millis(500));
    for node in NODES {
        let log = daemon_log(node);
        assert!(!log.contains("connection complete"), "{node}: {log}");
    }
}

/// A mesh config with more workload addresses than `ZT_WORKLOADS` holds (a setting) is refused
/// with the map, its capacity and the setting to raise; the daemon stays up with the config in
/// force, in its model and in the kernel, and traffic goes on; a config that fits again is
/// applied.
#[test]
fn a_mesh_beyond_the_workload_capacity_is_refused_naming_the_setting() {
    let s = LabSession::start_with(&with_env(&[(
        "ZTUNNEL_MAX_WORKLOAD_ADDRESSES",
        &WORKLOAD_CAPACITY.to_string(),
    )]));
    let _b1 = serve("b1", APP_PORT);
    let lab_addresses = kernel_workloads(&s.lab, "node1").len();
    assert!(lab_addresses + 2 < WORKLOAD_CAPACITY, "{lab_addresses}");
    let before = mesh_status(&s.lab, "node1");

    let beyond = extra_workloads(WORKLOAD_CAPACITY + 1 - lab_addresses);
    write_mesh_config_text(&mesh_config_with(&MeshChanges {
        extra_workloads: &beyond,
        ..MeshChanges::default()
    }))
    .unwrap();
    for node in NODES {
        eventually(&format!("{node} refused the config"), || {
            mesh_status(&s.lab, node)
                .config
                .rejected
                .is_some_and(|r| r.contains("ZT_WORKLOADS is full"))
        });
    }
    let after = mesh_status(&s.lab, "node1");
    let rejected = after.config.rejected.clone().unwrap_or_default();
    for needed in [
        "ZT_WORKLOADS",
        &format!("{WORKLOAD_CAPACITY} entries"),
        "--max-workload-addresses",
        "ZTUNNEL_MAX_WORKLOAD_ADDRESSES",
    ] {
        assert!(rejected.contains(needed), "{needed} in {rejected}");
    }
    assert!(
        daemon_log("node1").contains(&rejected),
        "the refusal is logged"
    );
    assert_eq!(after.config.version, before.config.version);
    assert_eq!(after.config.generation, before.config.generation);
    assert_eq!(after.workloads, before.workloads);
    assert_eq!(kernel_workloads(&s.lab, "node1").len(), lab_addresses);
    assert!(
        ztunnel_lab::daemon_pid("node1").is_some(),
        "node1's daemon is up"
    );
    send("a1", s.addr("b1", APP_PORT), KIB);

    let fits = extra_workloads(WORKLOAD_CAPACITY - 1 - lab_addresses);
    apply_mesh(
        &s.lab,
        &MeshChanges {
            extra_workloads: &fits,
            ..MeshChanges::default()
        },
    );
    assert_eq!(
        kernel_workloads(&s.lab, "node1").len(),
        WORKLOAD_CAPACITY - 1
    );
    send("a1", s.addr("b1", APP_PORT), KIB);
}

/// `count` workloads of another node, an address each.
fn extra_workloads(count: usize) -> String {
    (0..count)
        .map(|i| {
            format!(
                "- {{uid: extra-{i}, name: extra-{i}, namespace: extra, workloadIps: [10.250.0.{}], protocol: HBONE, node: node9}}\n",
                10 + i
            )
        })
        .collect()
}
