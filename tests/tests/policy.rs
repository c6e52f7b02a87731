//! Authorization on real traffic: policies in the lab's mesh config, changed while the daemons
//! run (hot reload), enforced on HBONE (401), on plaintext (closed, or refused by `sk_lookup`
//! in the kernel) and on the same-node path; open connections closed when a new policy denies
//! them; the kernel's workload map following the config.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;
use support::*;
use ztunnel_common::maps::names;
use ztunnel_common::maps::{
    WORKLOAD_HAS_WAYPOINT, WORKLOAD_IN_MESH, WORKLOAD_ON_THIS_NODE, WORKLOAD_PLAINTEXT_RULES,
};
use ztunnel_lab::mesh::MeshChanges;
use ztunnel_lab::send_from;
use ztunnel_user::api::Direction;

const OTHER_PORT: u16 = 9090;

fn policies(yaml: &'static str) -> MeshChanges<'static> {
    MeshChanges {
        sections: yaml,
        ..MeshChanges::default()
    }
}

fn counter(s: &LabSession, node: &str, name: &str) -> u64 {
    counters(&s.lab, node).get(name).copied().unwrap_or(0)
}

/// Inbound records on `node` whose client is `pod`.
fn inbound_from(s: &LabSession, node: &str, pod: &str) -> usize {
    let ip = s.ip(pod);
    connections(&s.lab, node)
        .iter()
        .filter(|c| c.direction == Direction::Inbound && c.source.ip() == ip)
        .count()
}

#[test]
fn allow_by_principal_and_port_across_nodes_and_on_the_same_node() {
    let s = LabSession::start();
    let b1_app = serve("b1", APP_PORT);
    let _b1_other = serve("b1", OTHER_PORT);
    let a1_other = serve("a1", OTHER_PORT);
    let a2_app = serve("a2", APP_PORT);
    apply_mesh(
        &s.lab,
        &policies(
            "policies:
- name: sa-a-to-app-port
  namespace: demo
  scope: Namespace
  action: Allow
  rules:
  - - - principals: [{Exact: cluster.local/ns/demo/sa/sa-a}]
        destinationPorts: [8080]
",
        ),
    );

    // Cross node over HBONE: the principal and port match.
    let report = send("a1", s.addr("b1", APP_PORT), 64 * KIB);
    assert_eq!(report.server.peer.ip(), s.ip("a1"));
    assert_eq!(next_report(&b1_app).bytes, 64 * KIB);
    // Another port: b1's proxy answers 401 and a1's proxy closes the client's connection.
    denied("a1", s.addr("b1", OTHER_PORT));
    let refused = closed_connections(&s.lab, "node1", Direction::Outbound);
    let to_other = refused
        .iter()
        .find(|c| c.original_destination.port() == OTHER_PORT)
        .expect("a1's outbound record to b1:9090");
    let error = to_other.error.as_deref().unwrap_or_default();
    assert!(error.contains("401"), "{error}");

    // Same node: a2 takes sa-a on its app port, but not on another port.
    send("a1", s.addr("a2", APP_PORT), 64 * KIB);
    assert_eq!(next_report(&a2_app).peer.ip(), s.ip("a1"));
    denied("a2", s.addr("a1", OTHER_PORT));
    assert!(
        a1_other.next_report(Duration::from_millis(500)).is_err(),
        "the denied same-node connection reached the app"
    );

    // A plaintext client has no principal: refused by sk_lookup before the proxy sees it.
    let before = counter(&s, "node2", "inbound_denied_needs_identity");
    let error = denied("u1", s.addr("b1", APP_PORT));
    assert!(error.contains("refused"), "{error}");
    assert_eq!(
        counter(&s, "node2", "inbound_denied_needs_identity"),
        before + 1
    );
    assert_eq!(inbound_from(&s, "node2", "u1"), 0, "the proxy saw u1");
}

#[test]
fn deny_by_source_ip_namespace_and_selected_workload() {
    let s = LabSession::start();
    let b1_app = serve("b1", APP_PORT);
    let b1_other = serve("b1", OTHER_PORT);
    let _a2_app = serve("a2", APP_PORT);
    let a1 = s.ip("a1");
    let sections = format!(
        "policies:
- name: not-from-a1
  namespace: demo
  scope: Namespace
  action: Deny
  rules:
  - - - sourceIps: [{a1}/32]
- name: other-port-mesh-only
  namespace: demo
  scope: Namespace
  action: Deny
  rules:
  - - - notNamespaces: [{{Exact: demo}}]
        destinationPorts: [{OTHER_PORT}]
- name: a2-closed
  namespace: demo
  scope: WorkloadSelector
  action: Deny
  rules:
  - []
"
    );
    apply_mesh(
        &s.lab,
        &MeshChanges {
            workload_fields: &[("a2", "  authorizationPolicies: [demo/a2-closed]\n")],
            sections: &sections,
            ..MeshChanges::default()
        },
    );

    // By source IP, over HBONE: a1 is denied, a2 (same identity) is not.
    denied("a1", s.addr("b1", APP_PORT));
    send("a2", s.addr("b1", APP_PORT), 64 * KIB);
    assert_eq!(next_report(&b1_app).peer.ip(), s.ip("a2"));
    // By namespace: a2 is in demo; u1 has no identity, so no namespace: the kernel refuses it
    // on the port the DENY names and lets it through on the others.
    send("a2", s.addr("b1", OTHER_PORT), 64 * KIB);
    next_report(&b1_other);
    let before = counter(&s, "node2", "inbound_denied_by_policy");
    let error = denied("u1", s.addr("b1", OTHER_PORT));
    assert!(error.contains("refused"), "{error}");
    assert_eq!(counter(&s, "node2", "inbound_denied_by_policy"), before + 1);
    send("u1", s.addr("b1", APP_PORT), 64 * KIB);
    assert_eq!(next_report(&b1_app).peer.ip(), s.ip("u1"));
    // The WorkloadSelector policy with an empty clause denies everything to a2 and nothing
    // to the workloads it does not select.
    denied("a1", s.addr("a2", APP_PORT));
    denied("b1", s.addr("a2", APP_PORT));
}

#[test]
fn open_connections_are_closed_when_a_new_policy_denies_them() {
    let s = LabSession::start();
    let _b1_app = serve("b1", APP_PORT);
    // Two long transfers into b1: over HBONE from a1, plaintext from u1.
    let transfers: Vec<_> = ["a1", "u1"]
        .into_iter()
        .map(|pod| {
            let to = s.addr("b1", APP_PORT);
            std::thread::spawn(move || {
                send_from(pod, to, 64 * 1024 * MIB, None, Duration::from_secs(60))
            })
        })
        .collect();
    eventually("both transfers are open at b1", || {
        ["a1", "u1"].iter().all(|pod| {
            let ip = s.ip(pod);
            connections(&s.lab, "node2")
                .iter()
                .any(|c| c.direction == Direction::Inbound && c.open && c.source.ip() == ip)
        })
    });
    let (a1, u1) = (s.ip("a1"), s.ip("u1"));
    let sections = format!(
        "policies:
- {{name: stop, namespace: demo, scope: Namespace, action: Deny,
   rules: [[[{{sourceIps: [{a1}/32, {u1}/32]}}]]]}}
"
    );
    apply_mesh(
        &s.lab,
        &MeshChanges {
            sections: &sections,
            ..MeshChanges::default()
        },
    );
    for transfer in transfers {
        let outcome = transfer.join().unwrap();
        assert!(
            outcome.is_err(),
            "a transfer outlived the policy: {outcome:?}"
        );
    }
    let closed = closed_connections(&s.lab, "node2", Direction::Inbound);
    for pod in ["a1", "u1"] {
        let ip = s.ip(pod);
        let record = closed
            .iter()
            .find(|c| c.source.ip() == ip)
            .expect("b1's record of the transfer");
        let error = record.error.as_deref().unwrap_or_default();
        assert!(error.contains("now denies"), "{pod}: {error}");
    }
}

#[test]
fn hot_reload_keeps_the_kernel_map_in_step_and_refuses_bad_files() {
    // The file's refusal and versions are what is checked.
    let s = LabSession::start_from_file();
    // A burst of changes, as fast as the file can be rewritten: extra workloads come and
    // go, identities are shared and split, a waypoint and plaintext rules appear.
    for round in 0..20u32 {
        let extra = extra_workloads(round);
        let changes = MeshChanges {
            extra_workloads: &extra,
            ..MeshChanges::default()
        };
        ztunnel_lab::mesh::write_mesh_config_text(&ztunnel_lab::mesh::mesh_config_with(&changes))
            .unwrap();
        std::thread::sleep(Duration::from_millis(150 * u64::from(round % 4)));
    }
    let (extra, u1) = (extra_workloads(1), s.ip("u1"));
    let policy = format!(
        "policies:\n- {{name: no-u1, namespace: demo, scope: Namespace, action: Deny, rules: [[[{{sourceIps: [{u1}/32]}}]]]}}\n"
    );
    apply_mesh(
        &s.lab,
        &MeshChanges {
            workload_fields: &[("b1", "  waypoint: {destination: /10.244.2.4}\n")],
            extra_workloads: &extra,
            sections: &policy,
            ..MeshChanges::default()
        },
    );
    for node in NODES {
        assert_kernel_matches_config(&s, node);
    }

    // A bad file is refused with the reason, and the config in force stays.
    let before = mesh_status(&s.lab, "node2");
    for (bad, reason) in [
        ("workloads: [\n", "mesh config /run/ztunnel-lab/mesh.yaml"),
        (
            "workloads:\n- {uid: x, name: x, namespace: n, workloadIps: [10.9.0.1]}\n- {uid: x, name: y, namespace: n, workloadIps: [10.9.0.2]}\n",
            "workload #1 (n/y): field uid x is used by an earlier workload",
        ),
    ] {
        ztunnel_lab::mesh::write_mesh_config_text(bad).unwrap();
        eventually("node2 refused the bad file", || {
            mesh_status(&s.lab, "node2")
                .config
                .rejected
                .is_some_and(|r| r.contains(reason))
        });
        let after = mesh_status(&s.lab, "node2");
        assert_eq!(after.config.version, before.config.version);
        assert_eq!(after.config.generation, before.config.generation);
        assert_eq!(after.workloads, before.workloads);
        assert_kernel_matches_config(&s, "node2");
    }
    // The config in force still holds: u1 is refused in the kernel as the last good file says.
    let error = denied("u1", s.addr("b1", APP_PORT));
    assert!(error.contains("refused"), "{error}");
}

/// Kernel writes that fail (a frozen map here; a full one fails alike): without the plaintext
/// rules the config still applies and the proxy alone enforces them; when the workloads map
/// cannot be written either, the config is refused on that node, which keeps the one in force,
/// in the kernel and in the proxy alike, and says why.
#[test]
fn a_failed_kernel_map_write_keeps_kernel_and_proxy_on_one_config() {
    // The file's refusal and versions are what is checked.
    let s = LabSession::start_from_file();
    let _b1 = serve("b1", APP_PORT);
    let (u1, b1) = (s.ip("u1"), s.addr("b1", APP_PORT));
    let deny_u1 = format!(
        "policies:\n- {{name: no-u1, namespace: demo, scope: Namespace, action: Deny, rules: [[[{{sourceIps: [{u1}/32]}}]]]}}\n"
    );
    freeze_map(&s, "node2", names::PLAINTEXT_RULES);
    apply_mesh(
        &s.lab,
        &MeshChanges {
            sections: &deny_u1,
            ..MeshChanges::default()
        },
    );
    assert!(daemon_log("node2").contains("cannot write the plaintext rules to the kernel"));
    assert_kernel_is_daemon_view(&s, "node2");
    let b1_entry = kernel_workloads(&s.lab, "node2")[&IpAddr::V4(*b1.ip())];
    assert_eq!(
        b1_entry.flags & WORKLOAD_PLAINTEXT_RULES,
        0,
        "no rules in the kernel"
    );
    // Denied by b1's proxy (accepted, then closed), not refused in the kernel.
    let error = denied("u1", b1);
    assert!(!error.contains("Connection refused"), "{error}");

    freeze_map(&s, "node2", names::WORKLOADS);
    let before = mesh_status(&s.lab, "node2");
    // Without the policy, and with one more workload (an entry to write).
    let text = ztunnel_lab::mesh::mesh_config_with(&MeshChanges {
        extra_workloads: &extra_workloads(0),
        ..MeshChanges::default()
    });
    ztunnel_lab::mesh::write_mesh_config_text(&text).unwrap();
    let version = ztunnel_user::mesh::config::reload::version_of(&text);
    eventually("node1 applies the config, node2 refuses it", || {
        mesh_status(&s.lab, "node1").config.version == version
            && mesh_status(&s.lab, "node2").config.rejected.is_some()
    });
    let after = mesh_status(&s.lab, "node2");
    let rejected = after.config.rejected.clone().unwrap_or_default();
    assert!(rejected.contains(names::WORKLOADS), "{rejected}");
    assert_eq!(after.config.version, before.config.version);
    assert_eq!(after.config.generation, before.config.generation);
    assert_eq!(after.workloads, before.workloads);
    assert_kernel_is_daemon_view(&s, "node2");
    // The policy the refused file dropped is still enforced where it is in force.
    denied("u1", b1);
}

/// Freezes `node`'s pinned map `name`: from now on every write to it from userspace fails.
fn freeze_map(s: &LabSession, node: &str, name: &str) {
    let path = s.lab.node(node).unwrap().bpffs.join("maps").join(name);
    let output = std::process::Command::new("bpftool")
        .args(["map", "freeze", "pinned"])
        .arg(&path)
        .output()
        .expect("running bpftool (cargo xtask setup installs it)");
    assert!(
        output.status.success(),
        "bpftool map freeze {}: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Workloads `extra-0..n` for a round of the burst, on both nodes, some sharing an identity.
fn extra_workloads(round: u32) -> String {
    (0..1 + round % 5)
        .map(|i| {
            let node = if (i + round).is_multiple_of(2) { "node1" } else { "node2" };
            let account = if i.is_multiple_of(2) { "shared".to_owned() } else { format!("own-{i}") };
            format!(
                "- {{uid: extra-{i}, name: extra-{i}, namespace: extra, serviceAccount: {account}, workloadIps: [10.250.0.{}], protocol: HBONE, node: {node}}}\n",
                10 + i
            )
        })
        .collect()
}

/// The kernel's workload map of `node` is exactly the daemon's view of the config in force
/// (`assert_kernel_is_daemon_view`), and its flags say what the burst's last config says.
fn assert_kernel_matches_config(s: &LabSession, node: &str) {
    let flags = assert_kernel_is_daemon_view(s, node);
    let flags = |pod: &str| flags[&s.ip(pod)];
    assert_ne!(flags("b1") & WORKLOAD_IN_MESH, 0);
    assert_eq!(flags("u1") & WORKLOAD_IN_MESH, 0);
    assert_ne!(flags("b1") & WORKLOAD_HAS_WAYPOINT, 0);
    assert_eq!(flags("a1") & WORKLOAD_HAS_WAYPOINT, 0);
    let here = |pod: &str| flags(pod) & WORKLOAD_ON_THIS_NODE != 0;
    assert_eq!(here("a1"), node == "node1");
    assert_eq!(here("b1"), node == "node2");
    // The DENY for u1 gives this node's demo workloads plaintext rules.
    let rules = |pod: &str| flags(pod) & WORKLOAD_PLAINTEXT_RULES != 0;
    assert_eq!(rules("b1"), node == "node2");
    assert_eq!(rules("a1"), node == "node1");
    assert!(
        !rules("u1"),
        "u1 is in namespace legacy, which the policy does not cover"
    );
}

/// The kernel's workload map of `node` is exactly the daemon's view of the config in force:
/// the same addresses, indices and flags, one index per uid and per identity. Returns the
/// flags of each address.
fn assert_kernel_is_daemon_view(s: &LabSession, node: &str) -> BTreeMap<IpAddr, u32> {
    let status = mesh_status(&s.lab, node);
    let kernel = kernel_workloads(&s.lab, node);
    let mut expected = BTreeMap::new();
    let mut identity_indices = BTreeMap::new();
    for workload in &status.workloads {
        let previous = identity_indices.insert(workload.identity.clone(), workload.identity_index);
        assert!(
            previous.is_none_or(|p| p == workload.identity_index),
            "{node}: identity {} has two indices",
            workload.identity
        );
        for ip in &workload.addresses {
            expected.insert(
                *ip,
                (
                    workload.workload_index,
                    workload.identity_index,
                    workload.flags,
                ),
            );
        }
    }
    let distinct: HashSet<u32> = identity_indices.values().copied().collect();
    assert_eq!(
        distinct.len(),
        identity_indices.len(),
        "{node}: shared identity index"
    );
    let actual: BTreeMap<IpAddr, (u32, u32, u32)> = kernel
        .iter()
        .map(|(ip, e)| (*ip, (e.workload, e.identity, e.flags)))
        .collect();
    assert_eq!(actual, expected, "{node}: kernel and daemon disagree");
    actual
        .into_iter()
        .map(|(ip, (_, _, flags))| (ip, flags))
        .collect()
}
