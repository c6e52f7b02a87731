//! What a mesh from istiod leaves in memory, counted by jemalloc (the daemon's allocator): the
//! scale bench's mesh of 50,000 workloads, 10,000 services and 5,000 policies, named and
//! versioned as the lab's istiod sends them, decoded from the bytes of its two responses and
//! taken by the client (conversion, the model, the versions held), as the daemon takes them.
//! The kernel's maps are left out (their entries are the kernel's memory, not the daemon's).
//!
//! The same mesh from the mesh file, as the daemon reads it, is counted beside it.
//!
//! Ignored: it measures and prints, for docs/PERFORMANCE.md. Run it alone, so that no other
//! test allocates meanwhile:
//! `cargo test -p ztunnel-user --features ztunnel-common/user -- --ignored --nocapture memory`

use super::istiod::{FakeIstiod, config};
use super::*;
use crate::istiod::Dial;
use crate::mesh::Mesh;
use crate::mesh::config::{FileEntries, MeshFile};
use crate::mesh::kernel::{KernelMaps, MapsDiff, MeshMaps};
use crate::xds::proto::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use crate::xds::proto::istio::security::{StringMatch, string_match::MatchType};
use crate::xds::proto::istio::workload::PortList;
use http::Uri;
use prost::Message;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::path::Path;
use tikv_jemalloc_ctl::{epoch, stats};
use tonic::codegen::StdError;

/// The unit tests run on the daemon's allocator, so that this count is jemalloc's, with its
/// size classes.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The daemon's options (main.rs), so that "resident" is as the daemon's RSS would be.
#[unsafe(export_name = "_rjem_malloc_conf")]
static ALLOCATOR_OPTIONS: Option<&'static std::ffi::c_char> =
    // SAFETY: the pointer is to the first byte of a 'static, NUL-terminated C string literal.
    Some(unsafe { &*c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr() });

const WORKLOADS: u32 = 50_000;
const SERVICES: u32 = WORKLOADS / 5;
const POLICIES: u32 = WORKLOADS / 10;
/// One-workload changes timed after the whole mesh.
const CHANGES: u32 = 200;

/// Kernel maps that take every write and keep nothing.
struct NoMaps;

impl KernelMaps for NoMaps {
    type Error = Infallible;

    fn sync(&self, _: &MeshMaps) -> Result<(), Infallible> {
        Ok(())
    }

    fn write(&self, _: &MapsDiff) -> Result<(), Infallible> {
        Ok(())
    }
}

/// The mesh model as the daemon's sink applies to it, without the kernel.
struct MeshSink {
    mesh: Mesh,
}

impl XdsSink for MeshSink {
    fn apply(&self, batch: XdsBatch) -> Result<Vec<Rejected>, SinkError> {
        let apply = |changes: MeshBatch| self.mesh.apply(|c| changes.changes(c), &NoMaps);
        Ok(apply_to_model(batch, apply)?)
    }
}

/// Channels to the scripted istiod in memory, each given once the test lets it through.
pub(super) struct Gated {
    istiod: FakeIstiod,
    gate: Arc<tokio::sync::Semaphore>,
}

impl Gated {
    pub(super) fn new(istiod: FakeIstiod) -> Gated {
        Gated {
            istiod,
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
        }
    }
}

impl Dial for Gated {
    type Channel = AggregatedDiscoveryServiceServer<FakeIstiod>;

    async fn dial<Client>(
        &self,
        client: fn(Self::Channel, Uri) -> Client,
    ) -> Result<Client, StdError> {
        self.gate.acquire().await?.forget();
        let server = AggregatedDiscoveryServiceServer::new(self.istiod.clone())
            .max_decoding_message_size(usize::MAX);
        Ok(client(server, Uri::default()))
    }
}

/// jemalloc's counts: bytes allocated, in pages with allocations in them, and resident.
#[derive(Clone, Copy, Debug)]
struct Counts {
    allocated: usize,
    active: usize,
    resident: usize,
}

