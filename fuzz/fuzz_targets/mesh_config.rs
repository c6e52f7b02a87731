//! The mesh config parser (`MeshConfig::parse`) on arbitrary text: it must answer, in time,
//! with a config or an error and never panic; a config it accepts must survive being written
//! out as YAML (its workloads, services and policies as `/config_dump` shows them) and read
//! again unchanged; and read as a new version of the file after the written one, or before
//! it, it must leave in force what a whole parse of it makes (the daemon compares versions
//! entry by entry where it can).
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use std::path::Path;
use std::time::Duration;
use ztunnel_fuzz::bounded;
use ztunnel_user::mesh::authz::Policy;
use ztunnel_user::mesh::config::{MeshConfig, Service, Workload};

const BOUND: Duration = Duration::from_secs(5);

/// The file's three lists, as a config is written out.
#[derive(Serialize)]
struct File<'a> {
    workloads: &'a [Workload],
    services: &'a [Service],
    policies: &'a [Policy],
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz/mesh.yaml");
    bounded("MeshConfig::parse", BOUND, || {
        let Ok(config) = MeshConfig::parse(path, text) else {
            return;
        };
        let (workloads, services) = (config.sorted_workloads(), config.sorted_services());
        let policies: Vec<Policy> = config
            .policies
            .all()
            .iter()
            .map(|p| Policy::clone(p))
            .collect();
        let file = File {
            workloads: &workloads,
            services: &services,
            policies: &policies,
        };
        let written = serde_yaml_ng::to_string(&file).expect("a config serializes");
        let again = match MeshConfig::parse(path, &written) {
            Ok(again) => again,
            Err(err) => panic!("an accepted config, written out, is refused: {err}\n{written}"),
        };
        assert_eq!(workloads, again.sorted_workloads());
        assert_eq!(services, again.sorted_services());
        assert_eq!(config.policies.all(), again.policies.all());
        for (first, second, whole) in [(&*written, text, &config), (text, &*written, &again)] {
            let versions = ztunnel_user::fuzzing::mesh_file_versions(first, second);
            let read = versions.unwrap_or_else(|err| panic!("a valid version refused: {err}"));
            assert_eq!(read.sorted_workloads(), whole.sorted_workloads());
            assert_eq!(read.sorted_services(), whole.sorted_services());
            assert_eq!(read.policies.all(), whole.policies.all());
        }
    });
});
