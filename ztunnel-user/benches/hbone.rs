//! The per-stream work of HBONE outside TLS and HTTP/2 framing: building the CONNECT request
//! on the client, and on the server checking where it asks to go and whom it comes from.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::net::SocketAddr;
use ztunnel_user::hbone::client::ConnectRequest;
use ztunnel_user::hbone::server::{original_client, target_of};

fn requests(c: &mut Criterion) {
    let connect = ConnectRequest {
        authority: "10.244.2.2:8080".parse().unwrap(),
        client: "10.244.1.2:41000".parse().unwrap(),
        baggage: "k8s.namespace.name=demo,k8s.pod.name=a1,service.name=a1".into(),
    };
    let request = connect.to_http();
    let local: SocketAddr = "10.244.2.2:15008".parse().unwrap();
    let peer: SocketAddr = "10.244.1.2:40000".parse().unwrap();
    assert_eq!(target_of(&request, local), Ok(connect.authority));
    assert_eq!(original_client(&request, peer), connect.client);

    let mut group = c.benchmark_group("HBONE CONNECT");
    group.bench_function("build the request (client)", |b| {
        b.iter(|| black_box(&connect).to_http())
    });
    group.bench_function("target of the request (server)", |b| {
        b.iter(|| target_of(black_box(&request), local))
    });
    group.bench_function("original client from forwarded (server)", |b| {
        b.iter(|| original_client(black_box(&request), peer))
    });
    group.finish();
}

criterion_group!(benches, requests);
criterion_main!(benches);
