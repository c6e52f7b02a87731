//! The model: parsing, lookups, and batches of changes.

use super::*;
use std::collections::HashSet;

pub(super) const FILE: &str = "mesh.yaml";

pub(super) fn parse(text: &str) -> Result<MeshConfig, ConfigError> {
    MeshConfig::parse(Path::new(FILE), text)
}

pub(super) fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

#[test]
fn an_istio_style_workload_list() {
    let config = parse(
        "workloads:\n\
         - uid: cluster1//v1/Pod/demo/a1\n  name: a1\n  namespace: demo\n  serviceAccount: sa-a\n  \
           workloadIps: [10.244.1.2]\n  protocol: HBONE\n  node: node1\n  network: ''\n  \
           canonicalName: a\n  clusterId: Kubernetes\n\
         - uid: legacy-u1\n  name: u1\n  namespace: legacy\n  workloadIps: [10.244.2.3]\n",
    )
    .unwrap();
    let a1 = config
        .workload_by_ip("10.244.1.2".parse().unwrap())
        .unwrap();
    assert_eq!(a1.protocol, Protocol::Hbone);
    assert_eq!(
        a1.identity().to_string(),
        "spiffe://cluster.local/ns/demo/sa/sa-a"
    );
    let u1 = config.workload_by_uid("legacy-u1").unwrap();
    assert_eq!(
        (u1.protocol, u1.service_account.as_str()),
        (Protocol::Tcp, "default")
    );
    assert!(config.workload_by_ip("10.0.0.1".parse().unwrap()).is_none());
}

pub(super) const SERVICES: &str = "\
workloads:
- {uid: e1, name: e1, namespace: demo, workloadIps: [10.0.1.1], protocol: HBONE,
   services: {demo/echo.demo.svc: {80: 8081}}}
- {uid: e2, name: e2, namespace: demo, workloadIps: [10.0.2.1], protocol: HBONE,
   services: {demo/echo.demo.svc: {}}}
- {uid: e3, name: e3, namespace: demo, workloadIps: [10.0.2.2], status: Unhealthy,
   services: {demo/echo.demo.svc: {}}}
- {uid: wp, name: wp, namespace: demo, serviceAccount: waypoint, workloadIps: [10.0.2.9],
   protocol: HBONE}
- {uid: b1, name: b1, namespace: demo, workloadIps: [10.0.2.5], protocol: HBONE,
   waypoint: {destination: /10.0.2.9, hboneMtlsPort: 15008}}
