//! Builds what the daemon embeds or includes:
//! - the eBPF programs (ztunnel-ebpf), with the nightly toolchain;
//! - the Rust code of istiod's protocols (`src/xds/proto.rs` includes it), from `proto/`.

use anyhow::Context;

/// The .proto files of istiod's wire, relative to `proto/`; their imports are found there too,
/// and `google/protobuf/*` in the compiler's bundled copies.
const PROTOS: &[&str] = &[
    "istio/workload.proto",
    "istio/authorization.proto",
    "istio/citadel.proto",
    "envoy/service/discovery/v3/ads.proto",
];

fn main() -> anyhow::Result<()> {
    build_protos()?;
    build_ebpf()
}

fn build_ebpf() -> anyhow::Result<()> {
    let package = aya_build::Package {
        name: "ztunnel-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ztunnel-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}

/// Parses `proto/` with protox (pure Rust: no protoc needed), then generates the messages
/// and both the gRPC clients and servers (without tonic's transport) into OUT_DIR, with
/// `istiod_protos.rs` nesting one module per protobuf package.
fn build_protos() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
    println!("cargo:rerun-if-changed={root}");
    let descriptors =
        protox::compile(PROTOS, [root]).context("compiling the .proto files in proto/")?;
    // Type names give each message its xDS type URL (`prost::Name::type_url`, e.g.
    // `type.googleapis.com/istio.workload.Address`) and let it go in and out of a
    // `prost_types::Any`.
    let mut config = tonic_prost_build::Config::new();
    config
        .enable_type_names()
        .type_name_domain(["."], "type.googleapis.com");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .include_file("istiod_protos.rs")
        .compile_fds_with_config(descriptors, config)
        .context("generating Rust code from the .proto files")
}
