//! Developer commands: `cargo xtask <command>`.

mod bench;
mod demo;
mod fuzz;
mod image;
mod lab;
mod layers;
mod manifests;
mod setup;
mod soak;
mod test;
mod vm;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Developer commands for the ztunnel workspace"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install and check what building and running the project needs (idempotent; run as root).
    Setup,
    /// Run the whole test suite: setup, format and lint checks, unit tests, CNI conformance,
    /// and the end-to-end tests on the lab (serially; they need root).
    Test,
    /// Measure the mesh against the direct path on the lab (release build), cross node and
    /// same node: throughput (1 and 8 streams), request/response latency, new-connection rate,
    /// CPU per GB and per 1,000 requests, proxy memory idle and per idle connection; medians of
    /// interleaved runs, targets met or not; report, chart and raw results in target/bench/.
    Bench(bench::BenchArgs),
    /// Soak the mesh on a fresh lab for minutes: connection churn from three pods (cross node
    /// over HBONE, same node, plaintext), a DENY policy flipping every few seconds,
    /// certificates of 4 s, node1's daemon restarted halfway, the underlay captured; then
    /// checks no plaintext leaked, no allowed connection lost or corrupted a byte, the pods were
    /// taken over, and the daemons' descriptors and memory stayed flat.
    Soak(soak::SoakArgs),
    /// Run the lab's end-to-end smoke (datapath, HBONE, policy, restart) under other kernels,
    /// each booted in a virtual machine over this machine's files, with cgroup v2 at
    /// /sys/fs/cgroup; prints the matrix of kernel, cgroup layout, result and time.
    VmTest(vm::VmTestArgs),
    /// Fuzz the parsers (cargo-fuzz, nightly): the mesh config, the CNI plugin's input, the
    /// control API's JSON and the HBONE server's frames, each target for --seconds; prints
    /// executions and coverage; a crash or hang fails, naming its reproducer.
    Fuzz(fuzz::FuzzArgs),
    /// Run the product on the lab: enroll pods, send traffic, show what was captured, tear down.
    Demo(demo::DemoArgs),
    /// Build the OCI image of ztunnel and ztunnel-cni offline, from scratch: the release
    /// binaries, the loader and libraries they link, a minimal /etc; an OCI layout in
    /// <OUTPUT>/oci tagged --tag, reproducible for a commit; prints its digest and size, and
    /// how to push it with skopeo.
    Image(image::ImageArgs),
    /// Render the Kubernetes manifests (`kubectl kustomize deploy/`) to
    /// target/manifests/ztunnel.yaml and validate them offline against the Kubernetes API's
    /// schemas (kubernetes-validate --strict).
    Manifests,
    /// The layers of ztunnel-user: its top-level modules, lowest first, each with the modules it
    /// uses; fails, naming a place for each edge, when their imports form a cycle.
    Layers,
    /// The local lab: three nodes and their pods in network namespaces, wired by real CNI plugins.
    Lab {
        #[command(subcommand)]
        command: lab::LabCommand,
    },
}

fn main() -> Result<ExitCode> {
    match Cli::parse().command {
        Command::Setup => setup::run().map(|()| ExitCode::SUCCESS),
        Command::Lab { command } => lab::run(command),
        Command::Test => test::run().map(|()| ExitCode::SUCCESS),
        Command::Demo(args) => demo::run(&args).map(|()| ExitCode::SUCCESS),
        Command::Bench(args) => bench::run(args).map(|()| ExitCode::SUCCESS),
        Command::Soak(args) => soak::run(args).map(|()| ExitCode::SUCCESS),
        Command::Fuzz(args) => fuzz::run(args).map(|()| ExitCode::SUCCESS),
        Command::Image(args) => image::run(args).map(|()| ExitCode::SUCCESS),
        Command::Manifests => manifests::run().map(|()| ExitCode::SUCCESS),
        Command::Layers => layers::run(),
        Command::VmTest(args) => vm::run(args).map(|()| ExitCode::SUCCESS),
    }
}