services:
- name: echo
  namespace: demo
  hostname: echo.demo.svc
  vips: [/10.96.0.10]
  ports: {80: 8080, 81: 0}
  subjectAltNames: [spiffe://cluster.local/ns/demo/sa/extra]
- name: waypointed
  namespace: demo
  hostname: w.demo.svc
  vips: [10.96.0.11]
  ports: {80: 8080}
  waypoint: {destination: {namespace: demo, hostname: echo.demo.svc}}
";

#[test]
fn services_resolve_to_healthy_endpoints_with_their_target_ports() {
    let config = parse(SERVICES).unwrap();
    assert!(config.service_at(addr("10.96.0.10:90")).is_none());
    let echo = config.service_at(addr("10.96.0.10:80")).unwrap();
    let mut seen = HashSet::new();
    for _ in 0..200 {
        let endpoint = config
            .pick_endpoint(echo, None, addr("10.96.0.10:80"))
            .unwrap();
        seen.insert(endpoint.address);
    }
    // e1 maps 80 to its own 8081; e2 takes the service's 8080; unhealthy e3 never.
    let expected: HashSet<SocketAddr> = [addr("10.0.1.1:8081"), addr("10.0.2.1:8080")].into();
    assert_eq!(seen, expected);
    // Target port 0 means the service port itself.
    let port_81 = config
        .pick_endpoint(echo, None, addr("10.96.0.10:81"))
        .unwrap()
        .address
        .port();
    assert_eq!(port_81, 81);
    assert_eq!(
        echo.extra_identities()[0].to_string(),
        "spiffe://cluster.local/ns/demo/sa/extra"
    );
}

#[test]
fn waypoints_resolve_and_know_their_own_traffic() {
    let config = parse(SERVICES).unwrap();
    let b1 = config.workload_by_uid("b1").unwrap();
    let waypoint = b1.waypoint.as_ref().unwrap();
    let endpoint = config.resolve_gateway(waypoint, None).unwrap();
    assert_eq!(endpoint.address, addr("10.0.2.9:15008"));
    assert_eq!(endpoint.workload.service_account, "waypoint");
    assert!(config.is_waypoint(waypoint, "10.0.2.9".parse().unwrap()));
    assert!(!config.is_waypoint(waypoint, "10.0.1.1".parse().unwrap()));
    // A waypoint named by service hostname: any of the service's endpoints is it.
    let service = config.service_at(addr("10.96.0.11:80")).unwrap();
    let by_name = service.waypoint.as_ref().unwrap();
    let endpoint = config.resolve_gateway(by_name, None).unwrap();
    assert_eq!(endpoint.address.port(), 15008);
    assert!(config.is_waypoint(by_name, "10.0.2.1".parse().unwrap()));
    assert!(!config.is_waypoint(by_name, "10.0.2.9".parse().unwrap()));
}

/// `count` HBONE workloads `w<i>` in namespace `demo`, each an endpoint of service
/// `demo/s<i % 100>`.
fn workloads(count: u32) -> Vec<Change> {
    (0..count)
        .map(|i| {
            let text = format!(
                "{{uid: w{i}, name: w{i}, namespace: demo, workloadIps: [10.{}.{}.{}], protocol: HBONE, services: {{demo/s{}: {{}}}}}}",
                i >> 16,
                (i >> 8) & 255,
                i & 255,
                i % 100
            );
            Change::Workload(Arc::new(serde_yaml_ng::from_str(&text).unwrap()))
        })
        .collect()
}

pub(super) fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A change at 10,000 workloads touches that workload: the next version shares every other
/// entry with the one before, and only its service's endpoints change.
#[test]
fn one_change_touches_only_what_depends_on_it() {
    let updated = MeshConfig::default().updated(workloads(10_000));
    assert!(updated.refused.is_empty());
    assert_eq!(updated.touched.workloads.len(), 10_000);
    let before = updated.config;
    let mut moved: Workload = before.workload_by_uid("w7").unwrap().clone();
    moved.workload_ips = vec![ip("10.200.0.7")];
    moved.services = [("demo/other", PortMap::default())].into_iter().collect();
    let after = before.updated(vec![Change::Workload(Arc::new(moved))]);
    assert_eq!(
        after.touched,
        Touched {
            workloads: vec!["w7".to_owned()],
            ..Touched::default()
        }
    );
    let after = after.config;
    assert!(after.workload_by_ip(ip("10.0.0.7")).is_none());
    assert_eq!(
        after.workload_by_ip(ip("10.200.0.7")).unwrap().uid,
        "w7".into()
    );
    for uid in ["w0", "w8", "w9999"] {
        assert!(Arc::ptr_eq(&before.workloads[uid], &after.workloads[uid]));
    }
    let endpoints =
        |config: &MeshConfig, key: &str| config.endpoints.get(key).map_or(0, Endpoints::len);
    assert_eq!(endpoints(&before, "demo/s7"), 100);
    assert_eq!(endpoints(&after, "demo/s7"), 99);
    assert_eq!(endpoints(&after, "demo/other"), 1);
    assert!(after.endpoints["demo/s8"].ptr_eq(&before.endpoints["demo/s8"]));
    // The version before is intact: a connection holding it sees no change.
    assert_eq!(
        before.workload_by_ip(ip("10.0.0.7")).unwrap().uid,
        "w7".into()
    );
}

#[test]
fn entries_may_trade_addresses_within_one_batch() {
    let config = MeshConfig::default().updated(workloads(2)).config;
    let mut first = config.workload_by_uid("w0").unwrap().clone();
    let mut second = config.workload_by_uid("w1").unwrap().clone();
    std::mem::swap(&mut first.workload_ips, &mut second.workload_ips);
    let updated = config.updated(vec![
        Change::Workload(Arc::new(first)),
        Change::Workload(Arc::new(second)),
    ]);
    assert!(updated.refused.is_empty(), "{:?}", updated.refused);
    assert_eq!(
        &*updated.config.workload_by_ip(ip("10.0.0.0")).unwrap().uid,
        "w1"
    );
    assert_eq!(
        &*updated.config.workload_by_ip(ip("10.0.0.1")).unwrap().uid,
        "w0"
    );
}

/// An entry that takes an address outside its batch is refused, naming the holder, and its
/// previous version stays; the rest of the batch is applied.
#[test]
fn a_conflicting_entry_is_refused_and_its_previous_version_stays() {
    let config = MeshConfig::default().updated(workloads(3)).config;
    let mut thief = config.workload_by_uid("w0").unwrap().clone();
    thief.workload_ips = vec![ip("10.0.0.1")];
    let service = "{name: s, namespace: demo, hostname: s, vips: [/10.0.0.2], ports: {80: 80}}";
    let updated = config.updated(vec![
        Change::Workload(Arc::new(thief)),
        Change::Service(Arc::new(serde_yaml_ng::from_str(service).unwrap())),
        Change::RemoveWorkload("w2".to_owned()),
    ]);
    let refused: Vec<String> = updated.refused.iter().map(ToString::to_string).collect();
    assert_eq!(
        refused,
        ["w0: field workloadIps: 10.0.0.1 belongs to workload w1"]
    );
    let config = updated.config;
    assert_eq!(
        config.workload_by_ip(ip("10.0.0.0")).unwrap().uid,
        "w0".into()
    );
    assert_eq!(
        config.workload_by_ip(ip("10.0.0.1")).unwrap().uid,
        "w1".into()
    );
    assert!(config.service_at("10.0.0.2:80".parse().unwrap()).is_some());
    assert!(config.workload_by_uid("w2").is_none());
    assert_eq!(
        (updated.touched.workloads, updated.touched.services),
        (vec!["w2".to_owned()], 1)
    );
}

/// Services follow the same rules: a replacement that takes a VIP in use is refused and the
/// version in force stays; removing a service the model does not hold touches nothing.
#[test]
fn a_refused_service_keeps_its_version_in_force_and_absent_removals_touch_nothing() {
    let service = |vip: &str| -> Change {
        let text =
            format!("{{name: s, namespace: demo, hostname: s, vips: [/{vip}], ports: {{80: 80}}}}");
        Change::Service(Arc::new(serde_yaml_ng::from_str(&text).unwrap()))
    };
    let config = MeshConfig::default()
        .updated([workloads(1), vec![service("10.96.0.1")]].concat())
        .config;
    let updated = config.updated(vec![service("10.0.0.0")]);
    let refused: Vec<String> = updated.refused.iter().map(ToString::to_string).collect();
    assert_eq!(refused, ["demo/s: field vips: 10.0.0.0 is already in use"]);
    assert!(updated.touched.is_empty(), "{:?}", updated.touched);
    let kept = updated.config.service_at("10.96.0.1:80".parse().unwrap());
    assert_eq!(kept.map(|s| &*s.key), Some("demo/s"));

    let updated = config.updated(vec![Change::RemoveService("demo/absent".to_owned())]);
    assert!(updated.touched.is_empty(), "{:?}", updated.touched);
    let updated = config.updated(vec![Change::RemoveService("demo/s".to_owned())]);
    assert_eq!(updated.touched.services, 1);
    assert!(updated.config.service_by_key("demo/s").is_none());
}

/// `text` read as the next version of the file `index` describes, against `current`; the
/// index then describes it.
fn read(index: &mut FileIndex, text: &str, current: &MeshConfig) -> Vec<Change> {
    let (changes, update) = index.read(Path::new(FILE), text, current).unwrap();
    index.commit(update);
    changes.changes(current)
}

/// A file's changes make the model equal to the file: what differs, what is new, and the
/// removal of what the file no longer has; an unchanged file makes none.
#[test]
fn a_file_becomes_the_changes_that_make_the_model_equal_to_it() {
    let mut index = FileIndex::default();
    let empty = MeshConfig::default();
    let first = empty.updated(read(&mut index, SERVICES, &empty)).config;
    let edited = SERVICES
        .replace("status: Unhealthy", "status: Healthy")
        .replace("- {uid: wp,", "- {uid: wp2,");
    let changes = read(&mut index, &edited, &first);
    let names: Vec<String> = changes
        .iter()
        .map(|change| match change {
            Change::Workload(w) => format!("+{}", w.uid),
            Change::RemoveWorkload(uid) => format!("-{uid}"),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(names, ["-wp", "+e3", "+wp2"]);
    let updated = first.updated(changes);
    assert_eq!(
        updated.config.sorted_workloads(),
        parse(&edited).unwrap().sorted_workloads()
    );
    assert!(read(&mut index, &edited, &updated.config).is_empty());
}

/// With istiod feeding the model too, a new version of the file removes only what its
/// version before held and it dropped: istiod's entries stay.
#[test]
fn a_file_leaves_the_entries_of_another_source_alone() {
    let mut index = FileIndex::default();
    let empty = MeshConfig::default();
    let from_file = empty.updated(read(&mut index, SERVICES, &empty)).config;
    let with_istiod = from_file.updated(workloads(1)).config;
    let edited = SERVICES.replace("- {uid: e2,", "- {uid: e2b,");
    let changes = read(&mut index, &edited, &with_istiod);
    let config = with_istiod.updated(changes).config;
    assert!(
        config.workload_by_uid("w0").is_some(),
        "istiod's entry stays"
    );
    assert!(config.workload_by_uid("e2").is_none());
    assert!(config.workload_by_uid("e2b").is_some());
}

#[test]
fn errors_name_the_file_the_entry_and_the_field() {
    let cases = [
        (
            "workloads:\n- uid: x\n  name: a\n  namespace: ''\n  workloadIps: [10.0.0.1]\n",
            "workload #0 (/a): field namespace must not be empty",
        ),
        (
            "workloads:\n- uid: x\n  name: a\n  namespace: n\n  workloadIps: []\n",
            "workload #0 (n/a): field workloadIps",
        ),
        (
            "workloads:\n- {uid: x, name: a, namespace: n, workloadIps: [10.0.0.1]}\n- {uid: x, name: b, namespace: n, workloadIps: [10.0.0.2]}\n",
            "workload #1 (n/b): field uid x is used",
        ),
        (
            "workloads:\n- {uid: x, name: a, namespace: n, workloadIps: [10.0.0.1]}\n- {uid: y, name: b, namespace: n, workloadIps: [10.0.0.1]}\n",
            "workload #1 (n/b): field workloadIps: 10.0.0.1",
        ),
        (
            "workloads:\n- {uid: x, name: a, namespace: n, serviceAccount: a/b, workloadIps: [10.0.0.1]}\n",
            "serviceAccount must not contain",
        ),
        (
            "workloads:\n- {uid: x, name: a, namespace: n, workloadIps: [10.0.0.1], services: {nohost: {}}}\n",
            "workload #0 (n/a): field services: \"nohost\"",
        ),
        (
            "workloads:\n- {uid: x, name: a, namespace: n, workloadIps: [10.0.0.1], waypoint: {destination: /10.9.9.9}}\n",
            "workload #0 (n/a): field waypoint",
        ),
        (
            "services:\n- {name: s, namespace: n, hostname: h, vips: [/10.96.0.1], ports: {}}\n",
            "service #0 (n/s): field ports",
        ),
        (
            "services:\n- {name: s, namespace: n, hostname: h, vips: [/10.96.0.1], ports: {80: 80}}\n- {name: t, namespace: n, hostname: i, vips: [/10.96.0.1], ports: {80: 80}}\n",
            "service #1 (n/t): field vips: 10.96.0.1 is already in use",
        ),
        (
            "services:\n- {name: s, namespace: n, hostname: h, vips: [/10.96.0.1], ports: {80: 80}, subjectAltNames: [x]}\n",
            "service #0 (n/s): field subjectAltNames",
        ),
    ];
    for (text, expected) in cases {
        let err = parse(text)
            .err()
            .expect("the config is refused")
            .to_string();
        assert!(err.starts_with("mesh config mesh.yaml"), "{err}");
        assert!(err.contains(expected), "{err} should contain {expected}");
    }
    let err = parse(
        "workloads:\n- {uid: x, name: a, namespace: n, workloadIps: [10.0.0.1], protocl: HBONE}\n",
    )
    .err()
    .expect("the config is refused");
    assert!(err.to_string().contains("protocl"), "{err}");
    for bad in [
        "workloads:\n- {uid: x, name: a, namespace: n, workloadIps: [not-an-ip]}\n",
        "services:\n- {name: s, namespace: n, hostname: h, vips: [net/bad], ports: {80: 80}}\n",
    ] {
        let err = parse(bad).err().expect("the config is refused");
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    }
}

#[test]
fn an_enrolled_pod_is_its_workload_by_uid_else_by_namespace_name_and_node() {
    let config = parse(
        "workloads:
- {uid: 0a1b, name: a1, namespace: demo, serviceAccount: by-uid, workloadIps: [10.0.0.1], node: node1}
- {uid: Kubernetes//Pod/demo/a2, name: a2, namespace: demo, serviceAccount: by-name, workloadIps: [10.0.0.2], node: node1}
- {uid: Kubernetes//Pod/demo/a3, name: a3, namespace: demo, serviceAccount: elsewhere, workloadIps: [10.0.0.3], node: node2}
",
    )
    .unwrap();
    let account = |uid: &str, name: &str| {
        config
            .pod_workload(uid, "demo", name, "node1")
            .map(|w| w.service_account.as_str())
    };
    assert_eq!(account("0a1b", "a1"), Some("by-uid"));
    // istiod's name, not the pod's uid: joined by namespace, name and node.
    assert_eq!(account("9f8e", "a2"), Some("by-name"));
    // The same name on another node is another pod.
    assert_eq!(account("7c6d", "a3"), None);
}

mod istio_model;
