//! Lookups every proxied connection makes in the mesh config, at a realistic size: 10,000
//! workloads in 100 namespaces and 1,000 services of 10 endpoints each, one of which also has
//! 1,000 endpoints (a large deployment).

use criterion::{Criterion, criterion_group, criterion_main};
use std::fmt::Write as _;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use ztunnel_user::mesh::config::MeshConfig;

const WORKLOADS: u32 = 10_000;
const SERVICES: u32 = 1_000;
const ENDPOINTS_PER_SERVICE: u32 = 10;
/// Endpoints of the large service (the first workloads).
const LARGE_SERVICE_ENDPOINTS: u32 = 1_000;

/// Workload `i` has 10.1.x.y, service `s` the VIP 10.96.x.y.
fn address(first_octets: [u8; 2], index: u32) -> Ipv4Addr {
    let [_, _, high, low] = index.to_be_bytes();
    Ipv4Addr::new(first_octets[0], first_octets[1], high, low)
}

fn workload_ip(index: u32) -> Ipv4Addr {
    address([10, 1], index)
}

fn service_vip(index: u32) -> Ipv4Addr {
    address([10, 96], index)
}

/// The file, written as an operator would (Istio ztunnel's local-config shape).
fn config_yaml() -> String {
    let mut yaml = String::from("workloads:\n");
    for w in 0..WORKLOADS {
        let namespace = format!("ns-{}", w % 100);
        let mut services = format!(
            "ns-0/svc-{}.ns-0.svc: {{80: 8080}}",
            w / ENDPOINTS_PER_SERVICE
        );
        if w < LARGE_SERVICE_ENDPOINTS {
            services.push_str(", ns-0/large.ns-0.svc: {}");
        }
        let _ = writeln!(
            yaml,
            "- {{uid: uid-{w}, name: pod-{w}, namespace: {namespace}, serviceAccount: sa-{w}, \
             workloadIps: [{}], protocol: HBONE, node: node-{}, services: {{{services}}}}}",
            workload_ip(w),
            w % 50
        );
    }
    yaml.push_str("services:\n");
    for s in 0..SERVICES {
        let _ = writeln!(
            yaml,
            "- {{name: svc-{s}, namespace: ns-0, hostname: svc-{s}.ns-0.svc, vips: [/{}], ports: {{80: 8080}}}}",
            service_vip(s)
        );
    }
    let _ = writeln!(
        yaml,
        "- {{name: large, namespace: ns-0, hostname: large.ns-0.svc, vips: [/{}], ports: {{80: 8080}}}}",
        service_vip(SERVICES)
    );
    yaml
}

fn lookups(c: &mut Criterion) {
    let config = MeshConfig::parse(Path::new("bench.yaml"), &config_yaml()).expect("valid config");
    assert_eq!(config.workload_count(), WORKLOADS as usize);
    let known = IpAddr::V4(workload_ip(WORKLOADS / 2));
    let unknown = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    let vip = SocketAddr::new(IpAddr::V4(service_vip(SERVICES / 2)), 80);
    let large_vip = SocketAddr::new(IpAddr::V4(service_vip(SERVICES)), 80);
    let service = config.service_at(vip).expect("the service");
    let large = config.service_at(large_vip).expect("the large service");
    assert!(config.pick_endpoint(large, None, large_vip).is_some());

    let mut group = c.benchmark_group("mesh config, 10k workloads, 1k services");
    group.bench_function("workload by IP", |b| {
        b.iter(|| config.workload_by_ip(black_box(known)))
    });
    group.bench_function("workload by IP, not in the mesh", |b| {
        b.iter(|| config.workload_by_ip(black_box(unknown)))
    });
    group.bench_function("workload by uid", |b| {
        b.iter(|| config.workload_by_uid(black_box("uid-5000")))
    });
    group.bench_function("service by VIP:port", |b| {
        b.iter(|| config.service_at(black_box(vip)))
    });
    group.bench_function("endpoint pick, 10 endpoints", |b| {
        b.iter(|| {
            config
                .pick_endpoint(black_box(service), None, vip)
                .map(|e| e.address)
        })
    });
    group.bench_function("endpoint pick, 1,000 endpoints", |b| {
        b.iter(|| {
            config
                .pick_endpoint(black_box(large), None, large_vip)
                .map(|e| e.address)
        })
    });
    group.bench_function("authorization target by IP", |b| {
        b.iter(|| {
            config
                .authz_target(black_box(known), "default")
                .namespace
                .len()
        })
    });
    group.finish();
}

criterion_group!(benches, lookups);
criterion_main!(benches);
