//! The file's versions compared entry by entry: the split of its text, the short cut, and the
//! whole parse wherever the short cut cannot vouch for the result.

use super::layout::{EntryText, EntryTexts, split};
use super::*;
use crate::mesh::config::Touched;
use std::fmt::Write;

const FILE: &str = "mesh.yaml";

/// Entries in both styles, comments and blank lines between and inside them, a waypoint.
const MIXED: &str = "\
# the lab's mesh
workloads:
  - uid: a1
    name: a1
    namespace: demo
    # a comment inside an entry
    workloadIps: [10.0.1.1]

  - {uid: a2, name: a2, namespace: demo, workloadIps: [10.0.1.2],
     services: {demo/echo.demo.svc: {80: 8080}}}
  - {uid: wp, name: wp, namespace: demo, serviceAccount: waypoint, workloadIps: [10.0.1.9]}
  - {uid: b1, name: b1, namespace: demo, workloadIps: [10.0.1.5],
     waypoint: {destination: /10.0.1.9, hboneMtlsPort: 15008}}
policies: # trailing comment
- {name: allow-a, namespace: demo, scope: Namespace, action: Allow,
   rules: [[[{principals: [{Exact: \"cluster.local/ns/demo/sa/*\"}]}]]]}
services:
- name: echo
  namespace: demo
  hostname: echo.demo.svc
  vips: [10.96.0.10]
  ports: {80: 8080}
";

#[test]
fn the_usual_layouts_split_into_their_entries() {
    let texts = split(MIXED).unwrap();
    let text = |entries: &[EntryText]| {
        entries
            .iter()
            .map(|e| e.text.to_owned())
            .collect::<Vec<_>>()
    };
    let (workloads, services) = (text(&texts.workloads), text(&texts.services));
    assert_eq!(workloads.len(), 4);
    assert_eq!(
        workloads[0],
        "  - uid: a1\n    name: a1\n    namespace: demo\n    # a comment inside an entry\n    \
         workloadIps: [10.0.1.1]\n\n"
    );
    assert!(workloads[3].starts_with("  - {uid: b1,"));
    assert!(workloads[3].ends_with("hboneMtlsPort: 15008}}\n"));
    assert_eq!(texts.policies.len(), 1);
    assert_eq!(
        services,
        [
            "- name: echo\n  namespace: demo\n  hostname: echo.demo.svc\n  vips: [10.96.0.10]\n  ports: {80: 8080}\n"
        ]
    );
    assert_eq!(split("# nothing\n"), Some(EntryTexts::default()));
}

/// Each entry the split finds parses on its own to the entry the whole parse reads there.
#[test]
fn each_entry_parses_alone_to_what_the_whole_parse_reads() {
    let whole = MeshFile::parse(Path::new(FILE), MIXED).unwrap();
    let texts = split(MIXED).unwrap();
    assert_eq!(alone::<Workload>(&texts.workloads), whole.workloads);
    assert_eq!(alone::<Service>(&texts.services), whole.services);
    assert_eq!(alone::<Policy>(&texts.policies), whole.policies);
}

/// Each of `entries` parsed on its own, as the comparison does.
fn alone<T: FileEntry>(entries: &[EntryText]) -> Vec<T> {
    let one = |entry: &EntryText| {
        let mut list: Vec<T> = serde_yaml_ng::from_str(entry.text).unwrap();
        assert_eq!(list.len(), 1, "{}", entry.text);
        let mut entry = list.remove(0);
        entry.trim();
        entry
    };
    entries.iter().map(one).collect()
}

/// What the split does not read is left to the whole parse, which reads it as YAML does.
#[test]
fn other_layouts_are_left_to_the_whole_parse() {
    let entry = "- {uid: a, name: a, namespace: n, workloadIps: [10.0.0.1]}\n";
    for text in [
        "workloads: [{uid: a, name: a, namespace: n, workloadIps: [10.0.0.1]}]\n".to_owned(),
        "{workloads: []}\n".to_owned(),
        format!("---\nworkloads:\n{entry}"),
        format!("%YAML 1.2\n---\nworkloads:\n{entry}"),
        format!("workloads:\n{entry}workloads:\n{entry}"),
        "workloads:\nservices:\n".to_owned(),
        "workloads:\n".to_owned(),
        format!("extra:\n{entry}"),
        format!("workloads:\r\n{entry}"),
        format!("workloads:\n\t{entry}"),
        format!("workloads:\n  {entry}{entry}"),
        "workloads:\n  uid: a\n".to_owned(),
        format!("workloads:\n- &w {}- *w\n", &entry[2..]),
        format!("workloads:\n- {{<<: *x, uid: b}}\n{entry}"),
        format!("- {entry}"),
    ] {
        assert_eq!(split(&text), None, "{text}");
    }
}

/// A file of `count` workloads in 10 services, a service for each, and a policy; `moved`: the
/// workload `moved` at another address.
fn big_file(count: usize, moved: Option<usize>) -> String {
    let mut text = String::from("workloads:\n");
    for i in 0..count {
        let ip = match moved {
            Some(m) if m == i => "10.200.0.1".to_owned(),
            _ => format!("10.1.{}.{}", i / 250, i % 250 + 1),
        };
        let _ = writeln!(
            text,
            "- {{uid: w{i}, name: w{i}, namespace: n{ns}, workloadIps: [{ip}], \
             services: {{n{ns}/s{ns}.svc: {{80: 8080}}}}}}",
            ns = i % 10
        );
    }
    text.push_str("services:\n");
    for s in 0..10 {
        let _ = writeln!(
            text,
            "- {{name: s{s}, namespace: n{s}, hostname: s{s}.svc, vips: [10.96.0.{s}], ports: {{80: 8080}}}}"
        );
    }
    text.push_str("policies:\n- {name: p, namespace: n0, scope: Namespace, action: Deny, rules: [[[{notPrincipals: [{Exact: x}]}]]]}\n");
    text
}

/// The model a file is in force with, and what the file put there.
struct InForce {
    index: FileIndex,
    model: MeshConfig,
}

impl InForce {
    fn new() -> InForce {
        InForce {
            index: FileIndex::default(),
            model: MeshConfig::default(),
        }
    }

    /// Takes `text` as the file's next version; returns the changes it made, how many entries
    /// were parsed, and what the model touched.
    fn take(&mut self, text: &str) -> Result<(Vec<Change>, usize, Touched), ConfigError> {
        let (file, update) = self.index.read(Path::new(FILE), text, &self.model)?;
        let changes = file.changes(&self.model);
        let updated = self.model.updated(changes.clone());
        assert!(updated.refused.is_empty(), "{:?}", updated.refused);
        self.index.commit(update);
        self.model = updated.config;
        self.assert_equals_a_whole_parse_of(text);
        Ok((changes, file.entries_parsed(), updated.touched))
    }

    fn assert_equals_a_whole_parse_of(&self, text: &str) {
        let whole = MeshConfig::parse(Path::new(FILE), text).unwrap();
        assert_eq!(self.model.sorted_workloads(), whole.sorted_workloads());
        assert_eq!(self.model.sorted_services(), whole.sorted_services());
        let policies =
            |config: &MeshConfig| config.policy_entries.values().cloned().collect::<Vec<_>>();
        assert_eq!(policies(&self.model), policies(&whole));
    }
}

/// The check that one change at 10,000 workloads does not rebuild the model: one entry
/// parsed, one change made, one workload touched.
#[test]
fn one_change_in_ten_thousand_workloads_parses_and_touches_one_entry() {
    let mut file = InForce::new();
    let (changes, parsed, _) = file.take(&big_file(10_000, None)).unwrap();
    assert_eq!((changes.len(), parsed), (10_011, 10_011));

    let (changes, parsed, touched) = file.take(&big_file(10_000, Some(1234))).unwrap();
    assert_eq!(parsed, 1);
    assert!(matches!(&changes[..], [Change::Workload(w)] if &*w.uid == "w1234"));
    assert_eq!(touched.workloads, ["w1234"]);
    assert_eq!((touched.services, touched.policies), (0, 0));

    // Removed, then back.
    let without = big_file(10_000, Some(1234)).replace(
        "- {uid: w77, name: w77, namespace: n7, workloadIps: [10.1.0.78], services: {n7/s7.svc: {80: 8080}}}\n",
        "",
    );
    let (changes, parsed, _) = file.take(&without).unwrap();
    assert_eq!(parsed, 0);
    assert_eq!(changes, [Change::RemoveWorkload("w77".into())]);
    let (changes, parsed, _) = file.take(&big_file(10_000, None)).unwrap();
    assert_eq!(
        (changes.len(), parsed),
        (2, 2),
        "w77 back, w1234 moved back"
    );

    // A policy and a service changed.
    let edited = big_file(10_000, None)
        .replace("action: Deny", "action: Allow")
        .replace("vips: [10.96.0.3]", "vips: [10.96.1.3]");
    let (changes, parsed, touched) = file.take(&edited).unwrap();
    assert_eq!((changes.len(), parsed), (2, 2));
    assert_eq!((touched.services, touched.policies), (1, 1));

    // Entries moved within the file are the same entries.
    let line = |i: usize| {
        let text = big_file(i + 1, None);
        text.lines().nth(i + 1).unwrap().to_owned() + "\n"
    };
    let (w10, w20) = (line(10), line(20));
    let swapped = edited
        .replace(&w10, "@10@")
        .replace(&w20, &w10)
        .replace("@10@", &w20);
    assert_ne!(swapped, edited);
    let (changes, parsed, _) = file.take(&swapped).unwrap();
    assert_eq!((changes.len(), parsed), (0, 0));
}

/// Where the short cut cannot vouch for a version, the whole parse decides: its error, naming
/// the entry, or the version applied as a whole parse applies it.
#[test]
fn what_the_short_cut_cannot_vouch_for_is_parsed_whole() {
    let mut file = InForce::new();
    let first = big_file(100, None);
    file.take(&first).unwrap();
    let whole_error = |text: &str| MeshConfig::parse(Path::new(FILE), text).err().unwrap();
    let entry = |i: usize, ip: &str| {
        format!(
            "- {{uid: w{i}, name: w{i}, namespace: n{ns}, workloadIps: [{ip}], \
             services: {{n{ns}/s{ns}.svc: {{80: 8080}}}}}}\n",
            ns = i % 10
        )
    };
    let refused = [
        // a changed entry takes an unchanged one's uid, or its address
        first.replace(&entry(5, "10.1.0.6"), &entry(6, "10.1.0.250")),
        first.replace(&entry(5, "10.1.0.6"), &entry(5, "10.1.0.7")),
        // an entry twice
        first.replace(&entry(5, "10.1.0.6"), &entry(6, "10.1.0.7")),
        // an entry that does not parse, or check, alone
        first.replace(&entry(5, "10.1.0.6"), "- {uid: w5}\n"),
        first.replace(
            &entry(5, "10.1.0.6"),
            "- {uid: w5, name: w5, namespace: n5, workloadIps: []}\n",
        ),
        // a service's VIP taken by a workload
        first.replace(&entry(5, "10.1.0.6"), &entry(5, "10.96.0.2")),
    ];
    for text in refused {
        let error = file.take(&text).err().unwrap();
        assert_eq!(error.to_string(), whole_error(&text).to_string());
    }

    // Waypoints: an entry a waypoint names goes only with a whole parse's check.
    let with_waypoint = first.replace(
        &entry(9, "10.1.0.10"),
        "- {uid: w9, name: w9, namespace: n9, workloadIps: [10.1.0.10], \
         waypoint: {destination: /10.1.0.1, hboneMtlsPort: 15008}}\n",
    );
    let (_, parsed, _) = file.take(&with_waypoint).unwrap();
    assert_eq!(parsed, 111, "a waypoint named: parsed whole");
    let waypoint_gone = with_waypoint.replace(&entry(0, "10.1.0.1"), "");
    let error = file.take(&waypoint_gone).err().unwrap();
    assert!(error.to_string().contains("field waypoint"), "{error}");
    let (_, parsed, _) = file
        .take(&with_waypoint.replace(&entry(3, "10.1.0.4"), ""))
        .unwrap();
    assert_eq!(
        parsed, 0,
        "an entry no waypoint names goes by the short cut"
    );
}
