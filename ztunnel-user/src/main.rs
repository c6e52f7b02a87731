//! `ztunnel`: the node proxy daemon and the operator's CLI.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::ffi::c_char;
use ztunnel_user::settings::Settings;
use ztunnel_user::{app, cli, cni_install};

/// jemalloc rather than glibc's malloc: its size classes fit what every open connection
/// holds (tokio's tasks and I/O registrations are 128-byte aligned, which glibc serves by
/// splitting off fragments that then lie between long-lived allocations), and its background
/// thread hands freed pages back to the kernel. The figures are in docs/PERFORMANCE.md.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main` runs: pages freed for about a second go back to
/// the kernel, at once with `MADV_DONTNEED` (not `MADV_FREE`, which RSS would still count),
/// from a background thread rather than from the threads that free them.
#[unsafe(export_name = "_rjem_malloc_conf")]
static ALLOCATOR_OPTIONS: Option<&'static c_char> =
    // SAFETY: the pointer is to the first byte of a 'static, NUL-terminated C string literal.
    Some(unsafe { &*c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr() });

#[derive(Parser)]
#[command(
    name = "ztunnel",
    version,
    about = "Istio ambient node proxy with eBPF traffic capture"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node daemon: load the capture programs and serve enrolled pods. Every flag can
    /// also be set by the environment variable its help names.
    Run(Box<Settings>),
    /// Put the ztunnel-cni plugin on this node: copy its binary into the CNI bin dir and append
    /// its entry to the node's network config (the first in the config dir by name), then keep
    /// it there while the network plugin rewrites or replaces its config. On SIGTERM or SIGINT
    /// the entry stays: pods that start while the installer is away (a rolling update) wait
    /// for the daemon rather than start uncaptured. Run by the DaemonSet in its own container.
    InstallCni(cni_install::InstallArgs),
    /// Take the ztunnel-cni plugin off this node: its entry out of the network configs (a
    /// config the network plugin did not change since gets its original bytes back) and its
    /// binary out of the CNI bin dir.
    UninstallCni(cni_install::CniDirs),
    #[command(flatten)]
    Operator(cli::Command),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Run(settings) => app::run(*settings),
        Command::InstallCni(args) => Ok(cni_install::install(&args)?),
        Command::UninstallCni(dirs) => Ok(cni_install::uninstall(&dirs)?),
        Command::Operator(command) => Ok(cli::run(command)?),
    }
}
