//! What the fake sends is what the file says: each resource, read back by the daemon's own
//! xDS conversion, is the file's entry again, field for field.

use super::*;
use std::path::Path;
use std::sync::Arc;
use ztunnel_user::mesh::config::{Change, Workload};
use ztunnel_user::xds::convert::{address_change, authorization_change};

/// Every field of the model, set (the lab's own file sets only some).
const EVERY_FIELD: &str = include_str!("../../../fixtures/istio-every-field.yaml");

fn file(text: &str) -> MeshFile {
    MeshFile::parse(Path::new("test.yaml"), text).expect("a valid mesh file")
}

/// The daemon's reading of every resource in `snapshot`.
fn read_back(snapshot: &Snapshot) -> Vec<Change> {
    let addresses = snapshot
        .addresses
        .iter()
        .map(|(name, r)| address_change(name, &r.body));
    let policies = snapshot
        .authorizations
        .iter()
        .map(|(name, r)| authorization_change(name, &r.body));
    addresses
        .chain(policies)
        .map(|change| change.expect("the daemon accepts what the fake sends"))
        .collect()
}

/// The file's entries as changes, in the snapshot's order (by name, addresses first), the
/// workloads named as istiod names them.
fn entries(file: &MeshFile) -> Vec<Change> {
    let mut addresses: Vec<(String, Change)> = file
        .workloads()
        .iter()
        .map(|w| {
            let named_by_istiod = Workload {
                uid: istiod_uid(w).into(),
                ..w.clone()
            };
            (
                named_by_istiod.uid.to_string(),
                Change::Workload(Arc::new(named_by_istiod)),
            )
        })
        .chain(
            file.services()
                .iter()
                .map(|s| (s.key(), Change::Service(Arc::new(s.clone())))),
        )
        .collect();
    addresses.sort_by(|a, b| a.0.cmp(&b.0));
    let mut policies: Vec<(String, Change)> = file
        .policies()
        .iter()
        .map(|p| (p.key(), Change::Policy(Arc::new(p.clone()))))
        .collect();
    policies.sort_by(|a, b| a.0.cmp(&b.0));
    addresses
        .into_iter()
        .chain(policies)
        .map(|(_, c)| c)
        .collect()
}

#[test]
fn every_field_of_the_file_reaches_the_daemon_unchanged() {
    let file = file(EVERY_FIELD);
    let snapshot = Snapshot::of(&file, String::new());
    assert_eq!(snapshot.addresses.len(), 7);
    assert_eq!(snapshot.authorizations.len(), 2);
    assert_eq!(read_back(&snapshot), entries(&file));
}

#[test]
fn the_labs_own_mesh_reaches_the_daemon_unchanged() {
    let mut text = ztunnel_lab::mesh::mesh_config();
    // The lab's file leaves workloadType unset, which the wire can only say as Deployment.
    text = text.replace("  node: ", "  workloadType: deployment\n  node: ");
    let file = file(&text);
    assert_eq!(
        read_back(&Snapshot::of(&file, String::new())),
        entries(&file)
    );
}

#[test]
fn a_resource_keeps_its_version_until_its_content_changes() {
    let before = Snapshot::of(&file(EVERY_FIELD), String::new());
    let changed = EVERY_FIELD.replace("canonicalRevision: v1", "canonicalRevision: v2");
    let after = Snapshot::of(&file(&changed), String::new());
    assert_ne!(
        before.addresses["cluster1//Pod/demo/a1"].version,
        after.addresses["cluster1//Pod/demo/a1"].version
    );
    assert_eq!(
        before.addresses["Kubernetes//Pod/legacy/u1"],
        after.addresses["Kubernetes//Pod/legacy/u1"]
    );
    assert_eq!(before.authorizations, after.authorizations);
}