impl Counts {
    fn now() -> Counts {
        epoch::advance().unwrap();
        Counts {
            allocated: stats::allocated::read().unwrap(),
            active: stats::active::read().unwrap(),
            resident: stats::resident::read().unwrap(),
        }
    }

    /// What `self` has above `before`, per workload.
    fn per_workload(self, before: Counts) -> [f64; 3] {
        let per = |now: usize, then: usize| (now as f64 - then as f64) / f64::from(WORKLOADS);
        [
            per(self.allocated, before.allocated),
            per(self.active, before.active),
            per(self.resident, before.resident),
        ]
    }
}

/// A version as the lab's istiod gives one: 16 hex digits.
fn version(seed: u32) -> String {
    format!(
        "{:016x}",
        u64::from(seed).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    )
}

/// The scale bench's workload `i` (`moved`: at another address), as istiod sends it.
fn synthetic_workload(i: u32, moved: bool) -> Resource {
    let ns = i % 100;
    let service = i % SERVICES;
    let ip = if moved {
        vec![10, 150, 0, 0]
    } else {
        let [_, high, mid, low] = i.to_be_bytes();
        vec![10, 100 + high, mid, low]
    };
    let uid = format!("Kubernetes//Pod/scale-{ns}/scale-{i}");
    let workload = Workload {
        uid: uid.clone(),
        name: format!("scale-{i}"),
        namespace: format!("scale-{ns}"),
        addresses: vec![ip],
        tunnel_protocol: TunnelProtocol::Hbone.into(),
        trust_domain: "cluster.local".into(),
        service_account: format!("sa-{}", i % 500),
        node: format!("node-{}", i % 1000),
        services: HashMap::from([(
            format!(
                "scale-{sns}/svc-{service}.scale-{sns}.svc",
                sns = service % 100
            ),
            PortList {
                ports: vec![Port {
                    service_port: 80,
                    target_port: 8080,
                    ..Port::default()
                }],
            },
        )]),
        ..Workload::default()
    };
    address_entry(
        &uid,
        &version(i + u32::from(moved)),
        address::Type::Workload(workload),
    )
}

fn synthetic_service(j: u32) -> Resource {
    let ns = j % 100;
    let [_, high, mid, low] = j.to_be_bytes();
    let service = Service {
        name: format!("svc-{j}"),
        namespace: format!("scale-{ns}"),
        hostname: format!("svc-{j}.scale-{ns}.svc"),
        addresses: vec![NetworkAddress {
            network: String::new(),
            address: vec![10, 200 + high, mid, low],
        }],
        ports: vec![Port {
            service_port: 80,
            target_port: 8080,
            ..Port::default()
        }],
        ..Service::default()
    };
    let name = format!("scale-{ns}/svc-{j}.scale-{ns}.svc");
    address_entry(&name, &version(j), address::Type::Service(service))
}

fn synthetic_policy(k: u32) -> Resource {
    let ns = k % 100;
    let principal = format!("cluster.local/ns/scale-{ns}/sa/sa-{}", k % 500);
    let policy = Authorization {
        name: format!("p-{k}"),
        namespace: format!("scale-{ns}"),
        scope: Scope::Namespace.into(),
        action: if k.is_multiple_of(2) {
            Action::Allow
        } else {
            Action::Deny
        }
        .into(),
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    principals: vec![StringMatch {
                        match_type: Some(MatchType::Exact(principal)),
                    }],
                    destination_ports: vec![8080],
                    ..Match::default()
                }],
            }],
        }],
        dry_run: false,
    };
    Resource {
        name: format!("scale-{ns}/p-{k}"),
        version: version(k),
        resource: Some(Any::from_msg(&policy).unwrap()),
        ..Resource::default()
    }
}

/// A response as it arrives: its encoded bytes.
fn encoded(type_url: &str, nonce: &str, resources: Vec<Resource>) -> Vec<u8> {
    response(type_url, nonce, resources, &[]).encode_to_vec()
}

/// Decodes `bytes` as tonic's codec does (from its receive buffer), and has the client take
/// the response; returns how long it took.
fn take(client: &XdsClient<Gated, MeshSink>, bytes: &[u8]) -> Duration {
    let response = DeltaResponse::decode(bytes::BytesMut::from(bytes)).unwrap();
    let started = std::time::Instant::now();
    let reply = client.take(response).unwrap();
    let took = started.elapsed();
    assert_eq!(reply.error_detail, None, "NACKed");
    took
}

/// The same mesh as the scale bench writes it into the mesh file.
fn synthetic_file() -> String {
    let address = |first: u32, index: u32| {
        let [_, high, mid, low] = index.to_be_bytes();
        format!("10.{}.{mid}.{low}", first + u32::from(high))
    };
    let mut text = String::from("workloads:\n");
    for i in 0..WORKLOADS {
        let service = i % SERVICES;
        let _ = writeln!(
            text,
            "- {{uid: scale-{i}, name: scale-{i}, namespace: scale-{ns}, serviceAccount: sa-{sa}, \
             workloadIps: [{ip}], protocol: HBONE, node: node-{node}, \
             services: {{scale-{sns}/svc-{service}.scale-{sns}.svc: {{80: 8080}}}}}}",
            ns = i % 100,
            sa = i % 500,
            ip = address(100, i),
            node = i % 1000,
            sns = service % 100,
        );
    }
    text.push_str("services:\n");
    for j in 0..SERVICES {
        let _ = writeln!(
            text,
            "- {{name: svc-{j}, namespace: scale-{ns}, hostname: svc-{j}.scale-{ns}.svc, \
             vips: [/{vip}], ports: {{80: 8080}}}}",
            ns = j % 100,
            vip = address(200, j),
        );
    }
    text.push_str("policies:\n");
    for k in 0..POLICIES {
        let action = if k.is_multiple_of(2) { "Allow" } else { "Deny" };
        let _ = writeln!(
            text,
            "- {{name: p-{k}, namespace: scale-{ns}, scope: Namespace, action: {action}, \
             rules: [[[{{principals: [{{Exact: cluster.local/ns/scale-{ns}/sa/sa-{sa}}}], \
             destinationPorts: [8080]}}]]]}}",
            ns = k % 100,
            sa = k % 500,
        );
    }
    text
}

fn empty_mesh() -> Mesh {
    Mesh::new(|_| Vec::new(), None, "node1", &NoMaps).unwrap()
}

#[test]
#[ignore = "a measurement: run alone, with --nocapture"]
fn memory_of_a_mesh_from_the_file() {
    let mesh = empty_mesh();
    let text = synthetic_file();
    let before = Counts::now();
    let started = std::time::Instant::now();
    let file = MeshFile::parse(Path::new("mesh.yaml"), &text).unwrap();
    // The daemon keeps what the file put in the model, to diff its next version against.
    let entries = file.entries();
    mesh.apply(|c| file.changes_from(c, &FileEntries::default()), &NoMaps)
        .unwrap();
    let took = started.elapsed();
    drop(text);
    let after = Counts::now();
    let [allocated, active, resident] = after.per_workload(before);
    assert_eq!(mesh.current().workload_count(), WORKLOADS as usize);
    drop(entries);
    println!(
        "file memory: {WORKLOADS} workloads, {SERVICES} services, {POLICIES} policies: per \
         workload {allocated:.0} B allocated, {active:.0} B in active pages, {resident:.0} B \
         resident; read and applied in {took:?}"
    );
}

#[test]
#[ignore = "a measurement: run alone, with --nocapture"]
fn memory_of_a_mesh_from_istiod() {
    let sink = Arc::new(MeshSink { mesh: empty_mesh() });
    let client = XdsClient::new(config(None), Gated::new(FakeIstiod::new().0), sink.clone());
    let addresses = encoded(
        ADDRESS,
        "n1",
        (0..WORKLOADS)
            .map(|i| synthetic_workload(i, false))
            .chain((0..SERVICES).map(synthetic_service))
            .collect(),
    );
    let authorizations = encoded(
        AUTHORIZATION,
        "n2",
        (0..POLICIES).map(synthetic_policy).collect(),
    );
    let before = Counts::now();
    let full = take(&client, &addresses) + take(&client, &authorizations);
    let response_bytes = addresses.len() + authorizations.len();
    drop((addresses, authorizations));
    let after = Counts::now();
    let [allocated, active, resident] = after.per_workload(before);
    assert_eq!(sink.mesh.current().workload_count(), WORKLOADS as usize);

    let mut changes: Vec<Duration> = (0..CHANGES)
        .map(|round| {
            let bytes = encoded(
                ADDRESS,
                &format!("c{round}"),
                vec![synthetic_workload(0, round.is_multiple_of(2))],
            );
            take(&client, &bytes)
        })
        .collect();
    changes.sort();
    let at = |q: f64| changes[((changes.len() - 1) as f64 * q).round() as usize];
    // The versions held are the client's; the names they share with the model stay.
    let with_versions = Counts::now();
    drop(client);
    let [versions, ..] = with_versions.per_workload(Counts::now());
    println!(
        "xds memory: {WORKLOADS} workloads, {SERVICES} services, {POLICIES} policies \
         ({response_bytes} bytes of responses): per workload {allocated:.0} B allocated \
         ({versions:.0} B of it the versions held), {active:.0} B in active pages, \
         {resident:.0} B resident; the whole mesh taken in {full:?}, one workload's change in \
         {:?} (median), {:?} (p99)",
        at(0.5),
        at(0.99)
    );
}

/// The same mesh through the client's stream (tonic's encoding and decoding, in memory), with
/// the daemon's allocator options: after the stream's renewal, and after the new stream's
/// opening (which presents every version held).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run alone, with --nocapture"]
async fn memory_of_a_mesh_through_the_stream() {
    let (istiod, mut streams) = FakeIstiod::new();
    let dial = Gated::new(istiod);
    let gate = dial.gate.clone();
    let sink = Arc::new(MeshSink { mesh: empty_mesh() });
    let client = XdsClient::new(config(None), dial, sink.clone());
    let _client = tokio::spawn(client.run());
    gate.add_permits(1);
    let mut stream = streams.recv().await.unwrap();
    stream.initial_requests().await;
    let addresses = encoded(
        ADDRESS,
        "n1",
        (0..WORKLOADS)
            .map(|i| synthetic_workload(i, false))
            .chain((0..SERVICES).map(synthetic_service))
            .collect(),
    );
    let authorizations = encoded(
        AUTHORIZATION,
        "n2",
        (0..POLICIES).map(synthetic_policy).collect(),
    );
    let before = Counts::now();
    let response = DeltaDiscoveryResponse::decode(addresses.as_slice()).unwrap();
    stream.acked(response).await;
    let response = DeltaDiscoveryResponse::decode(authorizations.as_slice()).unwrap();
    stream.acked(response).await;
    drop((addresses, authorizations));
    stream.half_closed().await;
    drop(stream);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let renewed = Counts::now().per_workload(before);
    gate.add_permits(1);
    let mut stream = streams.recv().await.unwrap();
    let [request, _] = stream.initial_requests().await;
    let presented = request.encoded_len();
    assert_eq!(
        request.initial_resource_versions.len(),
        (WORKLOADS + SERVICES) as usize
    );
    drop(request);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reopened = Counts::now().per_workload(before);
    // Ended by istiod: both sides of that stream gone, the next one waits at the gate.
    drop(stream);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ended = Counts::now().per_workload(before);
    println!(
        "xds memory through the stream, per workload (allocated, in active pages, resident): \
         after the renewal {renewed:.0?}, after the new stream's opening {reopened:.0?} (its \
         first request {presented} bytes, which istiod's side of the stream also holds here), \
         after its end {ended:.0?}"
    );
}
